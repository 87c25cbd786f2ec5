"""Clients on Spamhaus ZEN are refused on port 25, with the public list named in the reply: by
postscreen asking the public zone, and, with a Spamhaus DQS key, by smtpd asking the DQS zone
through a root-only map, so that the key never reaches main.cf, which vmail reads to run sendmail
for Sieve's redirects (proved by one), nor a client, nor the mail log.

Each test plants a listing in the lab DNS for an outside address the host has never met."""

from __future__ import annotations

import base64
import os
import smtplib
from collections.abc import Iterator

import pytest

from infra.core.facts import SMTP_PORT
from infra.lab import deploy, host, network
from infra.lab.mail import find, message, send_inbound
from infra.lab.network import REMOTE_DOMAIN, WORLD_NS
from infra.lab.state import LabInfo
from infra.tools.rehearsal import DROPLET_IPV4
from tests.support.lab import LAB_MARKS, alice, world_address, zone_changed

pytestmark = [*LAB_MARKS, pytest.mark.reliability]

# Outside addresses no other test uses: no postscreen cache entry, no resolver cache entry.
PUBLIC_LISTED, DQS_LISTED = "203.0.113.42", "203.0.113.43"
BOB = "bob@example.net"


def rcpt_from(source: str, recipient: str) -> tuple[int, bytes]:
    """What the host answers to RCPT TO:<RECIPIENT> from SOURCE, an outside mail server."""

    def attempt() -> tuple[int, bytes]:
        with smtplib.SMTP(DROPLET_IPV4, SMTP_PORT, local_hostname=f"mx.{REMOTE_DOMAIN}",
                          source_address=(source, 0), timeout=60) as smtp:  # fmt: skip
            smtp.ehlo()
            smtp.mail(f"dana@{REMOTE_DOMAIN}")
            return smtp.rcpt(recipient)

    return network.in_netns(WORLD_NS, attempt)


def listed(address: str, zone: str) -> str:
    """A zone line listing ADDRESS in ZONE as Spamhaus lists a spam source (127.0.0.2, SBL)."""
    return f"{'.'.join(reversed(address.split('.')))}.{zone}. 300 IN A 127.0.0.2"


def test_a_client_on_zen_is_refused_by_postscreen_naming_the_list(lab: LabInfo) -> None:
    with world_address(PUBLIC_LISTED), zone_changed(lab, add=listed(PUBLIC_LISTED, "zen.spamhaus.org")):
        code, text = rcpt_from(PUBLIC_LISTED, alice(lab)[0])
    assert code == 550, text
    assert text.startswith(
        f"5.7.1 Service unavailable; client [{PUBLIC_LISTED}] blocked using zen.spamhaus.org".encode()
    ), text


@pytest.fixture(scope="module")
def dqs_key(lab: LabInfo) -> Iterator[str]:
    """The lab host deployed with a (made-up) Spamhaus DQS key, and without it again afterwards."""
    key = "labdqskey" + os.urandom(8).hex()  # the prefix is what tests look for on the host
    steps = deploy.redeploy({"spamhausDqsKey": key})
    assert all(s["exit"] == 0 for s in steps), [s["name"] for s in steps if s["exit"]]
    try:
        yield key
    finally:
        deploy.redeploy()


def test_with_a_dqs_key_a_client_on_the_dqs_zone_is_refused_and_the_key_never_shown(lab: LabInfo, dqs_key: str) -> None:
    zone = f"{dqs_key}.zen.dq.spamhaus.net"
    # The public zone lists the client too: postscreen no longer asks it, so it must not be what refuses.
    plants = f"{listed(DQS_LISTED, zone)}\n{listed(DQS_LISTED, 'zen.spamhaus.org').replace('127.0.0.2', '127.0.0.4')}"
    with world_address(DQS_LISTED), zone_changed(lab, add=plants):
        code, text = rcpt_from(DQS_LISTED, alice(lab)[0])
        clean = rcpt_from(network.REMOTE_IP, alice(lab)[0])  # an address on no list still gets in
    assert code == 554, text
    expected = f"5.7.1 Service unavailable; Client host [{DQS_LISTED}] blocked using zen.spamhaus.org"
    assert text.startswith(expected.encode()) and dqs_key.encode() not in text, text
    assert clean[0] == 250, clean
    log = host.guest(f"sudo journalctl --since -10min -o cat | grep -F 'reject: RCPT from unknown[{DQS_LISTED}]'", lab)
    assert "blocked using zen.spamhaus.org" in log.stdout and dqs_key not in log.stdout, log.stdout[-600:]


def test_with_a_dqs_key_main_cf_stays_readable_and_sieve_redirects_still_leave(lab: LabInfo, dqs_key: str) -> None:
    """Sieve's redirect runs sendmail as vmail, which reads main.cf: the key must not be there."""
    files = host.guest("sudo grep -rlF labdqskey /etc/postfix", lab).stdout.split()  # the key's prefix
    assert files == ["/etc/postfix/dqs_clients"], files
    mode = host.guest("stat -c '%a %U %G' /etc/postfix/dqs_clients /etc/postfix/main.cf", lab).stdout.split("\n")
    assert mode[:2] == ["640 root postfix", "644 root root"], mode
    user, password = alice(lab)
    script = base64.b64encode(f'require ["copy"];\nredirect :copy "{BOB}";\n'.encode()).decode()
    put = host.guest(f"echo {script} | base64 -d | sudo doveadm sieve put -a -u {user} forward", lab)
    assert put.returncode == 0, put.stderr
    try:
        msg = message(f"dana@{REMOTE_DOMAIN}", user, "redirected by Sieve")
        send_inbound(msg)
        assert find(user, password, msg["Message-ID"]) is not None  # :copy: kept here too
        assert find(BOB, lab.passwords[BOB], msg["Message-ID"]) is not None, "the redirect did not leave"
    finally:
        host.guest(f"sudo doveadm sieve deactivate -u {user}; sudo doveadm sieve delete -u {user} forward")
