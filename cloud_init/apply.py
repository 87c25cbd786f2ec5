#!/usr/bin/python3
"""mailroom apply: converge this server to a bundle read on stdin (runs as root, stdlib only).

Protocol. stdin holds one JSON bundle (infra/bundle.py, version 1): files (path, content, mode,
owner, group, secret), services (name, path prefixes, prepare and check commands, reload
command), packages to have and packages to be without. The script

1. refuses a malformed bundle (exit 2) before touching anything;
2. installs missing packages and purges unwanted ones (no apt at all when nothing is to do);
3. writes only the files that differ, atomically, secret ones never readable by others, and
   removes the files a previous apply installed that left the bundle;
4. for every service whose files changed, runs its prepare and check commands; if one fails,
   puts every file back as it was, reloads nothing and exits 1: a bad bundle leaves the
   running server as it was;
5. otherwise reloads each changed service once and records what it installed.

It prints one JSON summary line (paths, services, packages; never file contents). The same
bundle applied twice changes and restarts nothing. `--root DIR` applies under DIR (tests);
commands see it as $MAILROOM_ROOT.
"""

from __future__ import annotations

import argparse
import grp
import json
import os
import pwd
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VERSION = 1
STATE = "var/lib/mailroom/applied.json"


class BundleError(ValueError):
    pass


@dataclass(frozen=True)
class Wanted:
    path: str
    content: bytes
    mode: int
    owner: str
    group: str


@dataclass(frozen=True)
class Previous:
    """A file as it was before this apply (None content: it did not exist)."""

    content: bytes | None
    mode: int = 0
    uid: int = 0
    gid: int = 0


