"""Run on the lab host (`sudo python3 - < bench/guest_probe.py`): what every daemon uses, now.

Prints one JSON object: for each systemd unit, the PSS and RSS (KiB) and the process count of
its processes, read from /proc/PID/smaps_rollup and /proc/PID/status; and the CPU time
(seconds) every process on the host has used so far, counting reaped children (cutime, cstime)
with their parents, so a run's CPU is the difference of two probes. Standard library only: it
runs with the host's own Python 3.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def unit_of(pid: str) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        path = line.split(":", 2)[2]
        if path and path != "/":
            return path.rstrip("/").rsplit("/", 1)[-1]
    return "-"


def kib(path: Path, key: str) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def main() -> None:
    units: dict[str, dict[str, int]] = {}
    cpu_ticks = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rpartition(")")[2].split()
            cpu_ticks += sum(int(stat[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
            if stat[0] == "Z" or not (entry / "exe").exists():
                continue  # kernel threads have no exe; zombies no memory
            unit = unit_of(entry.name)
            figures = units.setdefault(unit, {"pss_kib": 0, "rss_kib": 0, "processes": 0})
            figures["pss_kib"] += kib(entry / "smaps_rollup", "Pss")
            figures["rss_kib"] += kib(entry / "status", "VmRSS")
            figures["processes"] += 1
        except (OSError, IndexError, ValueError):
            continue  # the process ended while it was read
    print(json.dumps({"units": units, "cpu_s": cpu_ticks / os.sysconf("SC_CLK_TCK")}))


if __name__ == "__main__":
    main()
