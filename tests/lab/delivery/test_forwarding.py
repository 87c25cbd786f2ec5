"""Forwarding: a user's Sieve redirect to another domain, of mail from yet another domain, is
refused by the relay (the SES stand-in, as SES, takes no other domain's From). The refusal
returns to the user, who keeps the message that way, and never to its sender, who for spam is
forged: no backscatter. (Aliases to other domains are refused by the settings for that reason.)"""

from __future__ import annotations

import base64
import imaplib
import time
from pathlib import Path

from infra.core.facts import IMAPS_PORT
from infra.lab import host, network
from infra.lab.mail import message, send_inbound, unverified
from infra.lab.network import REMOTE_DOMAIN, WORLD_NS
from infra.lab.state import LabInfo
from infra.tools.rehearsal import DROPLET_IPV4
from tests.support.lab import LAB_MARKS, alice

pytestmark = LAB_MARKS

ELSEWHERE = f"erin@{REMOTE_DOMAIN}"  # where the user's rule sends her mail


def bounce_of(user: str, password: str, message_id: str, wait: float = 90) -> bytes | None:
    """The non-delivery report in the user's INBOX that carries the message MESSAGE_ID."""

    def look() -> bytes | None:
        deadline = time.monotonic() + wait
        with imaplib.IMAP4_SSL(DROPLET_IPV4, IMAPS_PORT, ssl_context=unverified(), timeout=60) as imap:
            imap.login(user, password)
            while True:
                imap.select("INBOX", readonly=True)
                _, found = imap.search(None, "SUBJECT", '"Undelivered Mail Returned to Sender"')
                for number in found[0].split():
                    _, data = imap.fetch(number, "(RFC822)")
                    raw = data[0][1] if isinstance(data[0], tuple) else b""
                    if message_id.encode() in raw:
                        return raw
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.5)

    return network.in_netns(WORLD_NS, look)


def test_a_redirect_the_relay_refuses_returns_to_the_user_not_to_the_sender(lab: LabInfo) -> None:
    user, password = alice(lab)
    script = base64.b64encode(f'redirect "{ELSEWHERE}";\n'.encode()).decode()
    put = host.guest(f"echo {script} | base64 -d | sudo doveadm sieve put -a -u {user} elsewhere", lab)
    assert put.returncode == 0, put.stderr
    try:
        msg = message(f"dana@{REMOTE_DOMAIN}", user, "for my other address")
        send_inbound(msg)
        report = bounce_of(user, password, msg["Message-ID"])
    finally:
        host.guest(f"sudo doveadm sieve deactivate -u {user}; sudo doveadm sieve delete -u {user} elsewhere", lab)
    assert report is not None, "no report of the refused redirect reached the user"
    assert ELSEWHERE.encode() in report and b"Access denied" in report, report[:2000]
    # Nothing about the message left for its sender (or anyone) through the relay, or waits to.
    relayed = [m.name for m in Path(lab.ses_spool).glob("*.eml") if msg["Message-ID"].encode() in m.read_bytes()]
    assert relayed == [], f"a report of the refused redirect went out through the relay: {relayed}"
    queued = host.guest("sudo postqueue -j", lab).stdout
    assert f"dana@{REMOTE_DOMAIN}" not in queued, queued
