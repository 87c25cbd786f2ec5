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
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from infra.core.facts import MAIL_DIR
from infra.core.user_data import volume_device
from infra.lab.host import MACHINE, boot_host, guest, run_steps, stop_host, wait_for_ssh
from infra.lab.image import build_image
from infra.lab.network import DNS_IP, HOST_LINK, HOST_NS, WORLD_NS, create_network
from infra.lab.state import STATE_DIR, LabError, LabInfo, keep_state, restore_state, secret_file, sh
from infra.lab.world import acme, make_certificates, start_world, stop_world, trusted_roots
from infra.tools.rehearsal import DROPLET_IPV4, OfflineRun, remote_steps, run_program

LAB_PASSWORD_USERS = 2


# --- the program, run as pulumi up would run it ---------------------------------------------


def lab_passwords(run_settings_addresses: list[str]) -> dict[str, str]:
    import secrets

    return {address: secrets.token_urlsafe(12) for address in run_settings_addresses}


def password_hash(password: str) -> str:
    result = sh("doveadm", "pw", "-s", "BLF-CRYPT", "-r", "10", "-p", password)
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
        # As `pulumi stack output --json` prints them (secret outputs left out): `check --lab` reads them.
        plain = {k: v for k, v in run.outputs.items() if k not in run.secret_outputs}
        (STATE_DIR / "outputs.json").write_text(json.dumps(plain, indent=2, default=str))
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


def redeploy(changes: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run the program again, with the lab's settings plus CHANGES, and its remote commands."""
    info = LabInfo.load()
    restore_state()
    run = run_program(info.stack, {**info.overrides, **(changes or {})})
    keep_state()
    return run_steps(info, remote_steps(run))


def replace_host(new_volume: bool = False) -> list[dict[str, Any]]:
    """What replacing the droplet does: the old attachment's dependents deleted first (the volume
    step's delete stops mail and unmounts the volume on the old machine), then a new machine from
    the same user-data, attached to the same volume, then the program's remote commands (all of
    them: the server id changed). NEW_VOLUME: the volume is lost with the machine, and the new
    machine gets a new, empty one (what `pulumi up` makes once the lost volume is gone)."""
    info = LabInfo.load()
    restore_state()
    releasing = [s for s in remote_steps(run_program(info.stack, info.overrides)) if s.delete]
    for step in releasing:
        result = guest(step.delete or "", info)
        if result.returncode != 0:
            raise LabError(f"the delete of {step.name} failed (exit {result.returncode}):\n{result.stderr.strip()}")
    # DigitalOcean detaches a volume from a running droplet whether or not it is mounted: what was
    # in Postfix's and Dovecot's hands then is torn. The lab refuses to move a volume still in use.
    in_use = guest(f"mountpoint -q {MAIL_DIR} || systemctl is-active --quiet postfix dovecot", info)
    if in_use.returncode == 0:
        raise LabError(
            f"the old host still has {MAIL_DIR} mounted or mail running when its volume is detached: "
            "the steps' deletes did not release it"
        )
    stop_host()
    if new_volume:
        discard_volume()
    boot_host((STATE_DIR / "user-data").read_text(), trusted_roots(), (STATE_DIR / "volume-path").read_text())
    wait_for_ssh()
    return redeploy()


def discard_volume() -> None:
    """The lab's volume detached and deleted: the next host gets a new, empty one."""
    loop = STATE_DIR / "volume.loop"
    if loop.exists():
        sh("losetup", "-d", loop.read_text().strip(), check=False)
        loop.unlink()
    (STATE_DIR / "volume.img").unlink(missing_ok=True)


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
    stop_world()
    for ns in (HOST_NS, WORLD_NS):
        leftover = sh("ip", "netns", "pids", ns, check=False).stdout.split()
        for leftover_pid in leftover:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(leftover_pid), signal.SIGKILL)
    discard_volume()
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
