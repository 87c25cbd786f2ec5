"""The lab's host: a fresh Debian 12 machine under systemd-nspawn, booted as a droplet boots.

It runs in the host namespace from the droplet's own user-data (a NoCloud seed), with the lab's
volume (a loop device) where DigitalOcean attaches one, in a cgroup of its own. The program's
remote commands reach it over SSH from the world namespace, as from the internet.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from infra.core.steps import Step
from infra.lab.image import build_image
from infra.lab.network import DNS_IP, HOST_NS, WORLD_NS, in_netns
from infra.lab.state import NAME, STATE_DIR, LabError, LabInfo, sh
from infra.tools.rehearsal import DROPLET_IPV4

MACHINE = "mailroom-lab" if NAME == "mrlab" else f"mailroom-lab-{NAME}"


def _own_cgroup() -> None:
    """nspawn without a host systemd shares its supervisor cgroups between instances: not ours."""
    for hierarchy in ("systemd", "unified"):
        group = Path("/sys/fs/cgroup") / hierarchy / MACHINE
        if group.parent.exists():
            group.mkdir(exist_ok=True)
            (group / "cgroup.procs").write_text(str(os.getpid()))


# Smaller than any stack's volume: the size changes nothing the lab proves, and a sparse file
# keeps it cheap. The fault tests fill it up.
VOLUME_BYTES = 512 * 1024**2
# `reboot` inside the guest makes systemd-nspawn exit with 133: starting it again is the reboot.
REBOOT_EXIT = 133


def attach_volume() -> str:
    """A loop device on a sparse file: the DigitalOcean volume, empty until cloud-init formats it.
    It outlives the host (a replaced host gets the same one) and goes only with `down`."""
    record = STATE_DIR / "volume.loop"
    if record.exists():
        return record.read_text().strip()
    image = STATE_DIR / "volume.img"
    with image.open("wb") as sparse:
        sparse.truncate(VOLUME_BYTES)
    device = sh("losetup", "--find", "--show", str(image)).stdout.strip()
    record.write_text(device)
    return device


def prepare_root(user_data: str, roots: Mapping[str, Path]) -> Path:
    """A fresh overlay over the cached image, seeded as DigitalOcean seeds a new droplet."""
    image = build_image()
    for part in ("upper", "work", "root"):
        shutil.rmtree(STATE_DIR / part, ignore_errors=True)
        (STATE_DIR / part).mkdir(parents=True)
    root = STATE_DIR / "root"
    sh("mount", "-t", "overlay", "overlay", "-o",
       f"lowerdir={image},upperdir={STATE_DIR / 'upper'},workdir={STATE_DIR / 'work'}", str(root))  # fmt: skip
    seed = root / "var/lib/cloud/seed/nocloud"
    seed.mkdir(parents=True, exist_ok=True)
    (seed / "user-data").write_text(user_data)
    # A new instance id is a new droplet to cloud-init: it runs the whole user-data again.
    (seed / "meta-data").write_text(f"instance-id: {MACHINE}-{time.time_ns()}\nlocal-hostname: {MACHINE}\n")
    (root / "etc/cloud/cloud.cfg.d/90-mailroom-lab.cfg").write_text(
        "# The lab stands in for DigitalOcean's metadata service and network configuration.\n"
        "datasource_list: [NoCloud, None]\nnetwork: {config: disabled}\n"
    )
    resolv = root / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.write_text(f"nameserver {DNS_IP}\n")
    # The lab DNS stands in for the internet's root servers too, so the host's own recursive
    # resolver (unbound, from the bundle) gets answers instead of timing out. That stand-in root
    # is not DNSSEC-signed, so validation is off in the lab (the one line that differs).
    (root / "etc/unbound/lab-root.hints").write_text(f".  3600000 IN NS lab-root.\nlab-root. 3600000 IN A {DNS_IP}\n")
    (root / "etc/unbound/unbound.conf.d/lab-root.conf").write_text(
        "# the mailroom lab: its DNS stands in for the (unsigned) root servers\n"
        'server:\n  root-hints: /etc/unbound/lab-root.hints\n  module-config: "iterator"\n'
    )
    for name, path in roots.items():
        shutil.copy(path, root / f"usr/local/share/ca-certificates/{name}.crt")
    sh("chroot", str(root), "update-ca-certificates")
    return root


def boot_host(user_data: str, roots: Mapping[str, Path], volume_path: str) -> subprocess.Popen[bytes]:
    """Boot a new host from USER_DATA with the lab's volume at VOLUME_PATH (where DigitalOcean
    puts an attached volume). A guest `reboot` boots the same root again, as a droplet would."""
    root = prepare_root(user_data, roots)
    device = attach_volume()
    nspawn = [
        "systemd-nspawn", "-D", str(root), "-b", "--register=no", "--keep-unit",
        f"--network-namespace-path=/run/netns/{HOST_NS}", "--console=passive", "-M", MACHINE,
        # The droplet's root manages its own firewall (fail2ban bans through nftables).
        "--capability=CAP_NET_ADMIN",
        "--resolv-conf=off", "--timezone=off", "--link-journal=no",
        f"--bind={device}:{volume_path}",
    ]  # fmt: skip
    supervisor = f'while :; do "$@"; rc=$?; [ "$rc" -eq {REBOOT_EXIT} ] || exit "$rc"; done'
    log = (STATE_DIR / "console.log").open("ab")
    process = subprocess.Popen(
        ["sh", "-c", supervisor, "nspawn", *nspawn],
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=_own_cgroup,  # nspawn must start in its own cgroup
    )
    (STATE_DIR / "nspawn.pid").write_text(str(process.pid))
    return process


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for a parent that is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def stop_host(timeout: float = 30) -> None:
    """Shut the host down as DigitalOcean powers a droplet off: its systemd stops every daemon."""
    pid_file = STATE_DIR / "nspawn.pid"
    if not pid_file.exists():
        return
    supervisor = int(pid_file.read_text())
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children")
    nspawn = [int(p) for p in children.read_text().split()] if children.exists() else []
    with contextlib.suppress(ProcessLookupError):
        os.kill(supervisor, signal.SIGKILL)  # first, so that it does not boot the host again
    for pid in nspawn:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # nspawn shuts the guest's systemd down cleanly
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(supervisor, os.WNOHANG)
    pid_file.unlink()
    root = STATE_DIR / "root"
    if root.exists() and sh("findmnt", "-n", str(root), check=False).returncode == 0:
        sh("umount", "-R", str(root), check=False)
        if sh("findmnt", "-n", str(root), check=False).returncode == 0:
            sh("umount", "-l", str(root), check=False)


def wait_for_ssh(timeout: float = 120) -> None:
    import socket

    def reachable() -> bool:
        try:
            with socket.create_connection((DROPLET_IPV4, 22), timeout=2) as conn:
                return conn.recv(4).startswith(b"SSH")
        except OSError:
            return False

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if in_netns(WORLD_NS, reachable):
            return
        time.sleep(1)
    raise LabError(f"the lab host did not answer SSH within {timeout:.0f} s; see {STATE_DIR / 'console.log'}")


def ssh_argv(info: LabInfo, command: str) -> list[str]:
    return [
        "ip", "netns", "exec", WORLD_NS, "ssh", "-i", info.key_file, "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
        f"{info.admin_user}@{DROPLET_IPV4}", command,
    ]  # fmt: skip


def run_steps_result(info: LabInfo, step: Step) -> subprocess.CompletedProcess[str]:
    """One remote command, its result returned whatever it is (for tests of failures)."""
    return subprocess.run(ssh_argv(info, step.create), input=step.stdin or "", capture_output=True,
                          text=True, check=False, timeout=900)  # fmt: skip


def run_steps(info: LabInfo, steps: Sequence[Step]) -> list[dict[str, Any]]:
    """The program's remote commands, in order, as the command provider runs them: the create
    string through the remote shell, stdin piped. Output is reported, stdin never."""
    results = []
    for step in steps:
        started = time.monotonic()
        result = run_steps_result(info, step)
        outcome = {"name": step.name, "exit": result.returncode, "seconds": round(time.monotonic() - started, 1),
                   "stdout": result.stdout.strip()[-20000:], "stderr": result.stderr.strip()[-2000:]}  # fmt: skip
        results.append(outcome)
        if result.returncode != 0:
            raise LabError(f"remote command {step.name} failed (exit {result.returncode}):\n{outcome['stderr']}")
    return results


def reboot_host(info: LabInfo | None = None, timeout: float = 120) -> None:
    """`reboot` on the host, as an administrator would type it; back once SSH answers again."""
    info = info or LabInfo.load()
    guest("sudo systemctl reboot", info)
    deadline = time.monotonic() + timeout
    while guest("true", info).returncode == 0:  # still going down
        if time.monotonic() > deadline:
            raise LabError(f"the lab host did not go down within {timeout:.0f} s of `systemctl reboot`")
        time.sleep(0.5)
    wait_for_ssh(timeout)
    wait_for_boot(info, timeout)


def wait_for_boot(info: LabInfo, timeout: float = 120) -> None:
    """Until systemd says the boot finished (running, or degraded with a unit failed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = guest("systemctl is-system-running", info).stdout.strip()
        if state in ("running", "degraded"):
            return
        time.sleep(0.5)
    raise LabError(f"the lab host did not finish booting within {timeout:.0f} s")


def guest(command: str, info: LabInfo | None = None) -> subprocess.CompletedProcess[str]:
    """A command on the lab host as its administrator (through sudo where it needs root)."""
    info = info or LabInfo.load()
    return subprocess.run(ssh_argv(info, command), capture_output=True, text=True, check=False, timeout=300)
