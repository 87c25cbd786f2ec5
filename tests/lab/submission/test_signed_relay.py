"""Submission to the relay, signed: a user's message submitted on 587 (STARTTLS) or 465 (implicit
TLS) reaches the SES stand-in with the envelope it was given and a DKIM signature that verifies
against the key the domain's DNS publishes, and no trace of the user's machine."""

from __future__ import annotations

import email

import dkim
import pytest

from infra.core.facts import SUBMISSIONS_PORT
from infra.lab import state
from infra.lab.mail import message, relayed, submit
from infra.lab.network import REMOTE_DOMAIN
from tests.support.lab import LAB_MARKS, alice
from tests.support.mail import dkim_dns

pytestmark = LAB_MARKS


@pytest.mark.parametrize("port", [587, SUBMISSIONS_PORT])
def test_submission_reaches_the_relay_dkim_signed(lab: state.LabInfo, port: int) -> None:
    user, password = alice(lab)
    msg = message(user, f"dana@{REMOTE_DOMAIN}", f"outbound on {port}")
    submit(msg, user, password, port)
    accepted = relayed(lab, msg["Message-ID"])
    assert accepted is not None, "the SES stand-in received nothing"
    assert accepted.sender == user and accepted.recipients == [f"dana@{REMOTE_DOMAIN}"]
    txt = dkim_dns(lab)
    assert dkim.verify(accepted.raw, dnsfunc=lambda name, timeout=5: txt.get(name, b""))
    assert b"s=mail;" in accepted.raw.replace(b" ", b"") and b"d=example.net" in accepted.raw
    # The user's machine and address leave no trace: the server's Received line names only itself.
    received = [" ".join(h.split()) for h in email.message_from_bytes(accepted.raw).get_all("Received", [])]
    assert len(received) == 1 and received[0].startswith("by mail.example.net (Postfix) with ESMTPSA id "), received
    assert "[" not in received[0] and "from" not in received[0].split(";")[0], received
