"""What every lab test module shares: the marks that select and skip it, the lab's users, and a
checksum of the host's main.cf."""

from __future__ import annotations

import os
import shutil

import pytest

from infra.lab import host
from infra.lab.state import LabInfo

# A module's `pytestmark = LAB_MARKS`: marked `lab`, and skipped where no lab host can boot.
LAB_MARKS = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root: network namespaces, mounts, systemd-nspawn"),
    pytest.mark.skipif(shutil.which("systemd-nspawn") is None, reason="systemd-nspawn is not installed (make setup)"),
]


def alice(lab: LabInfo) -> tuple[str, str]:
    """The lab's first mailbox user and her password."""
    return "alice@example.net", lab.passwords["alice@example.net"]


def main_cf_sum(lab: LabInfo) -> str:
    """main.cf's checksum on the lab host; a failed md5sum fails here, never compares as equal."""
    done = host.guest("sudo md5sum /etc/postfix/main.cf", lab)
    assert done.returncode == 0 and done.stdout.strip(), f"md5sum on the lab host: exit {done.returncode}"
    return done.stdout
