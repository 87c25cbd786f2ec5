"""Shared fixtures: the program evaluated offline once per stack and settings, then reused; and
the deployed lab, one per spam filter mode for the whole session (tests/lab)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from infra.tools.rehearsal import OfflineRun, run_program

_RUNS: dict[str, OfflineRun] = {}
SPAM_FILTERS = ("spamassassin", "rspamd")


def offline_run(stack: str = "dev", **overrides: Any) -> OfflineRun:
    """The program for a stack (plus overrides) evaluated under mocks; cached for the session."""
    key = json.dumps([stack, overrides], sort_keys=True)
    if key not in _RUNS:
        _RUNS[key] = run_program(stack, overrides)
    return _RUNS[key]


@pytest.fixture
def offline() -> Callable[..., OfflineRun]:
    return offline_run


# The order the lab's feature folders run in, within each spam filter mode: what only reads the
# host first, the faults (kills, a reboot) after, and the benchmarks last, because one of them
# switches the spam filter (and back). Folders not listed run before the listed ones.
LAB_ORDER = (
    "lab/tls/test_certificates.py",
    "lab/clients/",
    "lab/deploy/",
    "lab/delivery/",
    "lab/submission/",
    "lab/spam/",
    "lab/dns/",
    "lab/status/",
    "lab/backup/",
    "lab/abuse/test_brute_force.py",
    "lab/faults/",
    "lab/secrets/",
    "lab/abuse/test_smtp_abuse.py",
    "lab/tls/test_scan.py",
    "lab/benchmarks/",
)


def _lab_rank(item: pytest.Item) -> int:
    path = item.path.as_posix()
    return next((i for i, prefix in enumerate(LAB_ORDER) if f"/tests/{prefix}" in path), -1)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Lab tests in LAB_ORDER (a stable sort, before pytest groups them by spam filter mode)."""
    items.sort(key=_lab_rank)


def lab_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the lab needs root: network namespaces, mounts, loop devices, systemd-nspawn"
    for tool in ("systemd-nspawn", "debootstrap", "losetup", "pebble"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (requirements-lab-debian.txt; make setup)"
    return None


@pytest.fixture(scope="session", params=SPAM_FILTERS)
def lab(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The dev stack deployed to a fresh lab host by the program's own remote commands, one per
    spam filter mode; pytest runs every test of one mode before it boots the next.

    MAILROOM_LAB_REUSE=1 runs the tests against a lab already up (`python -m infra lab up --set
    spamFilter=...`) and leaves it up; tests for the other mode are skipped."""
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    from infra.lab import deploy, state

    mode = request.param
    if os.environ.get("MAILROOM_LAB_REUSE") and (state.STATE_DIR / "lab.json").exists():
        info = state.LabInfo.load()
        if info.overrides.get("spamFilter", "spamassassin") != mode:
            pytest.skip(f"MAILROOM_LAB_REUSE: the running lab is not in {mode} mode")
        yield info
        return
    deploy.down()  # a lab left over from an interrupted run
    try:
        yield deploy.up("dev", {"spamFilter": mode})
    finally:
        deploy.down()
        # A lab that leaks is a broken lab: what `down` missed fails the session.
        left = deploy.leftovers()
        assert not left, f"lab down left behind: {left}"
