"""Outbound mail is not scanned: what a logged-in user submits is DKIM-signed and relayed with no
spam verdict, however spam-like it looks."""

from __future__ import annotations

import smtplib

from infra.lab import network, state
from infra.lab.mail import relayed
from infra.lab.network import REMOTE_DOMAIN
from infra.tools.rehearsal import DROPLET_IPV4
from tests.support.lab import LAB_MARKS, alice
from tests.support.spam import scored_spam

pytestmark = LAB_MARKS


def test_mail_from_a_logged_in_user_is_relayed_unscanned(lab: state.LabInfo) -> None:
    """Outbound mail is signed, not filtered: a message that would be marked as spam if it came
    in from outside (and more so from an address without reverse DNS, as here) reaches the
    relay with no spam verdict. (rspamd refuses GTUBE itself from anyone: it is checked before
    any setting applies.)"""
    import time

    from infra.core.facts import SUBMISSION_PORT
    from infra.lab.mail import unverified

    user, password = alice(lab)
    tag = f"SUSPENDED{time.time_ns()}"

    def send() -> None:
        with smtplib.SMTP(DROPLET_IPV4, SUBMISSION_PORT, timeout=60) as smtp:
            smtp.starttls(context=unverified())
            smtp.login(user, password)
            smtp.sendmail(user, [f"dana@{REMOTE_DOMAIN}"], scored_spam(user, f"dana@{REMOTE_DOMAIN}", tag).encode())

    network.in_netns(network.WORLD_NS, send)
    accepted = relayed(lab, tag)
    assert accepted is not None, "the SES stand-in received nothing"
    headers = accepted.raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].lower()
    for verdict in (b"x-spam", b"x-rspamd-action", b"x-spamd-result"):
        assert verdict not in headers, f"the relayed message carries a spam verdict ({verdict.decode()})"
    assert b"dkim-signature:" in headers
