#!/usr/bin/python3
"""mailroom apply: converge this server to a bundle read on stdin (runs as root, stdlib only).

Protocol
--------
Invocation: ``apply.py [--root DIR] [--dry-run]`` with one JSON bundle on stdin (infra/core/bundle.py, version 1)::

    {"version": 1,
     "files": [{"path": "/etc/...", "content": "...", "mode": 420, "owner": "root",
                "group": "root", "secret": false}, ...],
     "services": [{"name": "postfix", "paths": ["/etc/postfix/", ...], "prepare": [...],
                   "check": [...], "reload": "systemctl reload postfix"}, ...],
     "packages": [...], "absent_packages": [...]}

The script

1. refuses a malformed bundle (exit 2) before touching anything;
2. installs missing ``packages`` (apt runs only when there is something to do;
   ``MAILROOM_APT_GET`` and ``MAILROOM_DPKG_QUERY`` replace the executables, for tests);
3. finds the files whose content, mode, owner or group differ, and the files a previous apply
   installed (recorded in ``/var/lib/mailroom/applied.json``) that left the bundle, and no others;
4. for every service owning one of those paths (the path starts with one of its ``paths``), runs
   its ``prepare`` then its ``check`` commands (``/bin/sh -c``, bundle order) on the new files
   *before* any of them is live: in a private mount namespace (a forked child,
   ``unshare(CLONE_NEWNS)``, every mount private) where an overlay over each of the services'
   directories (a path ending in ``/``; for a single file, or a directory that does not exist yet,
   the nearest existing directory above it) shows the new files, and not those leaving the
   bundle, at their normal paths. The overlays' upper layers live on a tmpfs of that namespace:
   what the commands write under those directories (postmap's .db, newaliases, compiled sieve)
   vanishes with it, and the running daemons and the live files never see any of it (a prepare
   step's writes elsewhere, such as useradd's or install -d's, are real: they are idempotent
   setup). If one fails, nothing was installed: it names the service, the command, the new files
   it refused and the command's output on stderr, reloads nothing and exits 1: a bad bundle leaves
   the running server as it was;
5. only then, service by service in bundle order (files no service owns first), writes its files,
   atomically, secret ones never readable by others while written, removes those that left the
   bundle, runs its ``prepare`` commands again on the live files, and reloads it if it changed:
   a daemon another points at (a milter) runs on its new files before the next one's appear; if a
   prepare fails now, puts every file of this apply back as it was, runs the prepare commands
   again on the restored files, reloads again the services already reloaded, and exits 1;
6. then records what it installed,
   purges the installed ``absent_packages`` (only now: the daemon being replaced keeps running
   until its successor's files passed their checks and were loaded), and prints one JSON line:
   ``{"changed": [paths], "reloaded": [services], "installed": [packages],
   "removed_packages": [packages]}``. A reload that fails is reported (exit 1) and retried by the
   next apply, even with the same bundle; the purge waits for that apply too.

It never prints file contents. The same bundle applied twice changes, runs and restarts nothing.
``--root DIR`` applies files and state under DIR (tests); every command sees DIR as
``$MAILROOM_ROOT``. Owners and groups are resolved after the packages (which create the daemons'
users) are installed, in DIR/etc/passwd and DIR/etc/group when DIR has them, else on this host;
a file whose owner or group does not exist then is refused (exit 2).
``--dry-run`` touches nothing, runs nothing but dpkg-query, and prints the same JSON line with
``"dry_run": true``: what would change, be reloaded, installed and purged.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import grp
import itertools
import json
import os
import posixpath
import pwd
import re
import secrets
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

VERSION = 1
# What earlier applies installed and which reloads they still owe; the lock serialises applies.
STATE = "/var/lib/mailroom/applied.json"
LOCK = "/var/lib/mailroom/apply.lock"
NOTHING_INSTALLED = "nothing was installed and nothing was reloaded."


class BundleError(ValueError):
    """The bundle itself is wrong: refused with exit 2."""


class ApplyError(RuntimeError):
    """Applying failed: exit 1, with the server left as it was (or as the message says)."""


# The entry point maps the outcome to the exit status the deploy step reads: 0 converged,
# 1 failed (the server as the message says), 2 refused (nothing touched).


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Converge this server to a mailroom bundle read on stdin.")
    parser.add_argument("--root", type=Path, default=Path("/"), help="apply under this directory instead of /")
    parser.add_argument("--dry-run", action="store_true", help="report what would change; change nothing")
    args = parser.parse_args(argv)
    root: Path = args.root.resolve()
    os.umask(0o022)
    try:
        plan = parse(sys.stdin.buffer.read())
    except BundleError as exc:
        print(f"mailroom apply: refused: {exc}", file=sys.stderr)
        return 2
    if not root.is_dir():
        print(f"mailroom apply: {root} is not a directory", file=sys.stderr)
        return 2
    errors: list[str] = []
    try:
        if args.dry_run:
            summary = preview(plan, root)
        else:
            with locked(root):
                summary, errors = apply(plan, root)
    except BundleError as exc:
        print(f"mailroom apply: refused: {exc}", file=sys.stderr)
        return 2
    except ApplyError as exc:
        print(f"mailroom apply: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"mailroom apply: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    for error in errors:
        print(f"mailroom apply: {error}", file=sys.stderr)
    return 1 if errors else 0


# The bundle is checked whole before anything is touched, so a malformed one changes nothing.

PACKAGE_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?")


@dataclass(frozen=True)
class File:
    path: str
    content: bytes
    mode: int
    owner: str
    group: str


@dataclass(frozen=True)
class Daemon:
    name: str
    paths: tuple[str, ...]
    prepare: tuple[str, ...]
    check: tuple[str, ...]
    reload: str

    def owns(self, path: str) -> bool:
        return any(path.startswith(prefix) for prefix in self.paths)


@dataclass(frozen=True)
class Plan:
    files: tuple[File, ...]
    daemons: tuple[Daemon, ...]
    packages: tuple[str, ...]
    absent_packages: tuple[str, ...]
    debconf: tuple[str, ...] = ()


def parse(raw: bytes) -> Plan:
    """The bundle as a plan, or BundleError saying what is wrong (never quoting file contents)."""
    try:
        doc = json.loads(raw.decode())
    except UnicodeDecodeError:
        raise BundleError("the bundle is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"the bundle is not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(doc, dict) or type(doc.get("version")) is not int or doc["version"] != VERSION:
        raise BundleError(f"the bundle is not a version {VERSION} mailroom bundle")
    for key in ("files", "services", "packages", "absent_packages"):
        if not isinstance(doc.get(key), list):
            raise BundleError(f"the bundle has no {key} list")
    files = tuple(_file(entry) for entry in doc["files"])
    paths = sorted(f.path for f in files)
    for first, second in itertools.pairwise(paths):
        if first == second:
            raise BundleError(f"file {first} appears twice in the bundle")
        if second.startswith(first + "/"):
            raise BundleError(f"file {first} is also the directory of {second}")
    if STATE in paths or LOCK in paths:
        raise BundleError(f"the bundle may not replace mailroom's own {STATE}")
    daemons = tuple(_daemon(entry) for entry in doc["services"])
    names = [d.name for d in daemons]
    if len(set(names)) != len(names):
        raise BundleError("two services share a name")
    packages = _strings(doc["packages"], "packages")
    absent = _strings(doc["absent_packages"], "absent_packages")
    for name in packages + absent:
        if not PACKAGE_NAME.fullmatch(name):
            raise BundleError(f"{name!r} is not a Debian package name")
    if set(packages) & set(absent):
        raise BundleError(f"packages both wanted and unwanted: {', '.join(sorted(set(packages) & set(absent)))}")
    debconf = _strings(doc.get("debconf", []), "debconf")
    for line in debconf:
        if len(line.split()) < 3 or "\n" in line or not PACKAGE_NAME.fullmatch(line.split()[0]):
            raise BundleError(f"{line!r} is not a debconf selection (PACKAGE QUESTION TYPE [VALUE])")
    return Plan(files, daemons, packages, absent, debconf)


def _file(entry: object) -> File:
    if not isinstance(entry, dict):
        raise BundleError("a file entry is not an object")
    path = _absolute(entry.get("path"), "a file entry")
    if path == "/" or path.endswith("/") or posixpath.normpath(path) != path:
        raise BundleError(f"file {path}: not a normalised file path")
    content = entry.get("content")
    if not isinstance(content, str):
        raise BundleError(f"file {path}: lacks its content")
    try:
        data = content.encode()
    except UnicodeEncodeError:
        raise BundleError(f"file {path}: content is not valid Unicode text") from None
    mode = entry.get("mode", 0o644)
    if type(mode) is not int or not 0 <= mode <= 0o7777:
        raise BundleError(f"file {path}: mode must be an integer permission (0 to 0o7777)")
    owner, group = entry.get("owner", "root"), entry.get("group", "root")
    if not (isinstance(owner, str) and owner and isinstance(group, str) and group):
        raise BundleError(f"file {path}: owner and group must be names")
    # Only checked: every file is written unreadable by others until it has its mode.
    secret = entry.get("secret", False)
    if not isinstance(secret, bool):
        raise BundleError(f"file {path}: secret must be true or false")
    if secret and mode & 0o007:
        raise BundleError(f"file {path}: a secret file must not be readable by others (mode {mode:#o})")
    return File(path, data, mode, owner, group)


def _daemon(entry: object) -> Daemon:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
        raise BundleError("a service entry lacks its name")
    name = entry["name"]
    paths = _strings(entry.get("paths", []), f"service {name}: paths")
    for path in paths:
        _absolute(path, f"service {name}")
    reload = entry.get("reload", "")
    if not isinstance(reload, str):
        raise BundleError(f"service {name}: reload must be a command string")
    return Daemon(
        name,
        paths,
        _strings(entry.get("prepare", []), f"service {name}: prepare"),
        _strings(entry.get("check", []), f"service {name}: check"),
        reload,
    )


def _absolute(path: object, what: str) -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise BundleError(f"{what} lacks an absolute path: {path!r}")
    if "\0" in path or ".." in path.split("/"):
        raise BundleError(f"{what} climbs out of the root: {path!r}")
    return path


def _strings(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BundleError(f"{what} must be a list of strings")
    return tuple(value)


# The apply itself, step by step; the dry run surveys the same way and stops there.


def apply(plan: Plan, root: Path) -> tuple[dict[str, Any], list[str]]:
    """Converge; (the summary, reload or purge failures). Raises ApplyError with the files put back."""
    env = command_env(root)
    # Survey: the packages first (they create the daemons' users), then what must change on disk.
    missing, present = package_work(plan, env)
    if missing:
        preseed(plan.debconf, env)
    install_packages(missing, env)
    ids = known_owners(plan, root)
    previously, pending = read_state(root)
    before = survey(plan, root, ids, previously)
    touched = affected(plan, sorted(before))
    # Stage and check: a service refusing its new files stops the apply with nothing installed.
    check_staged(plan, root, ids, before, touched, env)
    # Install and reload, service by service in bundle order: its files go live, its prepare steps
    # run on them (the derived files, postmap's .db or compiled sieve, follow them on the live
    # side), it reloads. So a daemon that another one points at (a spam filter's milter, before
    # Postfix) already runs on its new files when the next one's files appear. Files no service
    # owns go first.
    unowned, owned = by_service(plan, before)
    done = Progress()
    try:
        install_files(plan, root, ids, unowned, done)
        for daemon in plan.daemons:
            install_files(plan, root, ids, owned[daemon.name], done)
            if daemon in touched and daemon.prepare:
                prepare_live(daemon, env, done)
            if daemon.reload and (daemon in touched or daemon.name in pending):
                reload(daemon, env, done)
    except InstallError as exc:
        raise roll_back(str(exc), root, env, done) from None
    # Record state: what is installed now, and the reloads still owed to the next apply.
    write_state(root, sorted(f.path for f in plan.files), done.unreloaded)
    # After a failed reload the daemon being replaced may still be the one serving: its package stays.
    errors = list(done.errors)
    removed: list[str] = []
    if errors:
        errors.append("its checks had passed: the new files stay, and the next apply retries the reload.")
    else:
        try:
            purge_packages(present, env)
            removed = present
        except ApplyError as exc:
            errors.append(str(exc))
    summary = {
        "changed": sorted(before),
        "reloaded": [d.name for d in done.reloaded],
        "installed": missing,
        "removed_packages": removed,
    }
    return summary, errors


def preview(plan: Plan, root: Path) -> dict[str, Any]:
    """What an apply would do, touching nothing. A file whose owner a missing package would
    create counts as changed."""
    env = command_env(root)
    missing, present = package_work(plan, env)
    ids, _ = owners(plan, root)
    previously, pending = read_state(root)
    changed = sorted(survey(plan, root, ids, previously))
    due = {d.name for d in affected(plan, changed)} | set(pending)
    reloads = [d.name for d in plan.daemons if d.name in due and d.reload]
    return {"dry_run": True, "changed": changed, "reloaded": reloads, "installed": missing, "removed_packages": present}


def command_env(root: Path) -> dict[str, str]:
    return {**os.environ, "MAILROOM_ROOT": str(root)}


# Packages come before the files (a mode switch installs its daemons, and with them their users)
# and are purged only after their successors' files are live.


def package_work(plan: Plan, env: dict[str, str]) -> tuple[list[str], list[str]]:
    """(wanted packages not installed, unwanted packages installed), in bundle order."""
    missing = [p for p in plan.packages if not is_installed(p, env)]
    present = [p for p in plan.absent_packages if is_installed(p, env)]
    return missing, present


def is_installed(name: str, env: dict[str, str]) -> bool:
    query = os.environ.get("MAILROOM_DPKG_QUERY", "dpkg-query")
    status, output = run([query, "-W", "-f=${Status}\\n", name], env)
    if status == 127:
        raise ApplyError(output.strip())
    return status == 0 and any(line.endswith(" installed") for line in output.splitlines())


def preseed(selections: tuple[str, ...], env: dict[str, str]) -> None:
    """The packages' install questions answered first (a noninteractive install takes defaults)."""
    if not selections:
        return
    tool = os.environ.get("MAILROOM_DEBCONF_SET_SELECTIONS", "debconf-set-selections")
    status, output = run([tool], env, stdin="".join(f"{line}\n" for line in selections))
    if status != 0:
        raise ApplyError(failure("answering the packages' install questions", status, output))


