"""The lab host: a fresh copy of the cached Debian 12 root, booted with systemd-nspawn.

It gets what the droplet gets from DigitalOcean and nothing more:
- the rendered user-data, verbatim, as a NoCloud seed (DigitalOcean's metadata service is the
  ConfigDrive/DigitalOcean datasource; the lab names the NoCloud one, with the same effect);
- its public addresses on eth0 (the namespace is configured from outside, as DigitalOcean's
  network is; cloud-init's network module is switched off);
- the mail volume as a real block device at /dev/disk/by-id/scsi-0DO_Volume_<name> (a loop
  device on a sparse file), empty on the first boot, so cloud-init's fs_setup formats it;
- a resolver (the lab's DNS) and the outside world's CAs in its trust store (the lab CA for the
  SES stand-in and the ACME endpoint, pebble's root for the certificates it issues).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from infra.lab.ledger import Ledger

SEED_DIR = "var/lib/cloud/seed/nocloud"
CA_DIR = "usr/local/share/ca-certificates"
# Smaller than any stack's volume: the size changes nothing the lab proves, a sparse file
# keeps it cheap, and ext4's lazy inode-table init writes little.
VOLUME_BYTES = 1024**3
CGROUP_ROOT = Path("/sys/fs/cgroup")


class HostError(RuntimeError):
    pass


@dataclass(frozen=True)
class BootedHost:
    nspawn_pid: int
    init_pid: int  # the guest's systemd, as seen from this machine (for nsenter)
    root: Path
    volume_device: str  # the loop device standing in for the DigitalOcean volume
    console_log: Path


def _run(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise HostError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()[-800:]}")
    return result.stdout


def mount_fresh_root(image: Path, state_dir: Path, ledger: Ledger) -> Path:
    """An overlay whose read-only lower layer is the cached image: every run starts clean."""
    upper, work, root = state_dir / "upper", state_dir / "work", state_dir / "root"
    for directory in (upper, work, root):
        directory.mkdir(parents=True, exist_ok=True)
    _run("mount", "-t", "overlay", "overlay", "-o", f"lowerdir={image},upperdir={upper},workdir={work}", str(root))
    ledger.add("mount", str(root))
    return root


def write_seed(root: Path, user_data: str, instance_id: str, local_hostname: str) -> None:
    seed = root / SEED_DIR
    seed.mkdir(parents=True, exist_ok=True)
    # Byte for byte what the droplet receives: no lab line is added to the user-data.
    (seed / "user-data").write_text(user_data)
    (seed / "meta-data").write_text(f"instance-id: {instance_id}\nlocal-hostname: {local_hostname}\n")
    (root / "etc/cloud/cloud.cfg.d/90-mailroom-lab.cfg").write_text(
        "# mailroom lab: the NoCloud seed stands in for DigitalOcean's metadata service, and the\n"
        "# lab configures eth0 from outside, as DigitalOcean's network does.\n"
        "datasource_list: [NoCloud, None]\n"
        "network: {config: disabled}\n"
    )


def point_resolver(root: Path, dns_ipv4: str) -> None:
    """The host asks the lab DNS, which also stands in for the internet's root servers."""
    resolv = root / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.write_text(f"# mailroom lab: the outside world's DNS\nnameserver {dns_ipv4}\n")
    # When the server's own unbound iterates from the root, it reaches the lab DNS. The stand-in
    # root is not DNSSEC-signed, so validation is off in the lab: the one line that differs.
    unbound = root / "etc/unbound"
    if unbound.is_dir():
        (unbound / "lab-root.hints").write_text(f".  3600000 IN NS lab-root.\nlab-root. 3600000 IN A {dns_ipv4}\n")
        (unbound / "unbound.conf.d").mkdir(exist_ok=True)
        (unbound / "unbound.conf.d/lab-root.conf").write_text(
            "# mailroom lab: its DNS stands in for the (unsigned) root servers\n"
            'server:\n  root-hints: /etc/unbound/lab-root.hints\n  module-config: "iterator"\n'
        )


