"""The sender's identity: a logged-in user may send only as an address she owns; sending as
another user is refused (553)."""

from __future__ import annotations

import smtplib

import pytest

from infra.lab import state
from infra.lab.mail import message, submit
from infra.lab.network import REMOTE_DOMAIN
from tests.support.lab import LAB_MARKS, alice

pytestmark = LAB_MARKS


def test_sending_as_another_user_is_refused(lab: state.LabInfo) -> None:
    user, password = alice(lab)
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        submit(message("bob@example.net", f"dana@{REMOTE_DOMAIN}", "spoof"), user, password)
    ((code, text),) = refused.value.recipients.values()
    assert code == 553 and b"not owned by user" in text