def install_packages(missing: list[str], env: dict[str, str]) -> None:
    if not missing:
        return
    install = ["install", "-y", "--no-install-recommends", *missing]
    status, output = apt_get(install, env)
    if status != 0:
        # Package lists go stale on a long-lived server (a mode switch months later): refresh once.
        apt_get(["update"], env)
        status, output = apt_get(install, env)
    if status != 0:
        raise ApplyError(failure(f"installing {' '.join(missing)}", status, output))


def purge_packages(present: list[str], env: dict[str, str]) -> None:
    if not present:
        return
    status, output = apt_get(["purge", "-y", *present], env)
    if status != 0:
        raise ApplyError(failure(f"purging {' '.join(present)}", status, output))


def apt_get(verb: list[str], env: dict[str, str]) -> tuple[int | None, str]:
    apt = os.environ.get("MAILROOM_APT_GET", "apt-get")
    # noninteractive: no debconf prompts; needrestart only lists (Ubuntu would restart daemons
    # this apply did not touch); the dpkg lock is waited for, as unattended-upgrades may hold it.
    apt_env = {**env, "DEBIAN_FRONTEND": "noninteractive", "NEEDRESTART_MODE": "l"}
    return run([apt, "-o", "DPkg::Lock::Timeout=600", *verb], apt_env)


