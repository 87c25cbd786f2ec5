"""Recipients the host refuses on port 25: an unknown user of its domain gets 550, and a foreign
domain is not relayed (554)."""

from __future__ import annotations

from infra.lab import state
from infra.lab.network import REMOTE_DOMAIN
from tests.support.lab import LAB_MARKS
from tests.support.mail import smtp_reply

pytestmark = LAB_MARKS


def test_unknown_user_gets_550_and_foreign_domains_are_not_relayed(lab: state.LabInfo) -> None:
    code, text = smtp_reply(lab, f"dana@{REMOTE_DOMAIN}", "nobody@example.net")
    assert code == 550 and b"User unknown" in text
    code, text = smtp_reply(lab, f"dana@{REMOTE_DOMAIN}", "victim@example.org")
    assert code == 554 and b"Relay access denied" in text
