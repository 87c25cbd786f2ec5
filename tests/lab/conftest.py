"""One lab host for the machinery tests: booted once per session, always torn down."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from infra.lab import machinery

# Its own name, so that a lab someone started by hand (`lab up`) is left alone.
TEST_LAB = "mrtest"


def lab_preconditions() -> str | None:
    if os.geteuid() != 0:
        return "the lab needs root: network namespaces, mounts, loop devices, systemd-nspawn"
    for tool in ("systemd-nspawn", "debootstrap", "pebble", "swaks", "losetup"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (requirements-lab-debian.txt; make setup)"
    return None


@pytest.fixture(scope="session")
def lab_host() -> Iterator[machinery.LabInfo]:
    reason = lab_preconditions()
    if reason:
        pytest.skip(reason)
    machinery.down(TEST_LAB)  # whatever an interrupted session left behind
    try:
        yield machinery.up("dev", name=TEST_LAB, quiet=True)
    finally:
        problems = machinery.down(TEST_LAB)
        left = machinery.leftovers(TEST_LAB)
        # An error at teardown fails the session: a lab that leaks is a broken lab.
        assert not problems and not left, f"lab down left behind: {problems + left}"