def name_mail_system(root: Path, host_name: str) -> None:
    """What Postfix's package asks debconf at install time on the droplet: the mail name. The
    image installed it on the build machine (myhostname was reset to localhost there)."""
    (root / "etc/mailname").write_text(host_name + "\n")
    main_cf = root / "etc/postfix/main.cf"
    if main_cf.exists():
        lines = main_cf.read_text().splitlines()
        lines = [f"myhostname = {host_name}" if line.startswith("myhostname =") else line for line in lines]
        main_cf.write_text("\n".join(lines) + "\n")


def trust(root: Path, certificates: dict[str, Path]) -> None:
    """Install CA certificates (name -> PEM file) into the guest's system trust store."""
    target = root / CA_DIR
    target.mkdir(parents=True, exist_ok=True)
    for name, pem in certificates.items():
        shutil.copy(pem, target / f"{name}.crt")
    _run("chroot", str(root), "update-ca-certificates")


def attach_volume(state_dir: Path, ledger: Ledger, size: int = VOLUME_BYTES) -> str:
    """A loop device on a new sparse file: an unformatted DigitalOcean volume."""
    image = state_dir / "volume.img"
    with image.open("wb") as sparse:
        sparse.truncate(size)
    device = _run("losetup", "--find", "--show", str(image)).strip()
    ledger.add("loop", device)
    return device


def _own_cgroups(name: str, ledger: Ledger) -> list[Path]:
    """nspawn without a host systemd makes its supervisor/payload groups under its own cgroup;
    started from a shared one, two instances would share them. Each lab host gets its own."""
    groups = []
    for hierarchy in ("systemd", "unified"):
        parent = CGROUP_ROOT / hierarchy
        if parent.is_dir():
            group = parent / f"mailroom-lab-{name}"
            group.mkdir(exist_ok=True)
            ledger.add("cgroup", str(group))
            groups.append(group)
    return groups


def boot(
    root: Path,
    name: str,
    netns: str,
    volume_device: str,
    volume_path: str,
    state_dir: Path,
    ledger: Ledger,
    extra_options: Sequence[str] = (),
) -> BootedHost:
    groups = _own_cgroups(name, ledger)

    def enter_own_cgroups() -> None:  # runs in the child, before exec
        for group in groups:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    console_log = state_dir / "console.log"
    argv = [
        "systemd-nspawn", "-D", str(root), "-b",
        "--register=no", "--keep-unit", f"--network-namespace-path=/run/netns/{netns}",
        "--console=passive", "-M", f"{name}-host",
        # The droplet's root may manage its firewall (fail2ban bans through nftables).
        "--capability=CAP_NET_ADMIN",
        # The guest keeps its own resolv.conf, clock zone and journal, as a droplet does.
        "--resolv-conf=off", "--timezone=off", "--link-journal=no",
        f"--bind={volume_device}:{volume_path}",
        *extra_options,
    ]  # fmt: skip
    with console_log.open("wb") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=enter_own_cgroups,  # must run between fork and exec
        )
    ledger.add_process(process.pid)
    init_pid = _wait_for_init(process, console_log)
    return BootedHost(process.pid, init_pid, root, volume_device, console_log)


def _wait_for_init(process: subprocess.Popen[bytes], console_log: Path, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise HostError(f"systemd-nspawn exited with {process.returncode}: {console_log.read_text()[-1500:]}")
        pids = children.read_text().split() if children.exists() else []
        for pid in pids:
            if Path(f"/proc/{pid}/exe").resolve().name == "systemd":
                return int(pid)
        time.sleep(0.05)
    raise HostError(f"the guest's systemd did not start within {timeout:.0f} s; see {console_log}")


def guest_argv(init_pid: int, *argv: str) -> list[str]:
    """Run a command inside the guest as its root, without SSH (for the lab's own checks)."""
    return ["nsenter", "-t", str(init_pid), "-m", "-u", "-i", "-n", "-p", "--", *argv]


def in_guest(init_pid: int, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(guest_argv(init_pid, *argv), capture_output=True, text=True, check=False, timeout=timeout)


def wait_for_cloud_init(init_pid: int, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`cloud-init status --wait --long`; its exit code says done (0) or error (1), as on a droplet."""
    deadline = time.monotonic() + timeout
    while True:
        result = in_guest(init_pid, "cloud-init", "status", "--wait", "--long", timeout=timeout)
        # Right after boot the guest's /run may not be ready for cloud-init's status file yet.
        if "status: not run" not in result.stdout or time.monotonic() > deadline:
            return result
        time.sleep(0.5)