# Owners are names in the bundle and ids on disk: resolved on the server (or under --root, in
# its own passwd and group), after the packages created the daemons' users.


def known_owners(plan: Plan, root: Path) -> dict[str, tuple[int, int]]:
    """The uid and gid of each file; BundleError for the first whose owner or group is missing."""
    ids, unknown = owners(plan, root)
    if unknown:
        path, problem = next(iter(unknown.items()))
        raise BundleError(f"file {path}: {problem} on this server")
    return ids


def owners(plan: Plan, root: Path) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """(uid and gid of each file, what is missing for the others)."""
    users, groups = account_ids(root, "passwd"), account_ids(root, "group")

    def uid(name: str) -> int | None:
        return account_id(users, name, lambda n: pwd.getpwnam(n).pw_uid)

    def gid(name: str) -> int | None:
        return account_id(groups, name, lambda n: grp.getgrnam(n).gr_gid)

    ids: dict[str, tuple[int, int]] = {}
    unknown: dict[str, str] = {}
    for f in plan.files:
        u, g = uid(f.owner), gid(f.group)
        if u is None:
            unknown[f.path] = f"no user {f.owner!r}"
        elif g is None:
            unknown[f.path] = f"no group {f.group!r}"
        else:
            ids[f.path] = (u, g)
    return ids, unknown


