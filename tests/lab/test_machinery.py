"""The lab's machinery: a host booted from the stack's own user-data, and the world around it.

These tests prove the lab before anything is deployed on it: the host is what cloud-init makes
of the droplet's user-data (admin user, SSH hardening, the volume), remote commands run as the
command provider runs them, and the stand-ins for DNS, SES and the ACME CA behave like the real
ones as far as the server can tell. Teardown is checked when the session's lab goes down.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import dns.rdata
import dns.resolver
import pytest
from cryptography.hazmat.primitives import serialization

from infra.bootstrap import render_user_data
from infra.lab import host, image, machinery
from infra.lab.commands import LabCommand, run_commands
from infra.lab.netns import call_in
from infra.records import records
from infra.settings import Settings, parse_settings
from infra.stack import stack_config
from tests.lab.conftest import TEST_LAB, lab_preconditions

pytestmark = pytest.mark.lab
T = TypeVar("T")
LabInfo = machinery.LabInfo


def settings_of(lab: LabInfo) -> Settings:
    return parse_settings(stack_config(lab.stack, lab.overrides))


def in_world(lab: LabInfo, fn: Callable[[], T]) -> T:
    return call_in(lab.world_netns, fn)


def ssh(lab: LabInfo, command: str) -> tuple[int, str, str]:
    [result] = run_commands(lab.connection, [LabCommand("test", command)])
    return result.exit_code, result.stdout, result.stderr


def ssh_as(lab: LabInfo, user: str, *options: str) -> tuple[int, str]:
    """An SSH login attempt as USER with OPTIONS; returns exit code and stderr."""
    import subprocess

    argv = lab.connection.ssh_argv("true", *options)
    argv[-2] = f"{user}@{lab.host_ipv4}"
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    return result.returncode, result.stderr


# --- the host -----------------------------------------------------------------------------------


def test_host_boots_from_exactly_the_rendered_user_data(lab_host: LabInfo) -> None:
    seed = machinery.as_root(lab_host, "cat", "/var/lib/cloud/seed/nocloud/user-data").stdout
    assert seed == render_user_data(settings_of(lab_host))
    assert lab_host.public_key in seed  # the lab's key reached the user-data through the settings


def test_cloud_init_finishes(lab_host: LabInfo) -> None:
    assert "status: done" in lab_host.cloud_init
    bootstrapped = machinery.as_root(lab_host, "test", "-e", "/var/lib/mailroom-bootstrapped")
    assert bootstrapped.returncode == 0, "the user-data's runcmd did not run to its end"


def test_the_admin_user_logs_in_with_the_lab_key_and_has_sudo(lab_host: LabInfo) -> None:
    code, out, err = ssh(lab_host, "id -un; sudo -n true && echo sudo-ok")
    assert code == 0, err
    assert out.split() == [lab_host.admin_user, "sudo-ok"]


def test_root_login_is_refused(lab_host: LabInfo) -> None:
    code, err = ssh_as(lab_host, "root")
    assert code == 255
    assert "Permission denied" in err


def test_password_login_is_refused(lab_host: LabInfo) -> None:
    code, err = ssh_as(
        lab_host,
        lab_host.admin_user,
        "-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=password,keyboard-interactive",
    )  # fmt: skip
    assert code == 255
    # The server offers public keys only: no password prompt is even possible.
    assert "Permission denied (publickey)" in err


def test_the_volume_is_formatted_and_mounted_at_the_mail_dir(lab_host: LabInfo) -> None:
    found = machinery.as_root(lab_host, "findmnt", "-n", "-o", "SOURCE,FSTYPE", lab_host.mail_dir)
    assert found.stdout.split() == [lab_host.volume_path, "ext4"]
    label = machinery.as_root(lab_host, "blkid", "-o", "value", "-s", "LABEL", lab_host.volume_path)
    assert label.stdout.strip() == "mailroom"


def test_postfix_names_itself_after_the_host_not_the_build_machine(lab_host: LabInfo) -> None:
    code, out, _ = ssh(lab_host, "/usr/sbin/postconf -h myhostname; cat /etc/mailname")
    assert code == 0
    assert out.split() == [lab_host.host_name, lab_host.host_name]


# --- remote commands ----------------------------------------------------------------------------


def test_remote_commands_run_in_order_with_stdin_and_stop_at_the_first_failure(lab_host: LabInfo) -> None:
    secret = "not-for-the-logs-4711"
    commands = [
        LabCommand("write", "umask 077; cat > /tmp/lab-stdin && wc -c < /tmp/lab-stdin", secret + "\n"),
        LabCommand("shell", 'echo "$0" "$USER"; exit 3'),
        LabCommand("never", "touch /tmp/lab-never"),
    ]
    results = run_commands(lab_host.connection, commands)
    assert [(r.name, r.exit_code) for r in results] == [("write", 0), ("shell", 3)]
    assert results[0].stdout.strip() == str(len(secret) + 1)
    assert results[1].stdout.split() == ["bash", lab_host.admin_user]  # the user's login shell ran it
    assert ssh(lab_host, "test -e /tmp/lab-never")[0] == 1
    assert secret not in repr(commands) + repr(results)


# --- DNS ------------------------------------------------------------------------------------------


def lab_records(lab: LabInfo) -> list[tuple[str, str, str]]:
    settings = settings_of(lab)
    key = serialization.load_pem_private_key(Path(lab.dkim_private_key).read_bytes(), password=None)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    facts = machinery.lab_facts(settings, pem.decode())
    return [(r.name, r.type, r.rdata()) for r in records(settings, facts)]


def test_the_lab_dns_serves_the_records_function_for_the_lab_facts(lab_host: LabInfo) -> None:
    expected: dict[tuple[str, str], set[str]] = {}
    for name, kind, rdata in lab_records(lab_host):
        expected.setdefault((name, kind), set()).add(dns.rdata.from_text("IN", kind, rdata).to_text())
    assert ("example.net", "MX") in expected and ("mail.example.net", "A") in expected

    def ask() -> dict[tuple[str, str], set[str]]:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [lab_host.dns_ipv4]
        return {(n, k): {r.to_text() for r in resolver.resolve(n, k)} for n, k in expected}

    assert in_world(lab_host, ask) == expected


def test_the_lab_dns_answers_reverse_lookups_for_the_host(lab_host: LabInfo) -> None:
    def ptr() -> list[str]:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [lab_host.dns_ipv4]
        return [resolver.resolve_address(a)[0].to_text() for a in (lab_host.host_ipv4, lab_host.host_ipv6)]

    assert in_world(lab_host, ptr) == [f"{lab_host.host_name}.", f"{lab_host.host_name}."]


def test_the_host_resolves_through_the_lab_dns(lab_host: LabInfo) -> None:
    code, out, _ = ssh(lab_host, f"getent ahostsv4 {lab_host.ses_endpoint}")
    assert code == 0
    assert out.split()[0] == lab_host.ses_ipv4


# --- the SES stand-in --------------------------------------------------------------------------------


def ses_session(lab: LabInfo, action: Callable[[smtplib.SMTP], T]) -> T:
    """Connect as Postfix would: by name, STARTTLS, the certificate verified against the lab CA."""

    def connect() -> T:
        context = ssl.create_default_context(cafile=lab.lab_ca)
        with smtplib.SMTP(timeout=10) as smtp:
            smtp.connect(lab.ses_ipv4, machinery.SES_SUBMISSION_PORT)
            smtp._host = lab.ses_endpoint  # type: ignore[attr-defined]  # the name starttls checks
            smtp.starttls(context=context)
            return action(smtp)

    return in_world(lab, connect)


def test_the_ses_stand_in_refuses_a_wrong_password(lab_host: LabInfo) -> None:
    with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        ses_session(lab_host, lambda smtp: smtp.login(lab_host.ses_username, "wrong-password"))
    assert refused.value.smtp_code == 535


def test_the_ses_stand_in_accepts_the_right_login_and_records_the_message(lab_host: LabInfo) -> None:
    raw = "From: alice@example.net\r\nTo: dana@example.com\r\nSubject: via SES\r\n\r\nmachinery test\r\n"

    def send(smtp: smtplib.SMTP) -> dict[str, tuple[int, bytes]]:
        smtp.login(lab_host.ses_username, lab_host.ses_password)
        return smtp.sendmail("bounce@example.net", ["dana@example.com"], raw)

    assert ses_session(lab_host, send) == {}
    recorded = sorted(Path(lab_host.ses_spool).glob("*.json"))
    assert recorded, "the stand-in recorded nothing"
    envelope = recorded[-1].read_text()
    assert '"from": "bounce@example.net"' in envelope and '"dana@example.com"' in envelope
    assert b"machinery test" in recorded[-1].with_suffix(".eml").read_bytes()


def test_the_ses_stand_in_refuses_auth_before_starttls(lab_host: LabInfo) -> None:
    def plain() -> int:
        with smtplib.SMTP(lab_host.ses_ipv4, machinery.SES_SUBMISSION_PORT, timeout=10) as smtp:
            smtp.ehlo()
            code, _ = smtp.docmd("AUTH", "PLAIN AGFiYwBkZWY=")
            return code

    assert in_world(lab_host, plain) == 530


@pytest.mark.parametrize(("mode", "code"), [("4xx", 451), ("5xx", 554)])
def test_the_ses_stand_in_answers_as_told(lab_host: LabInfo, mode: str, code: int) -> None:
    def send(smtp: smtplib.SMTP) -> None:
        smtp.login(lab_host.ses_username, lab_host.ses_password)
        smtp.sendmail("bounce@example.net", ["dana@example.com"], "Subject: x\r\n\r\nx\r\n")

    machinery.set_ses_mode(lab_host, mode)
    try:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            ses_session(lab_host, send)
        assert refused.value.recipients["dana@example.com"][0] == code
    finally:
        machinery.set_ses_mode(lab_host, "ok")


def test_the_ses_stand_in_can_go_away_and_come_back(lab_host: LabInfo) -> None:
    def connect() -> bool:
        try:
            with socket.create_connection((lab_host.ses_ipv4, machinery.SES_SUBMISSION_PORT), timeout=3):
                return True
        except ConnectionRefusedError:
            return False

    machinery.set_ses_mode(lab_host, "away")
    try:
        assert in_world(lab_host, connect) is False
    finally:
        machinery.set_ses_mode(lab_host, "ok")
    assert in_world(lab_host, connect) is True


# --- TLS trust and ACME --------------------------------------------------------------------------


def test_the_host_trusts_the_lab_ca_for_the_ses_endpoint(lab_host: LabInfo) -> None:
    endpoint = lab_host.ses_endpoint
    code, out, _ = ssh(
        lab_host,
        f"openssl s_client -connect {endpoint}:587 -starttls smtp -servername {endpoint} "
        f"-verify_hostname {endpoint} -verify_return_error </dev/null 2>&1",
    )
    assert code == 0 and "Verify return code: 0 (ok)" in out


def test_pebble_issues_the_host_a_certificate_the_host_trusts(lab_host: LabInfo) -> None:
    # http-01 through the web server the image already runs on port 80 (nginx's default site).
    code, out, _ = ssh(
        lab_host,
        "sudo certbot certonly -n --webroot -w /var/www/html -d " + lab_host.host_name
        + f" --server {lab_host.acme_directory} --register-unsafely-without-email --agree-tos"
        " --config-dir /tmp/lab-le --work-dir /tmp/lab-le/work --logs-dir /tmp/lab-le/logs 2>&1"
        f" && sudo openssl verify -untrusted /tmp/lab-le/live/{lab_host.host_name}/chain.pem"
        f" /tmp/lab-le/live/{lab_host.host_name}/cert.pem",
    )  # fmt: skip
    assert code == 0, out
    assert out.rstrip().endswith(": OK")


# --- the rest of the internet ------------------------------------------------------------------------


def test_another_domains_server_reaches_the_host_on_port_25(lab_host: LabInfo) -> None:
    result = machinery.swaks_from_remote(
        lab_host,
        "--from",
        "dana@example.com",
        "--to",
        f"postmaster@{lab_host.host_name}",
        "--tls",
        "--quit-after",
        "RCPT",
    )
    assert "<-  220 " in result.stdout  # the host's banner, then STARTTLS
    assert "=== TLS started" in result.stdout, result.stdout[-800:]


def test_the_remote_mx_records_what_it_receives(lab_host: LabInfo) -> None:
    def send() -> None:
        with smtplib.SMTP(lab_host.remote_mx_ipv4, machinery.SMTP_PORT, timeout=10) as smtp:
            smtp.sendmail("alice@example.net", ["dana@example.com"], "Subject: hi\r\n\r\nto the remote MX\r\n")

    in_world(lab_host, send)
    spool = Path(lab_host.remote_spool)
    assert any(b"to the remote MX" in p.read_bytes() for p in spool.glob("*.eml"))


# --- teardown, the image cache --------------------------------------------------------------------


def test_a_failed_up_removes_what_it_created(monkeypatch: pytest.MonkeyPatch) -> None:
    reason = lab_preconditions()
    if reason:
        pytest.skip(reason)
    name = f"{TEST_LAB}f"

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boot failed (on purpose)")

    monkeypatch.setattr(host, "boot", fail)  # after the network, the world, the overlay, the volume
    machinery.down(name)
    with pytest.raises(RuntimeError, match="on purpose"):
        machinery.up("dev", name=name, quiet=True)
    assert machinery.leftovers(name) == []


def test_the_image_is_keyed_by_its_package_list(monkeypatch: pytest.MonkeyPatch) -> None:
    before = image.image_key()
    assert image.image_key() == before
    monkeypatch.setattr(image, "MAIL_STACK", (*image.MAIL_STACK, "swaks"))
    assert image.image_key() != before
