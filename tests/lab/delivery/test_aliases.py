"""Aliases: mail to an alias of the domain (postmaster) reaches the mailbox it points to."""

from __future__ import annotations

from infra.lab import state
from infra.lab.mail import find, message, send_inbound
from infra.lab.network import REMOTE_DOMAIN
from tests.support.lab import LAB_MARKS, alice

pytestmark = LAB_MARKS


def test_mail_to_an_alias_reaches_its_mailbox(lab: state.LabInfo) -> None:
    user, password = alice(lab)
    msg = message(f"dana@{REMOTE_DOMAIN}", "postmaster@example.net", "to postmaster")
    send_inbound(msg)
    assert find(user, password, msg["Message-ID"]) is not None