def parse(text: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError(f"the bundle is not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise BundleError(f"the bundle is not a version {VERSION} mailroom bundle")
    for key, kind in (("files", list), ("services", list), ("packages", list), ("absent_packages", list)):
        if not isinstance(doc.get(key), kind):
            raise BundleError(f"the bundle has no {key} list")
    for f in doc["files"]:
        if not (isinstance(f, dict) and str(f.get("path", "")).startswith("/") and isinstance(f.get("content"), str)):
            raise BundleError("a file entry lacks an absolute path or its content")
        if ".." in Path(f["path"]).parts:
            raise BundleError(f"a file path climbs out of the root: {f['path']}")
    return doc


def run(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, env=env, check=False)


def converge_packages(doc: dict[str, Any], env: dict[str, str]) -> tuple[list[str], list[str]]:
    """Install what is missing, purge what must be absent; apt runs only when there is work."""
    query = os.environ.get("MAILROOM_DPKG_QUERY", "dpkg-query")
    apt = os.environ.get("MAILROOM_APT_GET", "apt-get")

    def installed(name: str) -> bool:
        result = subprocess.run([query, "-W", "-f=${Status}", name], capture_output=True, text=True, check=False)
        return result.returncode == 0 and "ok installed" in result.stdout

    missing = [p for p in doc["packages"] if not installed(p)]
    present = [p for p in doc["absent_packages"] if installed(p)]
    apt_env = {**env, "DEBIAN_FRONTEND": "noninteractive"}
    # Wait for the dpkg lock rather than fail: unattended-upgrades may hold it after boot.
    lock = ["-o", "DPkg::Lock::Timeout=600"]
    for argv in (
        [apt, *lock, "install", "-y", "--no-install-recommends", *missing] if missing else None,
        [apt, *lock, "purge", "-y", *present] if present else None,
    ):
        if argv:
            result = subprocess.run(argv, capture_output=True, text=True, env=apt_env, check=False)
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(argv[:4])} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return missing, present


def snapshot(target: Path) -> Previous:
    if not target.exists():
        return Previous(None)
    st = target.stat()
    return Previous(target.read_bytes(), st.st_mode & 0o7777, st.st_uid, st.st_gid)


def ids(owner: str, group: str) -> tuple[int, int]:
    return pwd.getpwnam(owner).pw_uid, grp.getgrnam(group).gr_gid


def differs(target: Path, want: Wanted) -> bool:
    if not target.exists():
        return True
    st = target.stat()
    return (target.read_bytes(), st.st_mode & 0o7777, st.st_uid, st.st_gid) != (
        want.content,
        want.mode,
        *ids(want.owner, want.group),
    )


def write(target: Path, content: bytes, mode: int, uid: int, gid: int) -> None:
    """Atomically: a temporary file created with its final mode, then renamed over the target."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        os.fchmod(fd, mode & 0o600)  # nobody else can read it while it is written
        os.fchown(fd, uid, gid)
        os.write(fd, content)
        os.fsync(fd)
        os.fchmod(fd, mode)
        os.close(fd)
        Path(temporary).replace(target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def restore(root: Path, before: dict[str, Previous]) -> None:
    for path, previous in before.items():
        target = root / path.lstrip("/")
        if previous.content is None:
            target.unlink(missing_ok=True)
        else:
            write(target, previous.content, previous.mode, previous.uid, previous.gid)


def owns(service: dict[str, Any], path: str) -> bool:
    return any(path == p or (p.endswith("/") and path.startswith(p)) for p in service.get("paths", []))


def apply(doc: dict[str, Any], root: Path) -> dict[str, Any]:
    env = {**os.environ, "MAILROOM_ROOT": str(root)}
    installed, purged = converge_packages(doc, env)
    state_file = root / STATE
    installed_before: list[str] = json.loads(state_file.read_text())["files"] if state_file.exists() else []

    wanted = [
        Wanted(
            f["path"], f["content"].encode(), int(f.get("mode", 0o644)), f.get("owner", "root"), f.get("group", "root")
        )
        for f in doc["files"]
    ]
    wanted_paths = {w.path for w in wanted}
    before: dict[str, Previous] = {}
    for want in wanted:
        target = root / want.path.lstrip("/")
        if differs(target, want):
            before[want.path] = snapshot(target)
            write(target, want.content, want.mode, *ids(want.owner, want.group))
    for path in installed_before:
        target = root / path.lstrip("/")
        if path not in wanted_paths and target.exists():
            before[path] = snapshot(target)
            target.unlink()

    changed = sorted(before)
    touched = [s for s in doc["services"] if any(owns(s, p) for p in changed)]
    for service in touched:
        for command in [*service.get("prepare", []), *service.get("check", [])]:
            result = run(command, env)
            if result.returncode != 0:
                restore(root, before)
                raise RuntimeError(
                    f"service {service['name']}: `{command}` failed (exit {result.returncode}); "
                    f"the previous files are back in place and nothing was reloaded.\n"
                    f"{result.stdout[-3000:]}{result.stderr[-3000:]}"
                )
    reloaded = []
    for service in touched:
        if service.get("reload"):
            result = run(service["reload"], env)
            if result.returncode != 0:
                raise RuntimeError(
                    f"service {service['name']}: `{service['reload']}` failed (exit {result.returncode}) "
                    f"after its checks passed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
                )
            reloaded.append(service["name"])
    state_file.parent.mkdir(parents=True, exist_ok=True)
    write(state_file, json.dumps({"files": sorted(wanted_paths)}).encode(), 0o600, 0, 0)
    return {"changed": changed, "reloaded": reloaded, "installed": installed, "removed_packages": purged}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Converge this server to a mailroom bundle read on stdin.")
    parser.add_argument("--root", type=Path, default=Path("/"), help="apply under this directory instead of /")
    args = parser.parse_args(argv)
    try:
        doc = parse(sys.stdin.read())
    except BundleError as exc:
        print(f"mailroom apply: refused: {exc}", file=sys.stderr)
        return 2
    try:
        summary = apply(doc, args.root)
    except RuntimeError as exc:
        print(f"mailroom apply: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