def account_id(table: dict[str, int] | None, name: str, system: Callable[[str], int]) -> int | None:
    """NAME's id in TABLE, or (no table) in this host's own accounts; None when there is none."""
    if table is not None:
        return table.get(name)
    with contextlib.suppress(KeyError):
        return system(name)
    return None


def account_ids(root: Path, database: str) -> dict[str, int] | None:
    """Name -> id from root/etc/passwd or root/etc/group; None for this host's own (NSS) lookup."""
    table = root / "etc" / database
    if root == Path("/") or not table.is_file():
        return None
    ids: dict[str, int] = {}
    for line in table.read_text(errors="replace").splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[2].isdigit():
            ids.setdefault(fields[0], int(fields[2]))
    return ids


# The record of earlier applies: which files mailroom installed (so one leaving the bundle is
# removed, and no other file ever is) and which reloads failed (so the next apply retries them).


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """One apply at a time: a second one waits for the first."""
    lock_file = root / LOCK.lstrip("/")
    lock_file.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_state(root: Path) -> tuple[list[str], list[str]]:
    """(paths a previous apply installed, services whose reload is still owed)."""
    state_file = root / STATE.lstrip("/")
    if not state_file.exists():
        return [], []
    try:
        state: Any = json.loads(state_file.read_text())
        files = [p for p in state["files"] if isinstance(p, str) and p.startswith("/") and ".." not in p.split("/")]
        pending = [n for n in state.get("pending_reloads", []) if isinstance(n, str)]
    except (ValueError, KeyError, TypeError):
        # Forgetting what was installed only ever leaves files behind; it never removes others.
        print(f"mailroom apply: warning: {STATE} is unreadable; starting a new record", file=sys.stderr)
        return [], []
    return files, pending


