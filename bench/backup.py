"""Benchmark of the off-site backup on a lab host: the benchmark's mailbox backed up, listed and
restored, with the time, the sizes and the memory each step takes.

On the lab (the running one, else a fresh one brought up and down again), in this order:

1. fill     N messages of realistic size (bench.mailstack's mix: a few KB of text, tens of KB
            of HTML, a few hundred KB with an attachment) appended over IMAPS into a folder of
            the benchmark's mailbox (alice@example.net).
2. first    `backup.py run` as the nightly timer runs it (staging copy by dsync, restic backup,
            forget, a 5 % read-back check): wall time, files and bytes read, bytes added, and
            the peak RSS of everything the run started (the sum over its cgroup's processes,
            sampled every 0.1 s; page cache not counted), with the largest process named.
3. again    the same run with nothing new: what a quiet night costs.
4. list     `backup.py list`: its time (one `restic stats` per snapshot), the snapshots'
            restore sizes and what the repository stores (compressed and deduplicated).
5. restore  the mailbox lost (its home deleted, as on a new volume), then `backup.py restore
            --mailbox`: wall time and peak RSS, and the message count compared (must be equal).

Run: `.venv/bin/python -m bench.backup [--messages 1000] [--quick] [--out DIR]`. Needs root (the
lab). Results: `<out>/<UTC>-backup.json` and the key "backup-<spam filter>" of `<out>/latest.json`
(the spam filter's learning is part of each run). No figure is checked here.
"""

from __future__ import annotations

import datetime as dt
import imaplib
import json
import random
import shlex
import subprocess
import time
from typing import Any

from bench.mailstack import realistic
from bench.program import bench_parser, record
from infra.core.backup import BACKUP_PATH, BACKUP_RESULT
from infra.core.facts import IMAPS_PORT, MAIL_DIR
from infra.lab import deploy, host, network, state
from infra.lab.mail import unverified
from infra.lab.state import LabInfo
from infra.tools.rehearsal import DROPLET_IPV4

USER = "alice@example.net"
FOLDER = "Bench"
DOMAIN, LOCAL = USER.split("@")[1], USER.split("@")[0]

# Runs COMMAND in a transient unit of its own and samples its cgroup: wall time, exit status, the
# peak of the summed RSS of its processes and the largest one then. Printed as JSON on stdout.
SAMPLER = r"""
import json, os, subprocess, sys, time
unit = "mailroom-bench-" + str(os.getpid())
start = time.monotonic()
subprocess.run(["systemd-run", "--quiet", "--unit", unit, "--collect", "-p", "MemoryAccounting=yes",
                "--", *sys.argv[1:]], check=True)
peak, largest = 0, ("", 0)
def state():
    return subprocess.run(["systemctl", "show", "-p", "ActiveState,ExecMainStatus", unit],
                          capture_output=True, text=True).stdout
def members():  # the unit's processes, by their cgroup (any hierarchy: v1, v2 or hybrid)
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and f"/{unit}.service" in open(f"/proc/{pid}/cgroup").read():
                yield pid
        except OSError:
            continue
while True:
    shown = dict(line.split("=", 1) for line in state().splitlines() if "=" in line)
    if shown.get("ActiveState") not in ("active", "activating", "deactivating"):
        break
    total, procs = 0, []
    for pid in members():
        try:
            fields = dict(l.split(":", 1) for l in open(f"/proc/{pid}/status") if ":" in l)
            rss = int(fields.get("VmRSS", "0 kB").split()[0])
            total += rss
            procs.append((fields["Name"].strip(), rss))
        except OSError:
            continue
    if total > peak:
        peak, largest = total, max(procs, key=lambda p: p[1]) if procs else ("", 0)
    time.sleep(0.1)
print(json.dumps({"seconds": time.monotonic() - start, "exit": int(shown.get("ExecMainStatus") or 0),
                  "peak_rss_kib": peak, "largest": largest[0], "largest_rss_kib": largest[1]}))
"""


def sampled(info: LabInfo, *argv: str) -> dict[str, Any]:
    """ARGV run on the lab host as root in a unit of its own, measured by SAMPLER."""
    done = subprocess.run(
        host.ssh_argv(info, "sudo python3 - " + shlex.join(argv)),
        input=SAMPLER, capture_output=True, text=True, check=True, timeout=3 * 3600,
    )  # fmt: skip
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if figures["exit"] != 0:
        raise RuntimeError(f"`{' '.join(argv)}` exited {figures['exit']} on the lab host (see its journal)")
    return {
        "seconds": figures["seconds"],
        "peak_rss_mib": figures["peak_rss_kib"] / 1024,
        "largest_process": figures["largest"],
        "largest_rss_mib": figures["largest_rss_kib"] / 1024,
    }


