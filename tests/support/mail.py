"""Mail as the outside world sees the lab host: a recipient's reply on port 25, and the DKIM keys
its DNS publishes."""

from __future__ import annotations

import email
import smtplib
from pathlib import Path

from infra.lab import network, state
from infra.lab.network import REMOTE_DOMAIN
from infra.tools.rehearsal import DROPLET_IPV4


def smtp_reply(lab: state.LabInfo, sender: str, recipient: str) -> tuple[int, bytes]:
    """What the host answers on port 25 to RCPT TO:<RECIPIENT> from the remote MX."""

    def attempt() -> tuple[int, bytes]:
        with smtplib.SMTP(DROPLET_IPV4, 25, local_hostname=f"mx.{REMOTE_DOMAIN}",
                          source_address=(network.REMOTE_IP, 0), timeout=60) as smtp:  # fmt: skip
            smtp.ehlo()
            smtp.mail(sender)
            return smtp.rcpt(recipient)

    return network.in_netns(network.WORLD_NS, attempt)


def dkim_dns(lab: state.LabInfo) -> dict[bytes, bytes]:
    """TXT answers from the records the lab DNS serves (the program's records for the lab)."""
    zone = Path(lab.zone).read_text()
    answers = {}
    for line in zone.splitlines():
        parts = line.split("\t")
        if len(parts) == 5 and parts[3] == "TXT":
            answers[parts[0].encode()] = b"".join(s.encode() for s in parts[4].split('"')[1::2])
    return answers


def status_mails(lab: state.LabInfo) -> list[email.message.Message]:
    """The daily status check's mails to the owner, as the SES stand-in received them, oldest first."""
    found = []
    for path in sorted(Path(lab.ses_spool).glob("*.eml")):
        message = email.message_from_bytes(path.read_bytes())
        if str(message.get("Subject", "")).startswith("mailroom status of"):
            found.append(message)
    return found