def write_state(root: Path, files: list[str], pending: list[str]) -> None:
    state_file = root / STATE.lstrip("/")
    text = json.dumps({"version": VERSION, "files": files, "pending_reloads": pending}, indent=1) + "\n"
    if not state_file.exists() or state_file.read_text() != text:
        write(state_file, text.encode(), 0o600, 0, 0)


# The survey looks before touching: the paths it finds are what the staging and the install
# change, and what each held before is what a rollback puts back.


@dataclass(frozen=True)
class OnDisk:
    """What a path held before this apply: nothing, a regular file or a symbolic link."""

    kind: str  # "missing", "file" or "symlink"
    content: bytes = b""  # file bytes, or the link's target
    mode: int = 0
    uid: int = 0
    gid: int = 0


def survey(plan: Plan, root: Path, ids: dict[str, tuple[int, int]], previously: list[str]) -> dict[str, OnDisk]:
    """What each path this apply must change holds now: the bundle's files that differ (or whose
    owner is not known yet) and the files a previous apply installed that left the bundle."""
    wanted = {f.path for f in plan.files}
    before: dict[str, OnDisk] = {}
    # A path that is a directory stops the apply with nothing written.
    for f in plan.files:
        current = on_disk(root / f.path.lstrip("/"))
        if f.path not in ids or current != OnDisk("file", f.content, f.mode, *ids[f.path]):
            before[f.path] = current
    for path in previously:
        if path not in wanted:
            current = on_disk(root / path.lstrip("/"))
            if current.kind != "missing":
                before[path] = current
    return before


