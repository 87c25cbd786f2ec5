"""The lab's machinery: a Debian 12 host booted from a stack's rendered user-data, and the
outside world it talks to, on this machine. `up`, `down` and `status` are the whole interface;
what runs on the host afterwards (the program's remote commands) goes through `run_commands`.

    up(stack, overrides)  image (cached) -> namespaces -> world (DNS, SES, pebble, remote MX)
                          -> fresh overlay root + NoCloud seed + volume -> systemd-nspawn boot
                          -> `cloud-init status --wait` -> SSH as the administrator
    down()                undoes exactly what the ledger says was created, newest first
    status()              what is running, in plain words

Everything is named from the lab's NAME (namespaces NAME-host / NAME-world, state under
/var/lib/mailroom-lab/lab-NAME), so a test lab and a hand-made lab can run side by side.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import socket
import string
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from infra.bootstrap import MAIL_DIR, render_user_data, volume_device
from infra.lab import acme, host, network
from infra.lab.commands import CommandResult, Connection, LabCommand, run_command, run_commands
from infra.lab.image import build_image
from infra.lab.ledger import Ledger
from infra.lab.netns import argv_in, call_in, run_in
from infra.lab.pki import LabCA, dkim_key_pair, ssh_key_pair
from infra.records import Facts, dkim_public_key_body, zone_file
from infra.relay import smtp_endpoint
from infra.settings import PROJECT_DIR, Settings, parse_settings
from infra.stack import stack_config

DEFAULT_NAME = "mailroom"
STATE_ROOT = Path(os.environ.get("MAILROOM_LAB_STATE_ROOT", "/var/lib/mailroom-lab"))
REMOTE_DOMAIN = "example.com"  # the outside correspondent's domain, served by the lab DNS
REMOTE_MX_NAME = f"mx.{REMOTE_DOMAIN}"
SES_SUBMISSION_PORT, SMTP_PORT = 587, 25
SES_MODES = ("ok", "4xx", "5xx", "away")
WORLD_SERVICES = ("dns", "ses", "remote-mx", "acme")
READY_TIMEOUT_SECONDS = 60


class LabError(RuntimeError):
    pass


@dataclass
class LabInfo:
    """How to reach a running lab; saved (root-only) as STATE/lab.json."""

    name: str
    stack: str
    overrides: dict[str, Any]  # what the settings were read with (the lab's key and admin CIDRs)
    state_dir: str
    host_name: str
    host_ipv4: str
    host_ipv6: str
    admin_user: str
    private_key: str  # the administrator's SSH key (made for this lab run)
    public_key: str
    host_netns: str
    world_netns: str
    nspawn_pid: int
    init_pid: int
    volume_device: str  # loop device standing in for the DigitalOcean volume
    volume_path: str  # /dev/disk/by-id/scsi-0DO_Volume_<name> inside the host
    mail_dir: str
    dns_ipv4: str
    zone_file: str
    lab_ca: str  # PEM of the CA the host trusts for the SES stand-in and the ACME endpoint
    ses_endpoint: str
    ses_ipv4: str
    ses_username: str
    ses_password_file: str
    ses_spool: str
    acme_directory: str
    acme_root: str  # pebble's issuing root (trusted by the host)
    remote_domain: str
    remote_mx_ipv4: str
    remote_spool: str  # what the remote MX received
    client_ipv4: str
    dkim_private_key: str  # the key matching the DKIM record the lab DNS serves
    cloud_init: str  # `cloud-init status --long` when the host came up
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def connection(self) -> Connection:
        return Connection(self.host_ipv4, self.admin_user, Path(self.private_key), self.world_netns)

    @property
    def ses_password(self) -> str:
        return Path(self.ses_password_file).read_text().strip()

    def save(self) -> None:
        path = Path(self.state_dir) / "lab.json"
        path.write_text(json.dumps(asdict(self), indent=2))
        path.chmod(0o600)

    @classmethod
    def load(cls, name: str = DEFAULT_NAME) -> LabInfo:
        path = state_dir(name) / "lab.json"
        if not path.exists():
            raise LabError(f"no lab named {name!r} is up (no {path}); start one with lab up")
        return cls(**json.loads(path.read_text()))


def state_dir(name: str = DEFAULT_NAME) -> Path:
    return STATE_ROOT / f"lab-{name}"


# --- settings and the lab's facts ------------------------------------------------------------


def lab_overrides(public_key: str, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The caller's overrides, plus what lets the lab in: its SSH key, its admin network."""
    merged: dict[str, Any] = {
        "adminCidrs": [f"{network.GATEWAY_IPV4}/32", f"{network.GATEWAY_IPV6}/128"],
        **(overrides or {}),
    }
    keys = list(merged.get("sshPublicKeys", []))
    merged["sshPublicKeys"] = [*keys, public_key] if public_key not in keys else keys
    return merged


