"""Refused outright: rspamd answers GTUBE (its reject pattern) with a 5xx at the end of DATA, so
the message is never accepted."""

from __future__ import annotations

import smtplib

import pytest

from infra.lab import state
from infra.lab.mail import message, send_inbound
from infra.lab.network import REMOTE_DOMAIN
from tests.support.lab import LAB_MARKS, alice
from tests.support.spam import GTUBE

pytestmark = LAB_MARKS


def test_rspamd_refuses_the_reject_gtube_with_a_5xx(lab: state.LabInfo) -> None:
    if lab.overrides.get("spamFilter", "spamassassin") != "rspamd":
        pytest.skip("SpamAssassin marks GTUBE as spam (Junk) rather than refusing it")
    user, _ = alice(lab)
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send_inbound(message(f"dana@{REMOTE_DOMAIN}", user, "reject", body=f"{GTUBE}\n"))
    assert refused.value.smtp_code == 554
