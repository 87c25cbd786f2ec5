"""What a lab created, written down as it is created, so that teardown can undo exactly that.

Every namespace, link, mount, loop device, process and cgroup the lab makes is appended to a
JSON file in the lab's state directory *before* the next step runs. `undo` walks the list
backwards and removes each entry, ignoring what is already gone, so it works after a crash,
after a half-finished `up`, and when called twice. Nothing is removed by a broad name: only
the entries in the ledger, and processes only if their start time still matches (a recycled
pid is somebody else's).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

Kind = Literal["netns", "link", "mount", "loop", "process", "cgroup"]
LEDGER_FILE = "created.json"
STOP_GRACE_SECONDS = 30


@dataclass(frozen=True)
class Entry:
    kind: Kind
    name: str  # netns name, link name, mount point, loop device, pid, cgroup directory
    detail: str = ""  # process: its start time (clock ticks since boot); link: its namespace


def process_start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat: with the pid, it names one process for the machine's uptime."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[19]


class Ledger:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LEDGER_FILE

    def entries(self) -> list[Entry]:
        if not self.path.exists():
            return []
        return [Entry(**e) for e in json.loads(self.path.read_text())]

    def add(self, kind: Kind, name: str, detail: str = "") -> None:
        entries = [*self.entries(), Entry(kind, name, detail)]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".tmp")
        partial.write_text(json.dumps([asdict(e) for e in entries], indent=1))
        partial.replace(self.path)

    def add_process(self, pid: int) -> None:
        self.add("process", str(pid), process_start_time(pid))

    def live_processes(self) -> list[int]:
        return [int(e.name) for e in self.entries() if e.kind == "process" and _is_same_process(e)]

    def undo(self) -> list[str]:
        """Remove everything recorded, newest first; returns what could not be removed."""
        entries = self.entries()
        # Processes first (the host's systemd shuts down on SIGTERM, which releases its mounts),
        # then whatever is left running in the lab's own namespaces, then the rest in reverse.
        for entry in reversed(entries):
            if entry.kind == "process":
                _stop(entry)
        for entry in entries:
            if entry.kind == "netns":
                _kill_namespace_processes(entry.name)
        problems = []
        for entry in reversed(entries):
            if entry.kind != "process":
                problem = _remove(entry)
                if problem:
                    problems.append(problem)
        if not problems:
            self.path.unlink(missing_ok=True)
        return problems


def _is_same_process(entry: Entry) -> bool:
    return bool(entry.detail) and process_start_time(int(entry.name)) == entry.detail


def _stop(entry: Entry) -> None:
    pid = int(entry.name)
    if not _is_same_process(entry):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    while time.monotonic() < deadline and _is_same_process(entry):
        _reap(pid)
        time.sleep(0.2)
    if _is_same_process(entry):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    _reap(pid)


def _reap(pid: int) -> None:
    """Collect a child of ours that has exited, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _kill_namespace_processes(netns: str) -> None:
    """Anything still running in a namespace the lab created was started by the lab."""
    for _ in range(20):
        result = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=False)
        pids = [int(p) for p in result.stdout.split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def _remove(entry: Entry) -> str:
    if entry.kind == "mount":
        if _run("findmnt", "-n", "--mountpoint", entry.name).returncode != 0:
            return ""
        if _run("umount", entry.name).returncode != 0:
            _run("umount", "-l", entry.name)
        gone = _run("findmnt", "-n", "--mountpoint", entry.name).returncode != 0
        return "" if gone else f"mount {entry.name} is still mounted"
    if entry.kind == "loop":
        if _run("losetup", entry.name).returncode != 0:
            return ""
        result = _run("losetup", "-d", entry.name)
        return "" if result.returncode == 0 else f"loop device {entry.name}: {result.stderr.strip()}"
    if entry.kind == "link":
        namespace = ["-n", entry.detail] if entry.detail else []
        if _run("ip", *namespace, "link", "show", entry.name).returncode != 0:
            return ""
        result = _run("ip", *namespace, "link", "delete", entry.name)
        return "" if result.returncode == 0 else f"link {entry.name}: {result.stderr.strip()}"
    if entry.kind == "netns":
        if not Path(f"/run/netns/{entry.name}").exists():
            return ""
        result = _run("ip", "netns", "delete", entry.name)
        return "" if result.returncode == 0 else f"namespace {entry.name}: {result.stderr.strip()}"
    if entry.kind == "cgroup":
        group = Path(entry.name)
        for _ in range(25):
            if not group.exists():
                return ""
            # nspawn and the guest's systemd made groups below ours: the deepest go first.
            for child in sorted((p for p in group.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    child.rmdir()
            with contextlib.suppress(OSError):
                group.rmdir()
            time.sleep(0 if not group.exists() else 0.2)  # a last process may still be exiting
        return f"cgroup {group} is still in use"
    return ""