def on_disk(target: Path) -> OnDisk:
    try:
        st = target.lstat()
    except FileNotFoundError:
        return OnDisk("missing")
    except NotADirectoryError:
        raise ApplyError(f"{target}: a parent of this path is not a directory") from None
    if stat.S_ISLNK(st.st_mode):
        return OnDisk("symlink", os.fsencode(target.readlink()), 0, st.st_uid, st.st_gid)
    if stat.S_ISREG(st.st_mode):
        return OnDisk("file", target.read_bytes(), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    raise ApplyError(f"{target} is not a regular file on this server; mailroom will not replace it")


def affected(plan: Plan, changed: list[str]) -> list[Daemon]:
    return [d for d in plan.daemons if any(d.owns(p) for p in changed)]


# Staging: the daemons' own checkers must see the new files at their normal paths, yet nothing
# live may change before every check passed. A forked child in a private mount namespace
# overlays the new files on the live directories, runs the commands and answers through a pipe.

# Where the checks' namespace mounts its tmpfs (an empty directory outside of it).
STAGE = "/var/lib/mailroom/stage"
CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
# overlayfs splits its options on these.
UNSAFE_IN_OPTIONS = re.compile(r"[,:\\]")


@dataclass(frozen=True)
class Refusal:
    """The first prepare or check command that failed on the staged files."""

    daemon: str
    command: str
    status: int | None
    output: str


def check_staged(
    plan: Plan,
    root: Path,
    ids: dict[str, tuple[int, int]],
    before: dict[str, OnDisk],
    daemons: list[Daemon],
    env: dict[str, str],
) -> None:
    """Run the daemons' prepare and check commands, in bundle order, on the new files seen at their
    normal paths in a private mount namespace (a forked child); ApplyError for the first that fails.
    Outside that namespace nothing changes but what the commands themselves write beyond the
    overlays (useradd, install -d); the overlays, their tmpfs and all written there end with it."""
    runs = [d for d in daemons if d.prepare or d.check]
    if not runs:
        return
    try:
        targets = overlay_targets(root, runs)
    except ApplyError as exc:
        raise ApplyError(cannot_check(str(exc))) from None
    stage_dir = root / STAGE.lstrip("/")
    stage_dir.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        stage_dir.mkdir(mode=0o700)
    reader, writer = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: it never returns
        os.close(reader)
        answer = checks_in_namespace(Staging(plan, root, ids, before, targets, stage_dir), runs, env)
        with contextlib.suppress(BaseException), os.fdopen(writer, "w") as stream:
            json.dump(answer, stream)
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as stream:
        text = stream.read()
    _, wait_status = os.waitpid(pid, 0)
    with contextlib.suppress(OSError):
        stage_dir.rmdir()
    try:
        answer = json.loads(text)
    except ValueError:
        answer = {"error": f"the checks' process ended without an answer (wait status {wait_status})"}
    if "error" in answer:
        raise ApplyError(cannot_check(answer["error"]))
    if "refusal" in answer:
        raise ApplyError(refused(Refusal(**answer["refusal"]), plan, sorted(before)))


@dataclass(frozen=True)
class Staging:
    """What the checks' namespace shows: the plan's files, over the live ones below the targets."""

    plan: Plan
    root: Path
    ids: dict[str, tuple[int, int]]  # each file's owner and group ids
    before: dict[str, OnDisk]  # the live files the plan changes or removes
    targets: list[Path]  # the directories covered with an overlay
    stage_dir: Path  # where the overlays' layers live (a tmpfs)


def checks_in_namespace(staging: Staging, runs: list[Daemon], env: dict[str, str]) -> dict[str, Any]:
    """The child's work, as its answer to the parent: {} when every command passed, else its
    "refusal" or the "error" that kept it from checking (every failure must reach the parent)."""
    try:
        _libc_call("unshare", ctypes.c_int(CLONE_NEWNS))
        # Private: no mount made here reaches the host's namespace (systemd makes / shared).
        _mount("none", Path("/"), None, MS_REC | MS_PRIVATE, None)
        stage(staging)
        for daemon in runs:
            for command in (*daemon.prepare, *daemon.check):
                status, output = shell(command, env)
                if status != 0:
                    return {"refusal": asdict(Refusal(daemon.name, command, status, output[-OUTPUT_TAIL:]))}
    except BaseException as exc:
        return {"error": str(exc) if isinstance(exc, (ApplyError, OSError)) else repr(exc)}
    return {}


def overlay_targets(root: Path, daemons: list[Daemon]) -> list[Path]:
    """The live directories the checks' namespace covers with an overlay: each service directory,
    or for a single file, or a directory not made yet, the nearest existing directory above it;
    only the outermost of nested ones (its overlay shows the deeper ones' new files too)."""
    wanted = set()
    for daemon in daemons:
        for prefix in daemon.paths:
            live = root / prefix.lstrip("/")
            wanted.add(_nearest_directory(live if prefix.endswith("/") else live.parent, root))
    targets: list[Path] = []
    for target in sorted(wanted, key=lambda t: len(t.parts)):
        if not any(target.is_relative_to(outer) for outer in targets):
            targets.append(target)
    for target in targets:
        if target == Path("/"):
            raise ApplyError("a service's files lie directly under /: mailroom cannot check them apart from it")
        if UNSAFE_IN_OPTIONS.search(str(target)):
            raise ApplyError(f"{target}: mailroom cannot check files under a path with ',', ':' or '\\'")
    return targets


def _nearest_directory(path: Path, root: Path) -> Path:
    while path != root and not path.is_dir():
        path = path.parent
    return path


def stage(staging: Staging) -> None:
    """In this (private) namespace: a tmpfs on stage_dir and, over each target, an overlay whose
    upper layer holds the changed files below it, and a whiteout for each file leaving the bundle."""
    root, before, ids, stage_dir = staging.root, staging.before, staging.ids, staging.stage_dir
    _mount("tmpfs", stage_dir, "tmpfs", 0, "mode=0700")
    files = {f.path: f for f in staging.plan.files}
    for index, target in enumerate(staging.targets):
        upper, work = stage_dir / str(index) / "upper", stage_dir / str(index) / "work"
        upper.mkdir(parents=True)
        work.mkdir()
        _same_attributes(upper, target)
        for path in sorted(before):
            live = root / path.lstrip("/")
            if not live.is_relative_to(target):
                continue
            staged = _stage_path(target, upper, live.relative_to(target))
            if path in files:
                write(staged, files[path].content, files[path].mode, *ids[path])
            else:
                os.mknod(staged, stat.S_IFCHR | 0o600, os.makedev(0, 0))  # overlayfs: "removed here"
        _mount("overlay", target, "overlay", 0, f"lowerdir={target},upperdir={upper},workdir={work}")


def _stage_path(target: Path, upper: Path, relative: Path) -> Path:
    """upper/relative's directories, each with the mode and owner of its live counterpart (the
    overlay shows the upper one's), or 0755 root as install_files would make it."""
    staged, live = upper, target
    for part in relative.parent.parts:
        staged, live = staged / part, live / part
        if not staged.exists():
            if live.is_symlink() or (live.exists() and not live.is_dir()):
                raise ApplyError(f"{live} is not a directory on this server; mailroom cannot check the files below it")
            staged.mkdir(mode=0o755)  # as make_parents makes it (umask 022)
            if live.is_dir():
                _same_attributes(staged, live)
    return upper / relative


def _same_attributes(directory: Path, like: Path) -> None:
    st = like.stat()
    os.chown(directory, st.st_uid, st.st_gid)
    directory.chmod(stat.S_IMODE(st.st_mode))


def _libc_call(name: str, *args: object) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}: {os.strerror(errno)}")


