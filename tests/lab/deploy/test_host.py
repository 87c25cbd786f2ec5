"""The lab host and the world around it, as the program left them: the host is what cloud-init
made of the droplet's own user-data (admin user, SSH hardening, the volume), remote commands
run as the command provider runs them, and the stand-ins for DNS and SES behave as the real
ones do as far as the server can tell. A lab that fails half-way leaves nothing behind.
"""

from __future__ import annotations

import os
import smtplib
import ssl
import subprocess
import sys
from collections.abc import Callable
from typing import TypeVar

import dns.rdata
import dns.resolver
import pytest

from infra.core.dns import records
from infra.core.facts import MAIL_DIR, PROJECT_DIR
from infra.core.facts import ses_smtp_endpoint as smtp_endpoint
from infra.core.settings import parse_settings
from infra.core.stack import stack_config
from infra.core.steps import Step
from infra.core.user_data import volume_device
from infra.lab import host, image, state, world
from infra.lab.mail import starttls_as
from infra.lab.network import DNS_IP, SES_IP, WORLD_NS, in_netns
from infra.lab.state import LabInfo
from infra.tools.rehearsal import DROPLET_IPV4, DROPLET_IPV6, OfflineRun, run_program
from tests.support.lab import LAB_MARKS

pytestmark = LAB_MARKS
T = TypeVar("T")
HOST_NAME = "mail.example.net"  # Pulumi.dev.yaml


def lab_run(lab: LabInfo) -> OfflineRun:
    """The program as this lab ran it: the keys and tokens it generated, as Pulumi's state keeps them."""
    state.restore_state()
    return run_program(lab.stack, lab.overrides)


def ses_endpoint(lab: LabInfo) -> str:
    return smtp_endpoint(parse_settings(stack_config(lab.stack, lab.overrides)).ses_region)


def ssh_as(lab: LabInfo, user: str, *options: str) -> subprocess.CompletedProcess[str]:
    """A login attempt as USER with the deploy key and OPTIONS."""
    argv = host.ssh_argv(lab, "true")
    argv[-2:-1] = [*options, f"{user}@{DROPLET_IPV4}"]
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)


# --- the host ------------------------------------------------------------------------------------


def test_the_host_booted_from_exactly_the_droplets_user_data(lab: LabInfo) -> None:
    run = lab_run(lab)
    droplet_user_data = run.one("digitalocean:index/droplet:Droplet").inputs["userData"]
    seen = host.guest("sudo cat /var/lib/cloud/instance/user-data.txt", lab)
    assert seen.returncode == 0, seen.stderr
    assert seen.stdout == droplet_user_data


def test_cloud_init_finished_its_whole_user_data(lab: LabInfo) -> None:
    status = host.guest("cloud-init status --long", lab).stdout
    assert "status: done" in status, status
    assert host.guest("test -e /var/lib/mailroom-bootstrapped", lab).returncode == 0


def test_the_admin_user_logs_in_with_the_deploy_key_and_has_sudo(lab: LabInfo) -> None:
    who = host.guest("id -un; sudo -n true && echo sudo-ok", lab)
    assert who.stdout.split() == [lab.admin_user, "sudo-ok"], who.stderr


def test_root_login_is_refused(lab: LabInfo) -> None:
    attempt = ssh_as(lab, "root")
    assert attempt.returncode == 255 and "Permission denied" in attempt.stderr


def test_password_login_is_refused(lab: LabInfo) -> None:
    attempt = ssh_as(
        lab, lab.admin_user,
        "-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=password,keyboard-interactive",
    )  # fmt: skip
    # The server offers public keys only: no password prompt is even possible.
    assert attempt.returncode == 255 and "Permission denied (publickey)" in attempt.stderr


def test_the_volume_is_formatted_and_mounted_at_the_mail_dir(lab: LabInfo) -> None:
    device = volume_device(parse_settings(stack_config(lab.stack, lab.overrides)))
    found = host.guest(f"findmnt -n -o SOURCE,FSTYPE {MAIL_DIR}", lab)
    assert found.stdout.split() == [device, "ext4"], found.stdout + found.stderr
    label = host.guest(f"sudo blkid -o value -s LABEL {device}", lab)
    assert label.stdout.strip() == "mailroom"


def test_postfix_names_itself_after_the_host_not_the_build_machine(lab: LabInfo) -> None:
    names = host.guest("/usr/sbin/postconf -h myhostname; cat /etc/mailname; hostname -f", lab)
    assert names.stdout.split() == [HOST_NAME] * 3


# --- remote commands ------------------------------------------------------------------------------


def test_remote_commands_run_in_order_with_stdin_and_stop_at_the_first_failure(lab: LabInfo) -> None:
    secret = "not-for-the-logs-4711"
    steps = [
        Step("write", "umask 077; cat > /tmp/lab-stdin && wc -c < /tmp/lab-stdin", secret + "\n"),
        Step("shell", 'echo "$0" "$USER"; exit 3'),
        Step("never", "touch /tmp/lab-never"),
    ]
    with pytest.raises(state.LabError, match="remote command shell failed") as failed:
        host.run_steps(lab, steps)
    assert secret not in str(failed.value)
    assert host.guest("cat /tmp/lab-stdin", lab).stdout == secret + "\n"
    assert host.guest("test -e /tmp/lab-never", lab).returncode == 1
    shell = host.run_steps_result(lab, steps[1])
    assert shell.stdout.split() == ["bash", lab.admin_user]  # the user's login shell ran it, as over SSH


