#!/usr/bin/env python3
"""mailroom's off-site backup: every mailbox, Sieve script and the spam filter's learning, with
restic, encrypted, into the bucket the program declared. Installed as
/usr/local/lib/mailroom/backup.py; its settings in /etc/mailroom/backup.json, its secrets
(repository password, access key) in /etc/mailroom/backup.env (root only), never on a command line.

    backup.py run                  the nightly run (mailroom-backup.timer): stage, back up, check
    backup.py list                 the snapshots, newest last, as JSON
    backup.py restore [--snapshot ID] [--mailbox ADDRESS]
                                   merge a snapshot's mail back into the live mailboxes

Consistency. restic reads files one by one while Dovecot renames them (new/ to cur/, a flag
change renames the file): a walk of the live Maildirs can miss a message or pair a uidlist with
files it does not name. So the run first brings a staging copy up to date with `doveadm backup`
(dsync: under Dovecot's own mailbox locks, the copy identical to the mailbox, UIDs, UIDVALIDITY,
flags and keywords with it), and restic reads only the staging copy, which nothing else writes.
A message delivered during the run is in the next night's snapshot, never half in this one.

Restore. `doveadm sync -1 -R` pulls the restored copy into the live mailbox and changes nothing
else: mail that arrived since (or while the restore runs) stays, a message already there is not
copied twice (dsync matches them by GUID), and into an empty mailbox (a new volume) the folders
come back with their UIDVALIDITY and UIDs. A message deleted after the snapshot is not brought
back by it into a mailbox that remembers the deletion: dsync honours expunges it can see.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONFIG = Path("/etc/mailroom/backup.json")
ENVIRONMENT = Path("/etc/mailroom/backup.env")
# restic's exit code when the repository is not there yet (0.17+); older releases exit 1 and say so.
NO_REPOSITORY = 10


class BackupError(Exception):
    """A step failed; its message says which and what the tool answered."""


def secrets(path: Path | None = None) -> dict[str, str]:
    """KEY=VALUE lines: the repository, its password and the access key."""
    values: dict[str, str] = {}
    for line in (path or ENVIRONMENT).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def run(*argv: str, env: dict[str, str] | None = None, timeout: float = 6 * 3600, input: str | None = None) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, input=input, check=False)
    if done.returncode != 0:
        raise BackupError(f"`{' '.join(argv[:3])}` exited {done.returncode}: {done.stderr.strip()[-600:]}")
    return done.stdout


def restic_env(config: dict[str, Any]) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "HOME": "/root"}
    env.update(secrets())
    env["RESTIC_CACHE_DIR"] = config["cache_dir"]
    return env


def restic(config: dict[str, Any], *argv: str, timeout: float = 6 * 3600) -> str:
    return run("restic", "--quiet", *argv, env=restic_env(config), timeout=timeout)


def ensure_repository(config: dict[str, Any]) -> bool:
    """Initialise the repository on the first run; True when it was made now."""
    done = subprocess.run(
        ["restic", "cat", "config"], capture_output=True, text=True, env=restic_env(config), timeout=600, check=False
    )
    if done.returncode == 0:
        return False
    missing = done.returncode == NO_REPOSITORY or "Is there a repository" in done.stderr
    if not missing:
        raise BackupError(f"the repository cannot be read: {done.stderr.strip()[-600:]}")
    restic(config, "init", timeout=600)
    return True


def users() -> list[tuple[str, str]]:
    """(user, home) of every mailbox Dovecot knows."""
    # `doveadm user -f home '*'` lists the names only: the home is asked for user by user.
    names = run("doveadm", "user", "*").split()
    return [(name, run("doveadm", "user", "-f", "home", name).strip()) for name in names]


def stage(config: dict[str, Any]) -> list[str]:
    """Bring the staging copy up to date; the paths restic then reads."""
    staging = Path(config["staging_dir"])
    staging.mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.chown(staging, "vmail", "vmail")
    paths = [str(staging)]
    for user, home in users():
        copy = staging / user
        # dsync writes the copy as the mail user, under the mailbox's own locks.
        run("doveadm", "backup", "-u", user, f"maildir:{copy}/Maildir", timeout=3 * 3600)
        sieve = Path(home) / "sieve"
        if sieve.is_dir():  # the user's Sieve scripts and which one is active (a symlink)
            paths.append(str(sieve))
            active = Path(home) / ".dovecot.sieve"
            if active.is_symlink():
                paths.append(str(active))
    gone = {p.name for p in staging.iterdir()} - {u for u, _ in users()} - {"spam-filter"}
    for name in gone:  # a mailbox removed from the settings leaves the next snapshot
        shutil.rmtree(staging / name, ignore_errors=True)
    learned = staging / "spam-filter"
    learned.mkdir(exist_ok=True)
    if config["spam_filter"] == "spamassassin":
        # A text dump of the Bayes database (sa-learn --restore reads it back).
        dump = run("runuser", "-u", config["spamd_user"], "--", "sa-learn", "--backup")
        (learned / "bayes.dump").write_text(dump)
    elif config["spam_filter"] == "rspamd":
        # A consistent snapshot of Redis (rspamd's Bayes and fuzzy data), as Redis writes its own.
        run("redis-cli", "--rdb", str(learned / "redis.rdb"))
    if config["spam_filter"] in ("spamassassin", "rspamd"):
        # How much it had learned, for the restore to compare with the live filter's.
        (learned / "learned.json").write_text(json.dumps({"messages": _learned(config)}) + "\n")
    paths += config["extra_paths"]
    return paths


def write_result(config: dict[str, Any], result: dict[str, Any]) -> None:
    target = Path(config["result"])
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(target)


# Sundays: pruning rewrites packs (time, memory and requests), so once a week; forget is nightly.
PRUNE_WEEKDAY = 6


def forget(config: dict[str, Any], prune: bool) -> None:
    """Drop the snapshots past the keep (backupKeepDaily/Weekly/Monthly) of this host's backups,
    all in one group (restic groups by paths too by default: a user's first Sieve script would
    start a new group and keep the old one's snapshots forever)."""
    keep = config.get("keep")
    if not keep:
        return
    restic(
        config, "forget", "--tag", "mailroom", "--host", config["host"], "--group-by", "host,tags",
        "--keep-daily", str(keep["daily"]), "--keep-weekly", str(keep["weekly"]),
        "--keep-monthly", str(keep["monthly"]), *(["--prune"] if prune else []),
    )  # fmt: skip


def nightly(config: dict[str, Any]) -> int:
    started = time.time()
    previous = Path(config["result"])
    # The newest good run is carried over a failed one: the status check tells how old the mail's backup is.
    last_success = None
    with contextlib.suppress(OSError, ValueError, AttributeError):  # none yet, or unreadable: none
        last_success = json.loads(previous.read_text()).get("last_success")
    result: dict[str, Any] = {"started": started, "ok": False, "last_success": last_success}
    try:
        result["initialised"] = ensure_repository(config)
        # Locks left by a run that died (or brought back by undeleting the bucket): only the stale
        # ones go, a lock of a restic still running stays.
        restic(config, "unlock", timeout=600)
        paths = stage(config)
        summary = restic(
            config, "backup", "--json", "--host", config["host"], "--tag", "mailroom",
            *(f"--exclude={e}" for e in config["exclude"]), *paths,
        )  # fmt: skip
        last = [json.loads(line) for line in summary.splitlines() if line.startswith("{")]
        done: dict[str, Any] = next((m for m in reversed(last) if m.get("message_type") == "summary"), {})
        result.update(
            snapshot=done.get("snapshot_id", ""),
            files=done.get("total_files_processed", 0),
            bytes=done.get("total_bytes_processed", 0),
            added=done.get("data_added", 0),
        )
        forget(config, prune=time.gmtime(started).tm_wday == PRUNE_WEEKDAY)
        # A random sample of the packs read back and verified each night: a damaged pack is found
        # within weeks, not at the restore.
        restic(config, "check", f"--read-data-subset={config['check_subset']}")
        result["ok"] = True
        result["last_success"] = started
    except (BackupError, OSError, subprocess.TimeoutExpired) as exc:
        result["error"] = str(exc)
    result["finished"] = time.time()
    write_result(config, result)
    # The status check reads the result: a failure (or the first success after one) is mailed now.
    subprocess.run(["systemctl", "start", "--no-block", "mailroom-status.service"], check=False)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


def snapshots(config: dict[str, Any]) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = json.loads(restic(config, "snapshots", "--json", "--tag", "mailroom") or "[]")
    return sorted(listed, key=lambda s: str(s["time"]))


def listing(config: dict[str, Any]) -> dict[str, Any]:
    """The snapshots, newest last, each with the size of what a restore of it brings back,
    and what the whole repository stores (compressed and deduplicated: far less than the sum). restic 0.14's
    snapshot list carries no size, so `stats` is asked once per snapshot."""
    listed = snapshots(config)
    for snap in listed:
        stats = json.loads(restic(config, "stats", "--json", "--mode", "restore-size", snap["id"]))
        snap["size"] = stats["total_size"]
    stored = json.loads(restic(config, "stats", "--json", "--mode", "raw-data"))["total_size"] if listed else 0
    return {"snapshots": listed, "stored": stored}


def restore_sieve(saved: Path, home: Path) -> None:
    """The user's Sieve scripts back, each one they do not have now (a script written since the
    backup wins), and the active one again if none is active (Dovecot makes an empty ~/sieve on
    its own at the first delivery, so the folder's being there says nothing)."""
    if not (saved / "sieve").is_dir():
        return
    (home / "sieve").mkdir(mode=0o700, parents=True, exist_ok=True)
    for script in (saved / "sieve").glob("*.sieve"):
        if not (home / "sieve" / script.name).exists():
            shutil.copy2(script, home / "sieve" / script.name)
    active, live = saved / ".dovecot.sieve", home / ".dovecot.sieve"
    if active.is_symlink() and not live.exists():
        live.unlink(missing_ok=True)  # a dangling link: its script is gone
        live.symlink_to(active.readlink())
    subprocess.run(["chown", "-R", "-h", "vmail:vmail", str(home)], check=True)


def _bayes_learned(user: str) -> int:
    """How many messages SpamAssassin's Bayes has learned (0 for none, or no database yet)."""
    done = subprocess.run(
        ["runuser", "-u", user, "--", "sa-learn", "--dump", "magic"], capture_output=True, text=True, check=False
    )
    # Lines like "0.000  0  12  0  non-token data: nspam".
    counts = [int(line.split()[2]) for line in done.stdout.splitlines() if line.endswith(("nspam", "nham"))]
    return sum(counts) if done.returncode == 0 else 0


def _rspamd_learned() -> int:
    """How many messages rspamd's Bayes has learned: its counters in Redis (the hash RS; other keys,
    the history among them, are written by any running rspamd and say nothing of learning)."""
    counts = run("redis-cli", "hmget", "RS", "learns_spam", "learns_ham").split()
    return sum(int(c) for c in counts if c.isdigit())


def _learned(config: dict[str, Any]) -> int:
    if config["spam_filter"] == "spamassassin":
        return _bayes_learned(config["spamd_user"])
    return _rspamd_learned()


def restore_learning(config: dict[str, Any], saved: Path) -> str:
    """The spam filter's learning back into a filter that knows less than the snapshot's: a new
    server's, which learns on its own from its first mail (autolearn) and so is rarely empty by the
    time its owner restores. A live filter that has learned as much or more is left alone."""
    if config["spam_filter"] not in ("spamassassin", "rspamd"):
        return "no spam filter learning"
    record = saved / "learned.json"
    data = saved / ("bayes.dump" if config["spam_filter"] == "spamassassin" else "redis.rdb")
    if not data.is_file() or not record.is_file():
        return "not in this snapshot"
    then, now = int(json.loads(record.read_text())["messages"]), _learned(config)
    if now >= then:
        return f"kept the live one: it has learned {now} messages, the snapshot {then}"
    if config["spam_filter"] == "spamassassin":
        user = config["spamd_user"]
        with tempfile.NamedTemporaryFile("w", prefix="bayes-", suffix=".dump", delete=False) as copy:
            copy.write(data.read_text())
        try:
            shutil.chown(copy.name, user)
            # --restore empties the database before it reads the dump back.
            run("runuser", "-u", user, "--", "sa-learn", "--restore", copy.name)
        finally:
            Path(copy.name).unlink()
    else:
        directory = run("redis-cli", "config", "get", "dir").split()[1]
        name = run("redis-cli", "config", "get", "dbfilename").split()[1]
        # Redis reads its snapshot at start: stopped (it saves its own file), that file replaced, started.
        run("systemctl", "stop", "redis-server")
        try:
            shutil.copyfile(data, Path(directory) / name)
            shutil.chown(Path(directory) / name, "redis", "redis")
        finally:
            run("systemctl", "start", "redis-server")
    return f"restored ({_learned(config)} messages learned; the live filter had {now})"


def restore(config: dict[str, Any], snapshot: str, mailbox: str | None) -> int:
    staging = Path(config["staging_dir"])
    known = [u for u, _ in users()]
    chosen = [mailbox] if mailbox else known
    unknown = [u for u in chosen if u not in known]
    if unknown:
        raise BackupError(f"no such mailbox on this server: {', '.join(unknown)}; known: {', '.join(known)}")
    # Restored next to the mail, on the volume: room for it is room the mail already takes.
    target = Path(tempfile.mkdtemp(prefix=".restore-", dir=config["mail_dir"]))
    try:
        includes = [f"--include={staging}/{u}" for u in chosen]
        if mailbox is None:  # the whole server: the spam filter's learning too
            includes.append(f"--include={staging}/spam-filter")
        homes = dict(users())
        for user in chosen:
            includes += [f"--include={homes[user]}/sieve", f"--include={homes[user]}/.dovecot.sieve"]
        restic(config, "restore", snapshot, "--target", str(target), *includes)
        shutil.chown(target, "vmail", "vmail")
        subprocess.run(["chown", "-R", "vmail:vmail", str(target)], check=True)
        report: dict[str, Any] = {"snapshot": snapshot, "mailboxes": []}
        for user in chosen:
            copy = target / str(staging).lstrip("/") / user / "Maildir"
            if not copy.is_dir():
                report["mailboxes"].append({"mailbox": user, "restored": False, "why": "not in this snapshot"})
                continue
            run("doveadm", "sync", "-1", "-R", "-u", user, f"maildir:{copy}", timeout=3 * 3600)
            home = Path(homes[user])
            restore_sieve(target / str(home).lstrip("/"), home)
            report["mailboxes"].append({"mailbox": user, "restored": True})
        if mailbox is None:
            report["learning"] = restore_learning(config, target / str(staging).lstrip("/") / "spam-filter")
        print(json.dumps(report))
        return 0
    finally:
        shutil.rmtree(target, ignore_errors=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="backup.py", description="mailroom's off-site backup")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="stage, back up and check (what the nightly timer runs)")
    commands.add_parser("list", help="the snapshots, as JSON")
    restoring = commands.add_parser("restore", help="merge a snapshot's mail into the live mailboxes")
    restoring.add_argument("--snapshot", default="latest")
    restoring.add_argument("--mailbox")
    args = parser.parse_args(argv)
    config = json.loads(CONFIG.read_text())
    try:
        if args.command == "run":
            return nightly(config)
        if args.command == "list":
            print(json.dumps(listing(config)))
            return 0
        return restore(config, args.snapshot, args.mailbox)
    except BackupError as exc:
        print(f"backup: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
