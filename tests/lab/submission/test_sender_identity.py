"""The sender's identity: a logged-in user may send only as an address she owns; sending as
another user, or with the null sender that only bounces may use, is refused (553), on both
submission ports."""

from __future__ import annotations

import smtplib

import pytest

from infra.core.facts import SUBMISSION_PORT, SUBMISSIONS_PORT
from infra.lab import state
from infra.lab.mail import message, submit, unverified
from infra.lab.network import REMOTE_DOMAIN, WORLD_NS, in_netns
from infra.tools.rehearsal import DROPLET_IPV4
from tests.support.lab import LAB_MARKS, alice

pytestmark = LAB_MARKS


def test_sending_as_another_user_is_refused(lab: state.LabInfo) -> None:
    user, password = alice(lab)
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        submit(message("bob@example.net", f"dana@{REMOTE_DOMAIN}", "spoof"), user, password)
    ((code, text),) = refused.value.recipients.values()
    assert code == 553 and b"not owned by user" in text


@pytest.mark.parametrize("port", [SUBMISSION_PORT, SUBMISSIONS_PORT])
def test_a_logged_in_user_cannot_send_with_the_null_sender(lab: state.LabInfo, port: int) -> None:
    """MAIL FROM:<> would let a user's message claim to be a bounce, free of the sender check
    that ties every other envelope sender to the login."""
    user, password = alice(lab)

    def attempt() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        if port == SUBMISSIONS_PORT:
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(DROPLET_IPV4, port, context=unverified(), timeout=60)
        else:
            smtp = smtplib.SMTP(DROPLET_IPV4, port, timeout=60)
            smtp.starttls(context=unverified())
        with smtp:
            smtp.login(user, password)
            return smtp.mail(""), smtp.rcpt(f"dana@{REMOTE_DOMAIN}")

    mail, rcpt = in_netns(WORLD_NS, attempt)
    assert mail[0] == 250  # smtpd_delay_reject: the verdict comes at RCPT TO
    assert rcpt == (553, b"5.7.1 <>: Sender address rejected: the null sender is for bounces, not for logged-in users")
