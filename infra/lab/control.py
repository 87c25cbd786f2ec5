"""The lab: `pulumi up` rehearsed on this machine.

`up(stack)` evaluates the program for the stack under mocks (infra.tools.rehearsal), boots a fresh
Debian 12 host with systemd-nspawn from the droplet's own rendered user-data (a NoCloud seed),
stands in for the outside world in a second network namespace (DNS serving the records the
program computes, SES's SMTP endpoint, Cloudflare's API for certbot, pebble as the ACME CA),
then runs the program's own remote commands over SSH with the program's own deploy key. Nothing
reaches the server by a lab-only path.

Addresses are documentation ranges only (203.0.113.0/24, 2001:db8::/32), in namespaces the lab
creates; `down()` removes every namespace, link, mount and process it made.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dns.reversename

from infra.core.dns import zone_file
from infra.core.facts import ses_smtp_endpoint
from infra.core.steps import Step
from infra.core.user_data import volume_device
from infra.lab import acme
from infra.lab.image import build_image
from infra.lab.netns import call_in
from infra.lab.pki import IssuedCertificate, LabCA
from infra.tools.rehearsal import (
    DROPLET_IPV4,
    DROPLET_IPV6,
    OfflineRun,
    generated_state,
    remote_steps,
    restore_generated,
    run_program,
)

# One lab per name: MAILROOM_LAB_NAME gives a second lab its own namespaces, state and cgroup,
# so two can run side by side (the addresses repeat, but each pair of namespaces is its own net).
NAME = os.environ.get("MAILROOM_LAB_NAME", "mrlab")
STATE_DIR = Path(os.environ.get("MAILROOM_LAB_STATE", f"/var/lib/mailroom-lab/{'run' if NAME == 'mrlab' else NAME}"))
HOST_NS, WORLD_NS = f"{NAME}-host", f"{NAME}-world"
HOST_LINK, WORLD_LINK = f"{NAME}-h", f"{NAME}-w"
WORLD_IPV4, WORLD_IPV6 = "203.0.113.1", "2001:db8:10::1"
DNS_IP, SES_IP, REMOTE_IP = "203.0.113.53", "203.0.113.20", "203.0.113.30"
ACME_IP, CLOUDFLARE_IP = "203.0.113.14", "203.0.113.16"  # pebble; the Cloudflare API stand-in
CLOUDFLARE_API = "api.cloudflare.com"  # where certbot's dns-cloudflare plugin sends its calls
REMOTE_DOMAIN = "example.com"  # the outside correspondent's domain, served by the lab DNS
MACHINE = "mailroom-lab" if NAME == "mrlab" else f"mailroom-lab-{NAME}"
LAB_PASSWORD_USERS = 2


class LabError(RuntimeError):
    pass


@dataclass
class LabInfo:
    stack: str
    overrides: dict[str, Any]
    host: str
    admin_user: str
    key_file: str
    passwords: dict[str, str]
    ses_user: str
    ses_spool: str
    dns: str
    zone: str
    steps: list[dict[str, Any]]

    def save(self) -> None:
        secret_file("lab.json", json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls) -> LabInfo:
        return cls(**json.loads((STATE_DIR / "lab.json").read_text()))


def sh(*argv: str, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(argv[:6])}: exit {result.returncode}: {result.stderr.strip()[-800:]}")
    return result


# Running code inside a namespace (the tests' clients, the benchmarks' probes).
in_netns = call_in


# --- the network -------------------------------------------------------------------------


def check_routes() -> None:
    """Refuse to start if the lab's ranges already route somewhere on this machine."""
    routes = sh("ip", "route").stdout + sh("ip", "-6", "route").stdout
    for prefix in ("203.0.113.", "2001:db8:10:"):
        if prefix in routes:
            raise LabError(f"{prefix}x is already routed on this machine; is another lab running? (lab down)")


