"""What every lab test module shares: the marks that select and skip it, the lab's users, a
checksum of the host's main.cf, the lab DNS's zone edited by hand, and outside addresses added."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from infra.lab import host
from infra.lab.network import WORLD_LINK, WORLD_NS
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


@contextmanager
def zone_changed(lab: LabInfo, add: str = "", remove: str = "") -> Iterator[None]:
    """The lab DNS's zone with a line added or removed, as someone editing records by hand would."""
    path = Path(lab.zone)
    original = path.read_text()
    lines = original.splitlines()
    if remove:
        assert any(remove in " ".join(line.split()) for line in lines), remove
        lines = [line for line in lines if remove not in " ".join(line.split())]
    _write_zone(path, "\n".join([*lines, add]) + "\n")
    try:
        yield
    finally:
        _write_zone(path, original)


@contextmanager
def world_address(address: str) -> Iterator[str]:
    """ADDRESS added to the outside world's link, for a client the host has never met."""
    argv = ["ip", "-n", WORLD_NS, "addr", "add", f"{address}/24", "dev", WORLD_LINK]
    subprocess.run(argv, check=True, capture_output=True)
    try:
        yield address
    finally:
        subprocess.run(["ip", "-n", WORLD_NS, "addr", "del", f"{address}/24", "dev", WORLD_LINK], check=False)


def _write_zone(path: Path, text: str) -> None:
    before = path.stat().st_mtime_ns
    path.write_text(text)
    stamp = max(path.stat().st_mtime_ns, before + 1_000_000)
    os.utime(path, ns=(stamp, stamp))  # the DNS stand-in re-reads on a changed mtime