def ses_dkim_tokens(domain: str) -> tuple[str, ...]:
    """Three stable stand-ins for the CNAME tokens SES hands out for Easy DKIM."""
    alphabet = string.ascii_lowercase + string.digits
    tokens = []
    for i in range(3):
        digest = hashlib.sha256(f"{domain}/{i}".encode()).digest()
        tokens.append("".join(alphabet[b % len(alphabet)] for b in digest))
    return tuple(tokens)


def lab_facts(settings: Settings, dkim_public_key_pem: str) -> Facts:
    return Facts(
        network.HOST_IPV4,
        network.HOST_IPV6,
        dkim_public_key_body(dkim_public_key_pem),
        ses_dkim_tokens(settings.domain) if settings.relay.value == "ses" else (),
    )


def lab_zone(settings: Settings, facts: Facts) -> str:
    """Exactly the records function's list for the lab's facts, then the names of the world."""
    ses = smtp_endpoint(settings.ses_region)
    outside = [
        f"{ses}. 300 IN A {network.SES.ipv4}",
        f"{ses}. 300 IN AAAA {network.SES.ipv6}",
        f"{acme.ACME_NAME}. 300 IN A {network.ACME.ipv4}",
        f"{acme.ACME_NAME}. 300 IN AAAA {network.ACME.ipv6}",
        f"{REMOTE_DOMAIN}. 300 IN MX 10 {REMOTE_MX_NAME}.",
        f"{REMOTE_MX_NAME}. 300 IN A {network.REMOTE_MX.ipv4}",
        f"{REMOTE_MX_NAME}. 300 IN AAAA {network.REMOTE_MX.ipv6}",
        f'{REMOTE_DOMAIN}. 300 IN TXT "v=spf1 ip4:{network.REMOTE_MX.ipv4} ip6:{network.REMOTE_MX.ipv6} -all"',
        # The domain's SPF includes amazonses.com: here that is the SES stand-in.
        f'amazonses.com. 300 IN TXT "v=spf1 ip4:{network.SES.ipv4} ip6:{network.SES.ipv6} -all"',
        # Reverse DNS, which DigitalOcean sets from the droplet's name.
        f"{ipaddress.ip_address(network.HOST_IPV4).reverse_pointer}. 300 IN PTR {settings.host_name}.",
        f"{ipaddress.ip_address(network.HOST_IPV6).reverse_pointer}. 300 IN PTR {settings.host_name}.",
        f"{ipaddress.ip_address(network.REMOTE_MX.ipv4).reverse_pointer}. 300 IN PTR {REMOTE_MX_NAME}.",
        f"{ipaddress.ip_address(network.SES.ipv4).reverse_pointer}. 300 IN PTR {ses}.",
    ]
    return zone_file(settings, facts) + "; the lab's outside world\n" + "\n".join(outside) + "\n"


# --- the world ---------------------------------------------------------------------------------