def create_network() -> None:
    check_routes()
    for ns in (HOST_NS, WORLD_NS):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "link", "add", HOST_LINK, "type", "veth", "peer", "name", WORLD_LINK)
    sh("ip", "link", "set", HOST_LINK, "netns", HOST_NS)
    sh("ip", "link", "set", WORLD_LINK, "netns", WORLD_NS)
    sh("ip", "-n", HOST_NS, "link", "set", HOST_LINK, "name", "eth0")
    sh("ip", "-n", HOST_NS, "addr", "add", f"{DROPLET_IPV4}/24", "dev", "eth0")
    sh("ip", "-n", HOST_NS, "addr", "add", f"{DROPLET_IPV6}/64", "dev", "eth0", "nodad")
    sh("ip", "-n", HOST_NS, "link", "set", "eth0", "up")
    sh("ip", "-n", HOST_NS, "route", "add", "default", "via", WORLD_IPV4)
    for address in (WORLD_IPV4, DNS_IP, SES_IP, REMOTE_IP, ACME_IP, CLOUDFLARE_IP):
        sh("ip", "-n", WORLD_NS, "addr", "add", f"{address}/24", "dev", WORLD_LINK)
    sh("ip", "-n", WORLD_NS, "addr", "add", f"{WORLD_IPV6}/64", "dev", WORLD_LINK, "nodad")
    sh("ip", "-n", WORLD_NS, "link", "set", WORLD_LINK, "up")


# --- the world's PKI, as far as the host is concerned ----------------------------------------


def make_certificates(run: OfflineRun) -> dict[str, IssuedCertificate]:
    """A lab CA (the host trusts it, as a droplet trusts public CAs) and a certificate for each
    outside server the host reaches by name."""
    ca = LabCA(STATE_DIR / "pki")
    return {
        "ses": ca.issue("ses", [ses_smtp_endpoint(run.settings.ses_region)]),
        "cloudflare": ca.issue("cloudflare", [CLOUDFLARE_API]),
        "acme": ca.issue("acme", [acme.ACME_NAME], [ACME_IP]),
    }


def trusted_roots() -> dict[str, Path]:
    """What the host trusts besides its distribution's roots: the lab CA, and pebble's root
    (standing in for Let's Encrypt's, which ca-certificates carries)."""
    pki = STATE_DIR / "pki"
    return {"mailroom-lab-ca": pki / "lab-ca.crt", "mailroom-lab-acme-root": pki / "pebble-root.crt"}


# --- the program, run as pulumi up would run it ---------------------------------------------


def lab_passwords(run_settings_addresses: list[str]) -> dict[str, str]:
    import secrets

    return {address: secrets.token_urlsafe(12) for address in run_settings_addresses}


def password_hash(password: str) -> str:
    result = sh("doveadm", "pw", "-s", "BLF-CRYPT", "-p", password)
    return result.stdout.strip()


def evaluate(stack: str, overrides: Mapping[str, Any]) -> tuple[OfflineRun, dict[str, str]]:
    """The program for the stack, with lab passwords (real hashes) in place of stand-ins."""
    from infra.core.stack import stack_config

    addresses = [line.split()[0] for line in stack_config(stack, overrides).get("mailboxes", [])]
    passwords = lab_passwords(addresses)
    hashes = [f"{a} {password_hash(p)}" for a, p in passwords.items()]
    run = run_program(stack, {**overrides, "passwordHashes": hashes})
    return run, passwords


def lab_hashes(run: OfflineRun) -> list[str]:
    """The hashes a run was given, to give the same ones again (a new salt would be a change)."""
    return [f"{b.address} {b.password_hash.reveal()}" for b in run.settings.mailboxes]


def lab_zone(run: OfflineRun) -> str:
    """Exactly the program's records for the lab's facts, plus the few outside names."""
    facts = run.facts()
    s = run.settings
    outside = [
        # The stand-in root: the host's unbound primes from it (a root with no NS is lame to it).
        ". 3600 IN NS lab-root.",
        f"lab-root. 3600 IN A {DNS_IP}",
        f"{ses_smtp_endpoint(s.ses_region)}. 300 IN A {SES_IP}",
        f"{CLOUDFLARE_API}. 300 IN A {CLOUDFLARE_IP}",
        f"{acme.ACME_NAME}. 300 IN A {ACME_IP}",
        f"{REMOTE_DOMAIN}. 300 IN A {REMOTE_IP}",
        f"{REMOTE_DOMAIN}. 300 IN MX 10 mx.{REMOTE_DOMAIN}.",
        f"mx.{REMOTE_DOMAIN}. 300 IN A {REMOTE_IP}",
        f'{REMOTE_DOMAIN}. 300 IN TXT "v=spf1 ip4:{REMOTE_IP} -all"',
        f'_dmarc.{REMOTE_DOMAIN}. 300 IN TXT "v=DMARC1; p=reject"',
        f'amazonses.com. 300 IN TXT "v=spf1 ip4:{SES_IP} -all"',
        # DigitalOcean names both of the droplet's addresses after it.
        f"{dns.reversename.from_address(DROPLET_IPV4)} 300 IN PTR {s.host_name}.",
        f"{dns.reversename.from_address(DROPLET_IPV6)} 300 IN PTR {s.host_name}.",
        f"{dns.reversename.from_address(REMOTE_IP)} 300 IN PTR mx.{REMOTE_DOMAIN}.",
    ]
    return zone_file(s, facts) + "\n".join(outside) + "\n"


