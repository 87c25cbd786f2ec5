"""Authentication on the submission port: a wrong password gets 535, and AUTH is not offered
before STARTTLS (no password crosses the network in the clear)."""

from __future__ import annotations

import smtplib

import pytest

from infra.lab import network, state
from infra.lab.mail import message, submit
from infra.lab.network import REMOTE_DOMAIN
from infra.tools.rehearsal import DROPLET_IPV4
from tests.support.lab import LAB_MARKS, alice

pytestmark = LAB_MARKS


def test_wrong_password_gets_535(lab: state.LabInfo) -> None:
    user, _ = alice(lab)
    with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        submit(message(user, f"dana@{REMOTE_DOMAIN}", "x"), user, "not-the-password")
    assert refused.value.smtp_code == 535


def test_auth_is_not_offered_before_tls(lab: state.LabInfo) -> None:
    def plain() -> bool:
        with smtplib.SMTP(DROPLET_IPV4, 587, timeout=60) as smtp:
            smtp.ehlo()
            return smtp.has_extn("auth")

    assert network.in_netns(network.WORLD_NS, plain) is False
