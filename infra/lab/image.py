"""The lab host's root filesystem: Debian 12 with the whole mail stack, built once and cached.

The image holds every package any mode needs (both spam filters, webmail), because the lab
host has no internet: a mode switch must find its packages installed, as cloud-init would have
installed them on a droplet. The cache key is the package list; a new list builds a new image.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from infra.core.modes import debconf_selections, every_package

CACHE = Path(os.environ.get("MAILROOM_LAB_CACHE", "/var/cache/mailroom-lab"))
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
APT_SOURCES = Path("/etc/apt/sources.list.d")
# What a Debian cloud image has and the minimal debootstrap variant lacks.
SYSTEM = (
    "systemd", "systemd-sysv", "dbus", "openssh-server", "cloud-init", "python3", "python3-cffi-backend",
    "locales", "sudo", "iproute2", "ca-certificates", "openssl", "procps", "cron", "less", "psmisc",
)  # fmt: skip
MAIL_STACK = (*every_package(), "php-cli")
# The install questions' answers, as cloud-init's bootcmd and the apply script give them first.
PRESEED = debconf_selections()


def configured_mirror() -> str:
    """The Debian mirror this machine's apt uses (the only way out to the registry here)."""
    candidates = sorted(APT_SOURCES.glob("*.sources")) if APT_SOURCES.is_dir() else []
    for sources in candidates:
        for stanza in sources.read_text().split("\n\n"):
            fields = dict(line.split(":", 1) for line in stanza.splitlines() if ":" in line and line[0] != "#")
            uris = fields.get("URIs", "").split()
            if uris and SUITE in fields.get("Suites", "").split() and "security" not in uris[0]:
                return uris[0].rstrip("/")
    legacy = Path("/etc/apt/sources.list")
    for line in legacy.read_text().splitlines() if legacy.exists() else []:
        words = line.split()
        if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
            return words[1].rstrip("/")
    return DEFAULT_MIRROR


def in_use(image: Path) -> bool:
    """Is IMAGE the lower layer of a mounted overlay (a lab host running on it right now)?"""
    mounts = Path("/proc/self/mountinfo").read_text()
    return f"lowerdir={image}," in mounts or f"lowerdir={image}/root," in mounts


def mounts_below(path: Path) -> list[Path]:
    """Mount points at or below PATH, deepest first (mountinfo's fifth field; octal escapes kept)."""
    points = [Path(line.split()[4]) for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    below = [p for p in points if p == path or path in p.parents]
    return sorted(below, key=lambda p: len(p.parts), reverse=True)


def remove_image(directory: Path) -> None:
    """Remove a cached image, first unmounting what an interrupted build left bound into it (the
    build binds /proc, /sys and /dev: removing through them would reach the machine's own)."""
    for point in mounts_below(directory):
        subprocess.run(["umount", "-l", str(point)], check=False)
    left = mounts_below(directory)
    if left:
        raise RuntimeError(f"cannot remove the stale lab image {directory}: still mounted at {left}")
    shutil.rmtree(directory)


def image_key() -> str:
    listing = "\n".join([SUITE, *SYSTEM, *MAIL_STACK, *PRESEED])
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def image_root() -> Path:
    return CACHE / image_key() / "root"


def _chroot(root: Path, *argv: str, stdin: str | None = None) -> None:
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    subprocess.run(["chroot", str(root), *argv], check=True, env=env, stdout=subprocess.DEVNULL, input=stdin, text=True)


def build_image(log: bool = True) -> Path:
    """The cached root, built first if missing (≈ 3 to 5 minutes on a fresh machine).

    One build at a time: two labs (MAILROOM_LAB_NAME) share the cache, and a second build would
    take the first one's half-built image for a stale one and remove it."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_image(log)


def _build_image(log: bool) -> Path:
    root = image_root()
    if (root.parent / "complete").exists():
        return root
    if CACHE.exists():
        for stale in CACHE.iterdir():  # older package lists, and a half-built image
            if stale.is_dir() and not in_use(stale / "root"):  # a running lab keeps its image until it is down
                remove_image(stale)
    root.parent.mkdir(parents=True)
    if log:
        print(f"lab: building the host image in {root} (once; cached by its package list)", flush=True)
    mirror = configured_mirror()
    subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={','.join(SYSTEM)}", SUITE, str(root), mirror],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    # Packages must not start daemons inside the build chroot.
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    (root / "etc/apt/sources.list").write_text(f"deb {mirror} {SUITE} main\n")
    for mount in ("proc", "sys", "dev"):
        subprocess.run(["mount", "--bind", f"/{mount}", str(root / mount)], check=True)
    try:
        _chroot(root, "apt-get", "update", "-qq")
        _chroot(root, "debconf-set-selections", stdin="".join(f"{line}\n" for line in PRESEED))
        _chroot(root, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *MAIL_STACK)
    finally:
        for mount in ("dev", "sys", "proc"):
            subprocess.run(["umount", "-l", str(root / mount)], check=False)
    policy.unlink()
    # Locales cloud-init expects; the package copied the build machine's name into Postfix.
    (root / "etc/locale.gen").write_text("en_US.UTF-8 UTF-8\nC.UTF-8 UTF-8\n")
    _chroot(root, "locale-gen")
    _chroot(root, "postconf", "-e", "myhostname=localhost")
    # The downloaded packages stay in apt's cache: a mode switch re-installs from it, offline.
    (root / "etc/machine-id").write_text("")
    (root.parent / "complete").write_text(image_key() + "\n")
    return root