def root(info: LabInfo, command: str) -> str:
    done = host.guest(f"sudo sh -c {shlex.quote(command)}", info)
    if done.returncode != 0:
        raise RuntimeError(f"`{command}` on the lab host: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def messages_in(info: LabInfo) -> int:
    return int(root(info, f"doveadm mailbox status -u {USER} messages {FOLDER}").split("=")[1])


def fill(info: LabInfo, count: int, seed: int = 5) -> int:
    """COUNT realistic messages appended into FOLDER; the bytes appended."""
    rng = random.Random(seed)  # noqa: S311 - a repeatable corpus, not a secret

    def append() -> int:
        appended = 0
        with imaplib.IMAP4_SSL(DROPLET_IPV4, IMAPS_PORT, ssl_context=unverified(), timeout=60) as imap:
            imap.login(USER, info.passwords[USER])
            imap.create(FOLDER)
            for i in range(count):
                data = realistic(rng, i).as_bytes()
                typ, why = imap.append(FOLDER, None, None, data)
                if typ != "OK":
                    raise RuntimeError(f"APPEND refused: {why}")
                appended += len(data)
        return appended

    return network.in_netns(network.WORLD_NS, append)


def last_result(info: LabInfo) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(root(info, f"cat {BACKUP_RESULT}"))
    return result


def measure(info: LabInfo, count: int) -> dict[str, Any]:
    before = messages_in(info) if FOLDER in root(info, f"doveadm mailbox list -u {USER}").split() else 0
    appended = fill(info, count)
    mailbox_bytes = int(root(info, f"du -sb {MAIL_DIR}/{DOMAIN}/{LOCAL}").split()[0])
    figures: dict[str, Any] = {"messages": count + before, "appended_mb": appended / 1e6}
    figures["mailbox_mb"] = mailbox_bytes / 1e6

    figures["first_run"] = sampled(info, "python3", BACKUP_PATH, "run") | _run_sizes(last_result(info))
    figures["quiet_run"] = sampled(info, "python3", BACKUP_PATH, "run") | _run_sizes(last_result(info))

    start = time.monotonic()
    listed = json.loads(root(info, f"python3 {BACKUP_PATH} list").strip().splitlines()[-1])
    figures["list"] = {
        "seconds": time.monotonic() - start,
        "snapshots": len(listed["snapshots"]),
        "newest_restore_size_mb": listed["snapshots"][-1]["size"] / 1e6,
        "repository_stored_mb": listed["stored"] / 1e6,
    }

    had = messages_in(info)
    root(info, f"systemctl stop dovecot && rm -rf {MAIL_DIR}/{DOMAIN}/{LOCAL} && systemctl start dovecot")
    figures["restore"] = sampled(info, "python3", BACKUP_PATH, "restore", "--mailbox", USER)
    figures["restore"]["messages_back"] = messages_in(info)
    figures["restore"]["messages_before"] = had
    return figures


def _run_sizes(result: dict[str, Any]) -> dict[str, Any]:
    """The sizes a run reports in its result file (restic's summary)."""
    return {
        "files": result.get("files", 0),
        "read_mb": result.get("bytes", 0) / 1e6,
        "added_mb": result.get("added", 0) / 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("backup", __doc__, "a few messages, for the smoke test")
    parser.add_argument("--messages", type=int, default=1000, help="messages in the mailbox (default 1000)")
    args = parser.parse_args(argv)
    running = (state.STATE_DIR / "lab.json").exists()
    info = LabInfo.load() if running else deploy.up("dev")
    try:
        figures = measure(info, 5 if args.quick else args.messages)
    finally:
        if not running:
            deploy.down()
    figures["spam_filter"] = info.overrides.get("spamFilter", "spamassassin")
    path = record(args.out, {f"backup-{figures['spam_filter']}": figures}, dt.datetime.now(dt.UTC), name="backup")
    print(f"bench: results in {path}")
    first, back = figures["first_run"], figures["restore"]
    print(
        f"  {figures['messages']} messages, {figures['mailbox_mb']:.1f} MB: first backup {first['seconds']:.1f} s "
        f"(peak {first['peak_rss_mib']:.0f} MiB), quiet night {figures['quiet_run']['seconds']:.1f} s, "
        f"stored {figures['list']['repository_stored_mb']:.1f} MB, restore {back['seconds']:.1f} s "
        f"({back['messages_back']}/{back['messages_before']} messages)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
