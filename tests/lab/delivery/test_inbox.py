"""Inbound delivery: a message from another domain's MX, on port 25, reaches the user's INBOX and
is read back over IMAPS."""

from __future__ import annotations

from infra.lab import state
from infra.lab.mail import find, message, send_inbound
from infra.lab.network import REMOTE_DOMAIN
from tests.support.lab import LAB_MARKS, alice

pytestmark = LAB_MARKS


def test_inbound_mail_reaches_the_inbox_over_imaps(lab: state.LabInfo) -> None:
    user, password = alice(lab)
    msg = message(f"dana@{REMOTE_DOMAIN}", user, "inbound")
    send_inbound(msg)
    raw = find(user, password, msg["Message-ID"])
    assert raw is not None and b"Hello from the mailroom lab." in raw
    assert b"Received: from mx.example.com" in raw