def _mount(source: str, target: Path, fstype: str | None, flags: int, options: str | None) -> None:
    try:
        _libc_call(
            "mount",
            ctypes.c_char_p(source.encode()),
            ctypes.c_char_p(os.fsencode(target)),
            ctypes.c_char_p(fstype.encode() if fstype else None),
            ctypes.c_ulong(flags),
            ctypes.c_char_p(options.encode() if options else None),
        )
    except OSError as exc:
        raise OSError(exc.errno, f"mounting {fstype or source} on {target}: {os.strerror(exc.errno or 0)}") from None


def cannot_check(reason: str) -> str:
    return f"cannot check the new files apart from the live ones: {reason}\n{NOTHING_INSTALLED}"


def refused(refusal: Refusal, plan: Plan, changed: list[str]) -> str:
    daemon = next(d for d in plan.daemons if d.name == refusal.daemon)
    own = [p for p in changed if daemon.owns(p)]
    shown = ", ".join(own[:8]) + (f" and {len(own) - 8} more" if len(own) > 8 else "")
    what = f"`{refusal.command}` on the new {shown}"
    return (
        f"service {refusal.daemon}: {failure(what, refusal.status, refusal.output)}\n"
        f"the new files were refused before any was live: {NOTHING_INSTALLED}"
    )


# Installing and reloading go service by service, and keep a record of what went live: it is
# what the rollback undoes if a service's prepare fails on its live files.


class InstallError(Exception):
    """A file could not be written, or a prepare command failed on the live files: roll back."""


@dataclass
class Progress:
    """What this apply has done on the live side so far, in order."""

    replaced: dict[str, OnDisk] = field(default_factory=dict)  # path installed or removed -> what it held
    created: list[Path] = field(default_factory=list)  # directories made for them
    prepared: list[Daemon] = field(default_factory=list)
    reloaded: list[Daemon] = field(default_factory=list)
    unreloaded: list[str] = field(default_factory=list)  # services whose reload failed: still owed
    errors: list[str] = field(default_factory=list)  # why they failed


def by_service(plan: Plan, before: dict[str, OnDisk]) -> tuple[dict[str, OnDisk], dict[str, dict[str, OnDisk]]]:
    """The paths to change as (those no service owns, those of each service by name), each path
    going with the first service in bundle order that owns it."""
    unowned = dict(before)
    owned = {d.name: {path: unowned.pop(path) for path in list(unowned) if d.owns(path)} for d in plan.daemons}
    return unowned, owned


def install_files(
    plan: Plan, root: Path, ids: dict[str, tuple[int, int]], group: dict[str, OnDisk], done: Progress
) -> None:
    """Write the group's changed files and remove those of it that left the bundle. A failure puts
    the group back before it is raised (InstallError for a file that could not be written)."""
    wanted = {f.path for f in plan.files}
    created: list[Path] = []
    try:
        for f in plan.files:
            if f.path in group:
                target = root / f.path.lstrip("/")
                make_parents(target, created)
                write(target, f.content, f.mode, *ids[f.path])
        for path in group:
            if path not in wanted:
                remove(root / path.lstrip("/"))
    except OSError as exc:
        restore(root, group, created)
        raise InstallError(f"writing {exc.filename}: {exc.strerror}") from None
    except BaseException:
        restore(root, group, created)
        raise
    done.created += created
    done.replaced.update(group)


def make_parents(target: Path, created: list[Path]) -> None:
    """Create the missing parent directories (0755 root), remembering them for a rollback."""
    missing = []
    parent = target.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        directory.mkdir(mode=0o755)
        created.append(directory)


def prepare_live(daemon: Daemon, env: dict[str, str], done: Progress) -> None:
    """Run the service's prepare commands again, on its installed files."""
    done.prepared.append(daemon)
    for command in daemon.prepare:
        status, output = shell(command, env)
        if status != 0:
            ran = failure(f"`{command}` on the installed files", status, output)
            raise InstallError(f"service {daemon.name}: {ran}")