# --- the host -------------------------------------------------------------------------------


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
                   "stdout": result.stdout.strip()[-2000:], "stderr": result.stderr.strip()[-2000:]}  # fmt: skip
        results.append(outcome)
        if result.returncode != 0:
            raise LabError(f"remote command {step.name} failed (exit {result.returncode}):\n{outcome['stderr']}")
    return results


def _world_process(name: str, argv: list[str]) -> subprocess.Popen[bytes]:
    log = (STATE_DIR / f"{name}.log").open("wb")
    return subprocess.Popen(["ip", "netns", "exec", WORLD_NS, *argv], stdout=subprocess.DEVNULL, stderr=log)


def secret_file(name: str, value: str) -> Path:
    """STATE_DIR/NAME holding VALUE, readable by root only from before it holds anything."""
    path = STATE_DIR / name
    path.write_text("")
    path.chmod(0o600)
    path.write_text(value)
    return path


def start_world(run: OfflineRun, certificates: Mapping[str, IssuedCertificate]) -> tuple[str, str]:
    """DNS, SES, the Cloudflare API and pebble, each on its own world address."""
    zone = STATE_DIR / "zone.db"
    zone.write_text(lab_zone(run))
    module = [sys.executable, "-m", "infra.lab.world"]
    api_dir = STATE_DIR / "cloudflare"
    processes = {"dns": _world_process("dns", [*module, "dns", str(zone), DNS_IP, str(api_dir / "records.zone")])}
    ses_user = str(run.outputs.get("sesSmtpUsername", ""))
    ses = certificates["ses"]
    processes["ses"] = _world_process("ses", [
        *module, "ses", str(STATE_DIR / "ses"), SES_IP, ses_smtp_endpoint(run.settings.ses_region), ses_user,
        str(secret_file("ses-password", str(run.outputs.get("sesSmtpPassword", "")))),
        str(ses.certificate), str(ses.key),
    ])  # fmt: skip
    api = certificates["cloudflare"]
    processes["cloudflare"] = _world_process("cloudflare", [
        *module, "cloudflare", str(api_dir), CLOUDFLARE_IP, run.settings.domain,
        str(secret_file("cloudflare-token", str(run.outputs.get("certbotToken", "")))),
        str(api.certificate), str(api.key),
    ])  # fmt: skip
    config = acme.write_config(STATE_DIR / "pebble.json", ACME_IP, certificates["acme"])
    processes["acme"] = _world_process("acme", acme.argv(config, DNS_IP))
    (STATE_DIR / "world.json").write_text(json.dumps({k: p.pid for k, p in processes.items()}))
    acme.fetch_root(WORLD_NS, ACME_IP, STATE_DIR / "pki/lab-ca.crt", trusted_roots()["mailroom-lab-acme-root"])
    return ses_user, str(zone)


def up(stack: str = "dev", overrides: Mapping[str, Any] | None = None) -> LabInfo:
    if (STATE_DIR / "lab.json").exists() or Path(f"/run/netns/{HOST_NS}").exists():
        raise LabError("a lab is already up; run `python -m infra lab down` first")
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    STATE_DIR.chmod(0o700)
    # The one setting the lab must change: certificates come from pebble, not Let's Encrypt.
    overrides = {**(overrides or {}), "acmeServer": acme.directory_url(), "caaIssuer": acme.CAA_DOMAIN}
    run, passwords = evaluate(stack, overrides)
    build_image()
    keep_state()
    try:
        create_network()
        ses_user, zone = start_world(run, make_certificates(run))
        key_file = secret_file("deploy-key", run.named("deploy-key").state["privateKeyOpenssh"])
        user_data = run.one("digitalocean:index/droplet:Droplet").inputs["userData"]
        (STATE_DIR / "user-data").write_text(user_data)
        (STATE_DIR / "volume-path").write_text(volume_device(run.settings))
        boot_host(user_data, trusted_roots(), volume_device(run.settings))
        steps = remote_steps(run)
        info = LabInfo(stack, {**overrides, "passwordHashes": lab_hashes(run)}, DROPLET_IPV4, run.settings.admin_user,
                       str(key_file), passwords, ses_user, str(STATE_DIR / "ses"), DNS_IP, zone, [])  # fmt: skip
        info.save()
        wait_for_ssh()
        info.steps = [{k: v for k, v in r.items() if k != "stdin"} for r in run_steps(info, steps)]
        info.save()
        secret_file("steps.json", json.dumps([asdict(s) for s in steps]))
        return info
    except BaseException:
        if not os.environ.get("MAILROOM_LAB_KEEP"):  # keep a failed lab up to look at it
            down()
        raise


