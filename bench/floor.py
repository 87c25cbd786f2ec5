"""The floor for the mail stack's figures: a plain Postfix on this machine delivering to Maildir.

No milter, no postscreen, no Dovecot, no TLS: Postfix's own `virtual` agent writes every message
for one test domain into one Maildir. Postfix's `smtp-source` sends 4 KB messages into port 25
with 1, 4, 8 and 16 parallel sessions; a level's rate is the messages over the time until the
last one is in the Maildir. It runs in a network namespace of its own, on its loopback only,
from a scratch directory that is removed afterwards.

Run alone: `.venv/bin/python -m bench.floor [--messages N]` (root); bench.mailstack calls
`measure` in the same run as the stack's figures.
"""

from __future__ import annotations

import argparse
import json
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

NETNS = "mrbench-floor"
SESSIONS = (1, 4, 8, 16)
MAIN_CF = """\
# The floor: Postfix's defaults, one virtual domain delivered to one Maildir by virtual(8).
compatibility_level = 3.6
queue_directory = {root}/spool
data_directory = {root}/data
meta_directory = /etc/postfix
myhostname = floor.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
virtual_mailbox_domains = floor.test
virtual_mailbox_base = {root}/mail
virtual_mailbox_maps = static:box/
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
maillog_file = {root}/maillog
"""


def _run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])}: exit {result.returncode}: {result.stderr.strip()[-600:]}")
    return result


def _delivered(root: Path) -> int:
    new = root / "mail" / "box" / "new"
    return sum(1 for _ in new.iterdir()) if new.is_dir() else 0


def measure(messages: int = 2000) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="mailroom-floor-", dir="/var/tmp"))
    nobody = pwd.getpwnam("nobody")
    config = root / "etc"
    config.mkdir()
    (config / "main.cf").write_text(MAIN_CF.format(root=root, uid=nobody.pw_uid, gid=nobody.pw_gid))
    shutil.copy("/usr/share/postfix/master.cf.dist", config / "master.cf")
    (root / "mail").mkdir()
    shutil.chown(root / "mail", nobody.pw_uid, nobody.pw_gid)
    (root / "spool").mkdir()  # postfix start makes the queue's subdirectories, not the queue
    (root / "data").mkdir()
    shutil.chown(root / "data", "postfix")
    root.chmod(0o755)
    _run("ip", "netns", "add", NETNS)
    try:
        _run("ip", "-n", NETNS, "link", "set", "lo", "up")
        _run("ip", "netns", "exec", NETNS, "postfix", "-c", str(config), "start")
        levels = []
        for sessions in SESSIONS:
            already = _delivered(root)
            started = time.perf_counter()
            _run("ip", "netns", "exec", NETNS, "smtp-source", "-s", str(sessions), "-m", str(messages), "-l", "4096",
                 "-f", "sender@floor.test", "-t", "box@floor.test", "127.0.0.1:25", timeout=600)  # fmt: skip
            accepted_s = time.perf_counter() - started
            deadline = started + 300
            while _delivered(root) < already + messages and time.perf_counter() < deadline:
                time.sleep(0.005)
            delivered = _delivered(root) - already
            levels.append({
                "sessions": sessions,
                "messages": messages,
                "accepted_msgs_per_s": messages / accepted_s,
                "delivered_msgs_per_s": delivered / (time.perf_counter() - started),
                "lost": messages - delivered,
            })  # fmt: skip
        return {"what": "plain Postfix, virtual(8) to one Maildir, smtp-source 4 KB messages", "throughput": levels}
    finally:
        subprocess.run(["ip", "netns", "exec", NETNS, "postfix", "-c", str(config), "stop"],
                       capture_output=True, check=False, timeout=60)  # fmt: skip
        subprocess.run(["ip", "netns", "delete", NETNS], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000, help="messages per level (default 2000)")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.messages), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
