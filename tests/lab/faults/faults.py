"""What the fault tests need to count mail: send it as a real MTA or client would (retrying what
was temp-failed), and find it again by Message-ID at the relay and in the mailboxes."""

from __future__ import annotations

import collections
import email
import email.message
import imaplib
import json
import shlex
import smtplib
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.core.facts import IMAPS_PORT, SMTP_PORT, SUBMISSION_PORT
from infra.lab import host, network
from infra.lab.mail import message, unverified
from infra.lab.network import REMOTE_DOMAIN, REMOTE_IP, WORLD_NS
from infra.lab.state import LabInfo
from infra.tools.rehearsal import DROPLET_IPV4
from tests.support.wait import wait_for

TIMEOUT = 30


@dataclass
class Outcome:
    """Every SMTP reply a message got, and whether it was finally accepted (250)."""

    message_id: str
    replies: list[int] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return bool(self.replies) and self.replies[-1] == 250

    @property
    def refused_for_good(self) -> bool:
        return any(500 <= code < 600 for code in self.replies)


def _reply_code(exc: smtplib.SMTPException | OSError) -> int:
    """The SMTP code of a failed attempt; 0 for a connection that failed or broke off (an MTA
    treats that as temporary and tries again)."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return min(code for code, _ in exc.recipients.values())
    if isinstance(exc, smtplib.SMTPSenderRefused | smtplib.SMTPDataError | smtplib.SMTPResponseException):
        return exc.smtp_code
    return 0


def _send_once(msg: email.message.EmailMessage, port: int, login: tuple[str, str] | None) -> int:
    def send() -> int:
        if port == SMTP_PORT:
            smtp = smtplib.SMTP(DROPLET_IPV4, port, local_hostname=f"mx.{REMOTE_DOMAIN}",
                                source_address=(REMOTE_IP, 0), timeout=TIMEOUT)  # fmt: skip
        else:
            smtp = smtplib.SMTP(DROPLET_IPV4, port, timeout=TIMEOUT)
        with smtp:
            smtp.starttls(context=unverified())
            if login:
                smtp.login(*login)
            smtp.send_message(msg)
        return 250

    try:
        return network.in_netns(WORLD_NS, send)
    except (smtplib.SMTPException, OSError) as exc:
        return _reply_code(exc)


def send(
    outcome: Outcome,
    msg: email.message.EmailMessage,
    *,
    port: int = SMTP_PORT,
    login: tuple[str, str] | None = None,
    attempts: int = 1,
    pause: float = 1.0,
) -> Outcome:
    """Send MSG as an MTA would: try again after a temporary failure, never after a 5xx."""
    for attempt in range(attempts):
        code = _send_once(msg, port, login)
        outcome.replies.append(code)
        if code == 250 or 500 <= code < 600:
            break
        if attempt + 1 < attempts:
            time.sleep(pause)
    return outcome


def inbound(tag: str, recipient: str, count: int) -> list[tuple[Outcome, email.message.EmailMessage]]:
    """COUNT messages from the remote domain to RECIPIENT, each with its own Message-ID."""
    batch = []
    for i in range(count):
        msg = message(f"dana@{REMOTE_DOMAIN}", recipient, f"{tag} {i + 1}/{count}")
        batch.append((Outcome(msg["Message-ID"]), msg))
    return batch


def retry_until_accepted(batch: Iterable[tuple[Outcome, email.message.EmailMessage]], attempts: int = 20) -> None:
    """The sending MTA's queue run: whatever was temp-failed is offered again."""
    for outcome, msg in batch:
        if not outcome.accepted and not outcome.refused_for_good:
            send(outcome, msg, attempts=attempts)


def mailbox_ids(user: str, password: str, folders: Iterable[str] = ("INBOX", "Junk")) -> collections.Counter[str]:
    """How many times each Message-ID is stored in the user's folders, over IMAPS."""

    def count() -> collections.Counter[str]:
        found: collections.Counter[str] = collections.Counter()
        with imaplib.IMAP4_SSL(DROPLET_IPV4, IMAPS_PORT, ssl_context=unverified(), timeout=TIMEOUT) as imap:
            imap.login(user, password)
            for folder in folders:
                status, data = imap.select(f'"{folder}"', readonly=True)
                if status != "OK" or data[0] == b"0":
                    continue
                _, fetched = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
                for part in fetched:
                    if isinstance(part, tuple):
                        value = email.message_from_bytes(part[1])["Message-ID"]
                        if value:
                            found[value.strip()] += 1
        return found

    return network.in_netns(WORLD_NS, count)


def relayed_ids(info: LabInfo) -> collections.Counter[str]:
    """How many times the SES stand-in accepted each Message-ID."""
    found: collections.Counter[str] = collections.Counter()
    for raw in Path(info.ses_spool).glob("*.eml"):
        value = email.message_from_bytes(raw.read_bytes())["Message-ID"]
        if value:
            found[value.strip()] += 1
    return found


def relayed_messages(info: LabInfo) -> list[tuple[dict[str, object], email.message.Message]]:
    """Every (envelope, message) the SES stand-in accepted."""
    accepted = []
    for meta in sorted(Path(info.ses_spool).glob("*.json")):
        envelope = json.loads(meta.read_text())
        accepted.append((envelope, email.message_from_bytes(meta.with_suffix(".eml").read_bytes())))
    return accepted


def relayed_raw(info: LabInfo) -> list[bytes]:
    """Every message the SES stand-in accepted, byte for byte (DKIM is checked on these)."""
    return [path.read_bytes() for path in sorted(Path(info.ses_spool).glob("*.eml"))]


def queue(info: LabInfo) -> list[dict[str, Any]]:
    """The host's mail queue, one dict per message (postqueue -j)."""
    done = host.guest("sudo postqueue -j", info)
    # A postqueue that failed must not read as an empty queue.
    assert done.returncode == 0, f"postqueue -j on the lab host: exit {done.returncode}: {done.stderr.strip()}"
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def flush_queue(info: LabInfo) -> None:
    """What the queue manager does by itself a few minutes later: try every deferred message now."""
    host.guest("sudo postqueue -f", info)


def root(info: LabInfo, command: str) -> str:
    result = host.guest(f"sudo sh -c {shlex.quote(command)}", info)
    if result.returncode != 0:
        raise AssertionError(f"{command!r} on the lab host: exit {result.returncode}: {result.stderr.strip()[-500:]}")
    return result.stdout


def set_relay(info: LabInfo, mode: str) -> None:
    """The SES stand-in: ok, 4xx (451 to every recipient) or away (its port closed)."""
    (Path(info.ses_spool) / "mode").write_text(mode + "\n")

    def port_open() -> bool:
        try:
            with socket.create_connection((network.SES_IP, SUBMISSION_PORT), timeout=1):
                return True
        except OSError:
            return False

    # The stand-in reads its mode file every 0.2 s; its port says when it has noticed.
    wait_for(lambda: network.in_netns(WORLD_NS, port_open) == (mode != "away"), 10, 0.5, f"the relay going {mode}")
