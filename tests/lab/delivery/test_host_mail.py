"""The host's own mail: what cron, certbot and fail2ban send (as root, through sendmail, From the
host name) reaches an outside address through the relay, whose sending policy allows it.

The SES stand-in applies the SMTP user's IAM policy as the program declares it (its
`ses:FromAddress` condition) and answers "554 Access denied" to a From outside it, as SES does.
"""

from __future__ import annotations

import email
import email.utils
import json
import time
import uuid
from pathlib import Path

import pytest

from infra.core.settings import Relay, Settings, parse_settings
from infra.core.stack import stack_config
from infra.lab import host, state
from infra.lab.mail import relayed
from tests.support.lab import LAB_MARKS

pytestmark = LAB_MARKS


def lab_settings(lab: state.LabInfo) -> Settings:
    return parse_settings(stack_config(lab.stack, lab.overrides))


def sendmail(lab: state.LabInfo, recipient: str, subject: str, sender: str | None = None) -> None:
    """A message handed to the host's sendmail as root, the way cron hands over a job's output."""
    headers = f"From: {sender}\\n" if sender else ""
    envelope = f"-f {sender} " if sender else ""
    body = f"{headers}Subject: {subject}\\n\\nThe job printed one line.\\n"
    result = host.guest(f"printf '{body}' | sudo /usr/sbin/sendmail -i {envelope}{recipient}", lab)
    assert result.returncode == 0, f"sendmail on the lab host: exit {result.returncode}: {result.stderr.strip()}"


def refusals(lab: state.LabInfo) -> list[dict[str, object]]:
    log = Path(lab.ses_spool) / "refused.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_a_cron_style_mail_to_the_alert_address_leaves_through_the_relay(lab: state.LabInfo) -> None:
    settings = lab_settings(lab)
    if settings.relay is not Relay.SES:
        pytest.skip(f"the relay is {settings.relay}: the SES sending policy does not apply")
    subject = f"cron: backup report {uuid.uuid4().hex[:8]}"
    sendmail(lab, settings.alert_email, subject)
    accepted = relayed(lab, subject)
    assert accepted is not None, (
        f"the host's mail to {settings.alert_email} never reached the relay; refused there: {refusals(lab)}"
    )
    assert accepted.recipients == [settings.alert_email]
    header_from = email.utils.parseaddr(email.message_from_bytes(accepted.raw)["From"])[1]
    assert header_from.endswith("@" + settings.host_name), header_from


def test_the_relay_refuses_a_sender_outside_the_policy(lab: state.LabInfo) -> None:
    # The planted fault that the test above exists to catch: a From the policy does not allow.
    settings = lab_settings(lab)
    if settings.relay is not Relay.SES:
        pytest.skip(f"the relay is {settings.relay}: the SES sending policy does not apply")
    outsider = f"cron-{uuid.uuid4().hex[:8]}@example.com"
    sendmail(lab, settings.alert_email, "cron: from elsewhere", sender=outsider)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(r["from"] == outsider for r in refusals(lab)):
        time.sleep(0.5)
    assert any(r["from"] == outsider for r in refusals(lab)), f"the relay took mail From {outsider}"