def _start(name: str, argv: Sequence[str], world_netns: str, logs: Path, ledger: Ledger) -> None:
    with (logs / f"{name}.log").open("ab") as log:
        process = subprocess.Popen(
            argv_in(world_netns, argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives the `lab up` command that started it
            cwd=PROJECT_DIR,  # `python -m infra.lab.world` finds the package from here
        )
    ledger.add_process(process.pid)
    (logs / f"{name}.pid").write_text(str(process.pid))


def _wait_for_port(world_netns: str, address: str, port: int, what: str, log: Path) -> None:
    def connectable() -> bool:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((address, port), timeout=1):
                    return True
            except OSError:
                time.sleep(0.1)
        return False

    if not call_in(world_netns, connectable):
        raise LabError(f"{what} did not open {address}:{port} within {READY_TIMEOUT_SECONDS} s; see {log}")


def start_world(info: LabInfo, ca: LabCA, ledger: Ledger, ses_region: str) -> None:
    python = sys.executable  # the venv's: the stand-ins use its dnslib and aiosmtpd
    logs = Path(info.state_dir) / "logs"
    logs.mkdir(exist_ok=True)
    world = info.world_netns
    _start("dns", [python, "-m", "infra.lab.world", "dns", info.zone_file, info.dns_ipv4], world, logs, ledger)
    ses_tls = ca.issue("ses", [smtp_endpoint(ses_region)])
    _start("ses", [python, "-m", "infra.lab.world", "ses", info.ses_spool, info.ses_ipv4, info.ses_endpoint,
                   info.ses_username, info.ses_password_file, str(ses_tls.certificate), str(ses_tls.key)],
           world, logs, ledger)  # fmt: skip
    mx_tls = ca.issue("remote-mx", [REMOTE_MX_NAME])
    _start("remote-mx", [python, "-m", "infra.lab.world", "sink", info.remote_spool, info.remote_mx_ipv4,
                         REMOTE_MX_NAME, str(mx_tls.certificate), str(mx_tls.key)], world, logs, ledger)  # fmt: skip
    acme_tls = ca.issue("acme", [acme.ACME_NAME], [network.ACME.ipv4, network.ACME.ipv6])
    config = acme.write_config(Path(info.state_dir) / "pebble.json", network.ACME.ipv4, acme_tls)
    _start("acme", acme.argv(config, info.dns_ipv4), world, logs, ledger)
    _wait_for_port(world, info.ses_ipv4, SES_SUBMISSION_PORT, "the SES stand-in", logs / "ses.log")
    _wait_for_port(world, info.remote_mx_ipv4, SMTP_PORT, "the remote MX", logs / "remote-mx.log")
    _wait_for_port(world, network.ACME.ipv4, acme.ACME_PORT, "pebble", logs / "acme.log")
    _wait_for_dns(info, logs / "dns.log")
    acme.fetch_root(world, network.ACME.ipv4, ca.certificate_path, Path(info.acme_root))


def _wait_for_dns(info: LabInfo, log: Path) -> None:
    import dns.resolver

    def answers() -> bool:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [info.dns_ipv4]
        resolver.lifetime = 1
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            try:
                resolver.resolve(info.host_name, "A")
                return True
            except Exception:  # not up yet, whatever the reason
                time.sleep(0.1)
        return False

    if not call_in(info.world_netns, answers):
        raise LabError(f"the lab DNS did not answer within {READY_TIMEOUT_SECONDS} s; see {log}")


# --- up, down, status -----------------------------------------------------------------------------


def up(
    stack: str = "dev",
    overrides: Mapping[str, Any] | None = None,
    *,
    name: str = DEFAULT_NAME,
    user_data: str | None = None,
    dkim_public_key_pem: str | None = None,
    quiet: bool = False,
) -> LabInfo:
    """Boot a lab host for STACK (settings with OVERRIDES) and the world around it.

    The host's user-data is USER_DATA verbatim when given (the droplet's, from the program),
    else `render_user_data` of the stack's settings. DKIM_PUBLIC_KEY_PEM is the key the lab DNS
    publishes (the program's, when given; else a lab key whose private half is in LabInfo).
    """
    names = network.Namespaces(name)
    directory = state_dir(name)
    ledger = Ledger(directory)
    if network.exists(names) or ledger.entries():
        raise LabError(f"a lab named {name!r} is already up (or half down); run lab down first")

    def say(text: str) -> None:
        if not quiet:
            print(f"lab: {text}", flush=True)

    started = time.monotonic()
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    try:
        image = build_image(log=not quiet)
        timings = {"image": round(time.monotonic() - started, 1)}
        key = ssh_key_pair(directory / "admin-key")
        used_overrides = lab_overrides(key.public_key, overrides)
        settings = parse_settings(stack_config(stack, used_overrides))
        if user_data is None:
            user_data = render_user_data(settings)
        dkim_private = directory / "dkim-private.pem"
        if dkim_public_key_pem is None:
            dkim_public_key_pem = dkim_key_pair(dkim_private)
        (directory / "user-data").write_text(user_data)
        zone = directory / "zone.db"
        zone.write_text(lab_zone(settings, lab_facts(settings, dkim_public_key_pem)))
        ses_password_file = directory / "ses-password"
        ses_password_file.touch(mode=0o600)
        ses_password_file.write_text(secrets.token_urlsafe(30))
        info = LabInfo(
            name=name, stack=stack, overrides=used_overrides, state_dir=str(directory),
            host_name=settings.host_name, host_ipv4=network.HOST_IPV4, host_ipv6=network.HOST_IPV6,
            admin_user=settings.admin_user, private_key=str(key.private_key), public_key=key.public_key,
            host_netns=names.host, world_netns=names.world, nspawn_pid=0, init_pid=0,
            volume_device="", volume_path=volume_device(settings), mail_dir=MAIL_DIR,
            dns_ipv4=network.DNS.ipv4, zone_file=str(zone), lab_ca="",
            ses_endpoint=smtp_endpoint(settings.ses_region), ses_ipv4=network.SES.ipv4,
            ses_username="AKIA" + secrets.token_hex(8).upper(), ses_password_file=str(ses_password_file),
            ses_spool=str(directory / "ses"), acme_directory=acme.directory_url(),
            acme_root=str(directory / "pki/pebble-root.crt"), remote_domain=REMOTE_DOMAIN,
            remote_mx_ipv4=network.REMOTE_MX.ipv4, remote_spool=str(directory / "remote-mx"),
            client_ipv4=network.CLIENT.ipv4,
            dkim_private_key=str(dkim_private) if dkim_private.exists() else "", cloud_init="", timings=timings,
        )  # fmt: skip
        info.save()
        say(f"network namespaces {names.host} (the host) and {names.world} (the outside world)")
        network.create(names, ledger)
        ca = LabCA(directory / "pki")
        info.lab_ca = str(ca.certificate_path)
        start_world(info, ca, ledger, settings.ses_region)
        timings["world"] = round(time.monotonic() - started - timings["image"], 1)
        root = host.mount_fresh_root(image, directory, ledger)
        host.write_seed(root, user_data, f"{name}-{int(time.time())}", settings.host_label)
        host.point_resolver(root, info.dns_ipv4)
        host.name_mail_system(root, settings.host_name)
        host.trust(root, {"mailroom-lab-ca": ca.certificate_path, "mailroom-lab-acme-root": Path(info.acme_root)})
        info.volume_device = host.attach_volume(directory, ledger)
        boot_started = time.monotonic()
        say(f"booting {settings.host_name} from the stack's rendered user-data")
        booted = host.boot(root, name, names.host, info.volume_device, info.volume_path, directory, ledger)
        info.nspawn_pid, info.init_pid = booted.nspawn_pid, booted.init_pid
        info.save()
        cloud_init = host.wait_for_cloud_init(booted.init_pid)
        info.cloud_init = cloud_init.stdout.strip()
        timings["cloud_init"] = round(time.monotonic() - boot_started, 1)
        _wait_for_ssh(info)
        timings["ssh"] = round(time.monotonic() - boot_started, 1)
        timings["total"] = round(time.monotonic() - started, 1)
        info.save()
        say(describe(info))
        return info
    except BaseException:
        if not os.environ.get("MAILROOM_LAB_KEEP"):  # MAILROOM_LAB_KEEP=1 keeps a failed lab to look at
            down(name)
        raise


def _wait_for_ssh(info: LabInfo, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = run_command(info.connection, LabCommand("ssh-check", "true"), timeout=20)
        if result.ok:
            return
        if time.monotonic() > deadline:
            raise LabError(f"SSH as {info.admin_user}@{info.host_ipv4} failed: {result.stderr.strip()[-500:]}")
        time.sleep(0.5)


def describe(info: LabInfo) -> str:
    ssh = " ".join(info.connection.ssh_argv("")[:-2]) + f" {info.admin_user}@{info.host_ipv4}"
    return (
        f"up: {info.host_name} ({info.host_ipv4}, {info.host_ipv6}) in namespace {info.host_netns}, "
        f"booted in {info.timings.get('ssh', 0):.1f} s.\n"
        f"  ssh:   {ssh}\n"
        f"  world: namespace {info.world_netns}; DNS {info.dns_ipv4}, SES {info.ses_endpoint} "
        f"({info.ses_ipv4}:587), ACME {info.acme_directory}, remote MX {REMOTE_MX_NAME} ({info.remote_mx_ipv4})\n"
        f"  down:  python -m infra lab down"
    )


def down(name: str = DEFAULT_NAME) -> list[str]:
    """Remove every process, mount, loop device, link and namespace the lab made; safe to repeat.
    Returns what could not be removed (empty when all is gone)."""
    directory = state_dir(name)
    problems = Ledger(directory).undo()
    if not problems and directory.exists():
        shutil.rmtree(directory, ignore_errors=True)
    return problems


def leftovers(name: str = DEFAULT_NAME) -> list[str]:
    """Anything of the lab still on this machine (empty after a clean `down`)."""
    names = network.Namespaces(name)
    directory = state_dir(name)
    found = []
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    found += [
        f"namespace {line.split()[0]}"
        for line in listed.splitlines()
        if line.split()[:1] in ([names.host], [names.world])
    ]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    found += [f"link {line.split()[1]}" for line in links.splitlines() if line.split()[1].startswith(f"{name}-")]
    mounts = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True, check=True).stdout
    found += [f"mount {m}" for m in mounts.splitlines() if m.startswith(str(directory))]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    found += [f"loop {line}" for line in loops.splitlines() if str(directory) in line]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(directory) in text or f"/run/netns/{names.host}" in text:
            found.append(f"process {cmdline.parent.name}: {text[:120]}")
    for hierarchy in ("systemd", "unified"):
        group = host.CGROUP_ROOT / hierarchy / f"mailroom-lab-{name}"
        if group.exists():
            found.append(f"cgroup {group}")
    if directory.exists():
        found.append(f"state directory {directory}")
    return found


@dataclass(frozen=True)
class LabStatus:
    up: bool
    lines: tuple[str, ...]


def status(name: str = DEFAULT_NAME) -> LabStatus:
    directory = state_dir(name)
    ledger = Ledger(directory)
    if not ledger.entries():
        return LabStatus(False, (f"lab {name!r}: not running",))
    try:
        info = LabInfo.load(name)
    except LabError as exc:
        return LabStatus(False, (f"lab {name!r}: half up ({exc}); run lab down",))
    live = set(ledger.live_processes())
    lines = [f"lab {name!r}: stack {info.stack}, host {info.host_name} ({info.host_ipv4})"]
    host_up = info.nspawn_pid in live
    state = "not running"
    if host_up:
        state = host.in_guest(info.init_pid, "systemctl", "is-system-running", timeout=20).stdout.strip()
    lines.append(f"  host: {state}")
    logs = directory / "logs"
    for service in WORLD_SERVICES:
        pid_file = logs / f"{service}.pid"
        alive = pid_file.exists() and int(pid_file.read_text()) in live
        lines.append(f"  {service}: {'running' if alive else 'stopped'}")
    mode = Path(info.ses_spool) / "mode"
    lines.append(f"  ses mode: {mode.read_text().strip() if mode.exists() else 'ok'}")
    return LabStatus(host_up, tuple(lines))


# --- using a running lab ------------------------------------------------------------------------


def run_on_host(info: LabInfo, commands: Sequence[LabCommand]) -> list[CommandResult]:
    """The program's remote commands, over SSH as the administrator (see infra.lab.commands)."""
    return run_commands(info.connection, commands)


def as_root(info: LabInfo, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """A command in the guest as root, bypassing SSH: for the lab's own checks, never for deploys."""
    return host.in_guest(info.init_pid, *argv, timeout=timeout)


def set_ses_mode(info: LabInfo, mode: str) -> None:
    """ok, 4xx (451 to every recipient), 5xx (554), away (port closed until the mode changes)."""
    if mode not in SES_MODES:
        raise LabError(f"SES stand-in mode {mode!r} is not accepted; accepted: {', '.join(SES_MODES)}")
    spool = Path(info.ses_spool)
    spool.mkdir(parents=True, exist_ok=True)
    (spool / "mode").write_text(mode + "\n")

    def port_open() -> bool:
        try:
            with socket.create_connection((info.ses_ipv4, SES_SUBMISSION_PORT), timeout=1):
                return True
        except OSError:
            return False

    # The stand-in polls its mode file every 0.2 s; return once its port says it has noticed.
    deadline = time.monotonic() + 10
    while call_in(info.world_netns, port_open) == (mode == "away") and time.monotonic() < deadline:
        time.sleep(0.1)


def publish(info: LabInfo, lines: Sequence[str]) -> None:
    """Add zone-file lines (e.g. an ACME DNS-01 TXT); the DNS server re-reads its file."""
    zone = Path(info.zone_file)
    partial = zone.with_suffix(".tmp")
    partial.write_text(zone.read_text() + "\n".join(lines) + "\n")
    partial.replace(zone)


def swaks_from_remote(info: LabInfo, *arguments: str) -> subprocess.CompletedProcess[str]:
    """swaks as another domain's mail server: from the remote MX's address, to the host's port 25."""
    argv = ["swaks", "--server", info.host_ipv4, "--port", str(SMTP_PORT), "--local-interface",
            info.remote_mx_ipv4, "--helo", REMOTE_MX_NAME, *arguments]  # fmt: skip
    return run_in(info.world_netns, argv, timeout=120)