def keep_state() -> None:
    """What Pulumi's state would keep between runs: the keys and passwords the mocks generated."""
    secret_file("pulumi-state.json", json.dumps(generated_state()))


def restore_state() -> None:
    state = STATE_DIR / "pulumi-state.json"
    restore_generated(json.loads(state.read_text()) if state.exists() else [])


def redeploy(changes: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run the program again, with the lab's settings plus CHANGES, and its remote commands."""
    info = LabInfo.load()
    restore_state()
    run = run_program(info.stack, {**info.overrides, **(changes or {})})
    keep_state()
    return run_steps(info, remote_steps(run))


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


def replace_host() -> list[dict[str, Any]]:
    """What replacing the droplet does: a new machine from the same user-data, attached to the
    same volume, then the program's remote commands (all of them: the server id changed)."""
    stop_host()
    boot_host((STATE_DIR / "user-data").read_text(), trusted_roots(), (STATE_DIR / "volume-path").read_text())
    wait_for_ssh()
    return redeploy()


def guest(command: str, info: LabInfo | None = None) -> subprocess.CompletedProcess[str]:
    """A command on the lab host as its administrator (through sudo where it needs root)."""
    info = info or LabInfo.load()
    return subprocess.run(ssh_argv(info, command), capture_output=True, text=True, check=False, timeout=300)


def leftovers() -> list[str]:
    """What of this lab still exists on the machine: nothing, after `down`."""
    found = []
    namespaces = {line.split()[0] for line in sh("ip", "netns", "list", check=False).stdout.splitlines() if line}
    found += [f"network namespace {ns}" for ns in (HOST_NS, WORLD_NS) if ns in namespaces]
    found += [f"link {HOST_LINK}"] if sh("ip", "link", "show", HOST_LINK, check=False).returncode == 0 else []
    found += [f"state directory {STATE_DIR}"] if STATE_DIR.exists() else []
    state = str(STATE_DIR) + "/"
    loops = sh("losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE", check=False).stdout.splitlines()
    found += [f"loop device {line.split()[0]}" for line in loops if state in line]
    mounts = sh("findmnt", "--raw", "--noheadings", "--output", "TARGET", check=False).stdout.splitlines()
    found += [f"mount {m}" for m in mounts if m.startswith(state)]
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if state in argv or f"/run/netns/{HOST_NS}" in argv:
                found.append(f"process {proc.name}: {argv[:120]}")
    return found


def down() -> None:
    """Remove every process, mount, namespace and link the lab made; safe to call twice."""
    stop_host()
    world = STATE_DIR / "world.json"
    if world.exists():
        for pid in json.loads(world.read_text()).values():
            subprocess.run(["pkill", "-TERM", "-P", str(pid)], check=False)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        world.unlink()
    for ns in (HOST_NS, WORLD_NS):
        leftover = sh("ip", "netns", "pids", ns, check=False).stdout.split()
        for leftover_pid in leftover:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(leftover_pid), signal.SIGKILL)
    loop = STATE_DIR / "volume.loop"
    if loop.exists():
        sh("losetup", "-d", loop.read_text().strip(), check=False)
    for ns in (HOST_NS, WORLD_NS):
        sh("ip", "netns", "delete", ns, check=False)
    sh("ip", "link", "delete", HOST_LINK, check=False)
    if STATE_DIR.exists():
        shutil.rmtree(STATE_DIR, ignore_errors=True)
    for hierarchy in ("systemd", "unified"):
        group = Path("/sys/fs/cgroup") / hierarchy / MACHINE
        if group.exists():
            with contextlib.suppress(OSError):
                group.rmdir()
