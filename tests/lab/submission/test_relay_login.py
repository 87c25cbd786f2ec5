"""The relay login: the host logs in to the relay with the SMTP credentials the program made for
it (the IAM user's access key)."""

from __future__ import annotations

from infra.lab import state
from infra.lab.mail import message, relayed, submit
from infra.lab.network import REMOTE_DOMAIN
from tests.support.lab import LAB_MARKS, alice

pytestmark = LAB_MARKS


def test_relay_login_is_the_programs_smtp_credentials(lab: state.LabInfo) -> None:
    user, password = alice(lab)
    msg = message(user, f"dana@{REMOTE_DOMAIN}", "who logged in")
    submit(msg, user, password)
    accepted = relayed(lab, msg["Message-ID"])
    assert accepted is not None
    assert accepted.login == lab.ses_user and lab.ses_user.startswith("AKIA")