def reload(daemon: Daemon, env: dict[str, str], done: Progress) -> None:
    """Reload the service. A failure does not roll back (its files passed their checks): it is
    reported and owed to the next apply."""
    status, output = shell(daemon.reload, env)
    if status == 0:
        done.reloaded.append(daemon)
    else:
        done.unreloaded.append(daemon.name)
        done.errors.append(f"service {daemon.name}: {failure(f'`{daemon.reload}`', status, output)}")


# The rollback puts the server back as it was when a service fails on its live files, and says
# what it could not restore.


def roll_back(what: str, root: Path, env: dict[str, str], done: Progress) -> ApplyError:
    """Every file of this apply back as it was; prepare and reload again what already ran."""
    problems = restore(root, done.replaced, done.created)
    for daemon in done.prepared:
        for command in daemon.prepare:
            status, output = shell(command, env)
            if status != 0:
                problems.append(failure(f"service {daemon.name}: `{command}` on the restored files", status, output))
    for daemon in done.reloaded:
        status, output = shell(daemon.reload, env)
        if status != 0:
            problems.append(failure(f"service {daemon.name}: `{daemon.reload}` on the restored files", status, output))
    message = f"{what}\nthe previous files are back in place and "
    message += "the services already reloaded were reloaded on them." if done.reloaded else "nothing was reloaded."
    if problems:
        message += "\nwhile restoring:\n" + "\n".join(problems)
    return ApplyError(message)


def restore(root: Path, before: dict[str, OnDisk], created: list[Path]) -> list[str]:
    """Every path back to what it held before this apply; the directories it made, gone."""
    problems = []
    for path, previous in before.items():
        try:
            put_back(root / path.lstrip("/"), previous)
        except OSError as exc:
            problems.append(f"{path}: {exc.strerror}")
    for directory in reversed(created):
        with contextlib.suppress(OSError):
            directory.rmdir()
    return problems


def put_back(target: Path, previous: OnDisk) -> None:
    if previous.kind == "missing":
        if target.is_symlink() or target.exists():
            remove(target)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        write(target, previous.content, previous.mode, previous.uid, previous.gid, link=previous.kind == "symlink")


# Commands (checkers, prepare steps, reloads, apt) run with no stdin, in their own process group,
# under a time limit: one that hangs must not hang the deploy; it counts as a failure.

COMMAND_TIMEOUT = float(os.environ.get("MAILROOM_COMMAND_TIMEOUT", "900"))
OUTPUT_TAIL = 4000


def shell(command: str, env: dict[str, str]) -> tuple[int | None, str]:
    return run(["/bin/sh", "-c", command], env)


def run(argv: list[str], env: dict[str, str], stdin: str | None = None) -> tuple[int | None, str]:
    """(exit status or None on timeout, combined output); the whole process group dies on timeout."""
    try:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=env,
            start_new_session=True,
        )
    except OSError as exc:
        return 127, f"cannot run {argv[0]}: {exc.strerror}\n"
    try:
        output, _ = process.communicate(stdin, timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return None, output + f"\n(killed after {COMMAND_TIMEOUT:g} seconds)\n"
    return process.returncode, output


def failure(what: str, status: int | None, output: str) -> str:
    how = "timed out" if status is None else f"exit {status}"
    tail = output[-OUTPUT_TAIL:]
    return f"{what} failed ({how})" + (f":\n{tail.rstrip()}" if tail.strip() else "")


# Files change atomically, so a daemon never reads a half-written one and a crash leaves the old
# or the new file, never a mix.


def write(target: Path, content: bytes, mode: int, uid: int, gid: int, *, link: bool = False) -> None:
    """Atomically replace target: a temporary file in the same directory, created 0600 (nobody
    else can read a secret while it is written), fsynced, given its owner then its mode (chown
    clears set-id bits), renamed over the target; the directory entry is fsynced too."""
    temporary = target.with_name(f".{target.name}.mailroom-{secrets.token_hex(4)}")
    try:
        if link:
            temporary.symlink_to(os.fsdecode(content))
            os.lchown(temporary, uid, gid)
        else:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as stream:
                stream.write(content)
                stream.flush()
                os.fchown(fd, uid, gid)
                os.fchmod(fd, mode)
                os.fsync(fd)
        temporary.replace(target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    sync_directory(target.parent)


def remove(target: Path) -> None:
    target.unlink(missing_ok=True)
    sync_directory(target.parent)


def sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


if __name__ == "__main__":
    sys.exit(main())