# --- DNS ------------------------------------------------------------------------------------------


def test_the_lab_dns_serves_every_record_of_the_program(lab: LabInfo) -> None:
    run = lab_run(lab)
    expected: dict[tuple[str, str], set[str]] = {}
    for r in records(run.settings, run.facts()):
        expected.setdefault((r.name, r.type), set()).add(dns.rdata.from_text("IN", r.type, r.rdata()).to_text())
    assert ("example.net", "MX") in expected and ("mail._domainkey.example.net", "TXT") in expected

    def ask() -> dict[tuple[str, str], set[str]]:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [DNS_IP]
        return {(n, k): {r.to_text() for r in resolver.resolve(n, k)} for n, k in expected}

    assert in_netns(WORLD_NS, ask) == expected


def test_the_lab_dns_answers_reverse_lookups_for_the_host(lab: LabInfo) -> None:
    def ptr() -> list[str]:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [DNS_IP]
        return [resolver.resolve_address(a)[0].to_text() for a in (DROPLET_IPV4, DROPLET_IPV6)]

    assert in_netns(WORLD_NS, ptr) == [f"{HOST_NAME}.", f"{HOST_NAME}."]


def test_the_host_resolves_through_its_own_resolver_and_the_lab_dns(lab: LabInfo) -> None:
    endpoint = ses_endpoint(lab)
    found = host.guest(f"getent ahostsv4 {endpoint}; grep ^nameserver /etc/resolv.conf", lab)
    assert found.stdout.split()[0] == SES_IP
    assert "nameserver 127.0.0.1" in found.stdout  # unbound on the host, as on the droplet


# --- the SES stand-in ------------------------------------------------------------------------------


def ses_session(lab: LabInfo, action: Callable[[smtplib.SMTP], T]) -> T:
    """Connect as Postfix does: by name, STARTTLS, the certificate verified against the lab CA."""
    endpoint = ses_endpoint(lab)

    def connect() -> T:
        context = ssl.create_default_context(cafile=str(world.trusted_roots()["mailroom-lab-ca"]))
        with smtplib.SMTP(SES_IP, 587, timeout=10) as smtp:
            starttls_as(smtp, endpoint, context)
            return action(smtp)

    return in_netns(WORLD_NS, connect)


def test_the_ses_stand_in_refuses_a_wrong_password(lab: LabInfo) -> None:
    with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        ses_session(lab, lambda smtp: smtp.login(lab.ses_user, "wrong-password"))
    assert refused.value.smtp_code == 535


def test_the_ses_stand_in_refuses_auth_before_starttls(lab: LabInfo) -> None:
    def plain() -> int:
        with smtplib.SMTP(SES_IP, 587, timeout=10) as smtp:
            smtp.ehlo()
            return smtp.docmd("AUTH", "PLAIN AGFiYwBkZWY=")[0]

    assert in_netns(WORLD_NS, plain) == 530


def test_the_host_trusts_the_lab_ca_for_the_ses_endpoint(lab: LabInfo) -> None:
    endpoint = ses_endpoint(lab)
    checked = host.guest(
        f"openssl s_client -connect {endpoint}:587 -starttls smtp -servername {endpoint} "
        f"-verify_hostname {endpoint} -verify_return_error </dev/null 2>&1",
        lab,
    )
    assert checked.returncode == 0 and "Verify return code: 0 (ok)" in checked.stdout


# --- teardown, the image cache ------------------------------------------------------------------------


def test_a_lab_that_fails_half_way_removes_what_it_made() -> None:
    """A second lab (its own name, beside the session's) whose host never answers SSH: `up`
    fails after the network, the world, the overlay, the volume and the boot, and cleans up."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAILROOM_LAB_KEEP", "MAILROOM_LAB_STATE")}
    env["MAILROOM_LAB_NAME"] = "mrfail"
    failing = (
        "import infra.lab.deploy as d\nimport infra.lab.state as s\n"
        "def never(*args, **kwargs):\n    raise s.LabError('the host did not answer (on purpose)')\n"
        "d.wait_for_ssh = never\nd.up('dev')\n"
    )
    python = [sys.executable, "-c"]
    subprocess.run([*python, "import infra.lab.deploy as d; d.down()"], env=env, cwd=PROJECT_DIR, check=True)
    result = subprocess.run([*python, failing], env=env, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "on purpose" in result.stderr, result.stderr[-2000:]
    left = subprocess.run(
        [*python, "import infra.lab.deploy as d; print(*d.leftovers(), sep='\\n')"],
        env=env, cwd=PROJECT_DIR, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert left.stdout.strip() == "", f"the failed lab left behind:\n{left.stdout}"


def test_the_image_is_keyed_by_its_package_list(monkeypatch: pytest.MonkeyPatch) -> None:
    before = image.image_key()
    assert image.image_key() == before
    monkeypatch.setattr(image, "MAIL_STACK", (*image.MAIL_STACK, "swaks"))
    assert image.image_key() != before
