"""Real mail through the lab host, from the lab's outside world (its own network namespace)."""

from __future__ import annotations

import email.message
import email.utils
import imaplib
import json
import smtplib
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from infra.core.facts import IMAPS_PORT, SMTP_PORT, SUBMISSION_PORT, SUBMISSIONS_PORT
from infra.lab.network import REMOTE_DOMAIN, REMOTE_IP, WORLD_NS, in_netns
from infra.lab.state import LabInfo
from infra.tools.rehearsal import DROPLET_IPV4

TIMEOUT = 60


def unverified() -> ssl.SSLContext:
    """For the tests' mail clients, which reach the host by address (the world namespace has no
    resolver) and may meet the self-signed certificate a new host serves until certbot's comes;
    served_certificate() is how tests check the certificate itself."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def starttls_as(smtp: smtplib.SMTP, server_name: str, context: ssl.SSLContext) -> None:
    """STARTTLS on a connection dialled by address, the certificate checked against SERVER_NAME
    (the world namespace resolves nothing; smtplib checks the name it dialled)."""
    smtp._host = server_name  # type: ignore[attr-defined]
    smtp.starttls(context=context)


def served_certificate(port: int, server_name: str, cafile: Path | None = None) -> bytes:
    """The certificate (DER) the host serves on PORT to a client asking for SERVER_NAME (STARTTLS
    on 25 and 587). With CAFILE it must verify against it and match the name, or ssl raises."""

    def peer() -> bytes:
        context = unverified() if cafile is None else ssl.create_default_context(cafile=str(cafile))
        if port in (SMTP_PORT, SUBMISSION_PORT):
            with smtplib.SMTP(DROPLET_IPV4, port, timeout=TIMEOUT) as smtp:
                starttls_as(smtp, server_name, context)
                der: bytes | None = smtp.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        else:
            with context.wrap_socket(socket.create_connection((DROPLET_IPV4, port), timeout=TIMEOUT),
                                     server_hostname=server_name) as tls:  # fmt: skip
                der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der

    served: bytes = in_netns(WORLD_NS, peer)
    return served


def message(
    sender: str, recipient: str, subject: str, body: str = "Hello from the mailroom lab.\n"
) -> email.message.EmailMessage:
    msg = email.message.EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, recipient, subject
    msg["Date"] = email.utils.formatdate()
    msg["Message-ID"] = email.utils.make_msgid(domain=sender.rpartition("@")[2])
    msg.set_content(body)
    return msg


def send_inbound(msg: email.message.EmailMessage) -> None:
    """As another domain's mail server would: port 25, STARTTLS, from its own address."""

    def send() -> None:
        with smtplib.SMTP(DROPLET_IPV4, SMTP_PORT, local_hostname=f"mx.{REMOTE_DOMAIN}",
                          source_address=(REMOTE_IP, 0), timeout=TIMEOUT) as smtp:  # fmt: skip
            smtp.starttls(context=unverified())
            smtp.send_message(msg)

    in_netns(WORLD_NS, send)


def submit(msg: email.message.EmailMessage, user: str, password: str, port: int = SUBMISSION_PORT) -> None:
    """As a mail client would: authenticated submission on 587 (STARTTLS) or 465 (TLS)."""

    def send() -> None:
        if port == SUBMISSIONS_PORT:
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(DROPLET_IPV4, port, context=unverified(), timeout=TIMEOUT)
        else:
            smtp = smtplib.SMTP(DROPLET_IPV4, port, timeout=TIMEOUT)
            smtp.starttls(context=unverified())
        with smtp:
            smtp.login(user, password)
            smtp.send_message(msg)

    in_netns(WORLD_NS, send)


def find(user: str, password: str, message_id: str, folder: str = "INBOX", wait: float = 60) -> bytes | None:
    """The message with this Message-ID in the folder, over IMAPS, waiting for delivery."""

    def look() -> bytes | None:
        deadline = time.monotonic() + wait
        with imaplib.IMAP4_SSL(DROPLET_IPV4, IMAPS_PORT, ssl_context=unverified(), timeout=TIMEOUT) as imap:
            imap.login(user, password)
            while True:
                imap.select(f'"{folder}"', readonly=True)
                _, found = imap.search(None, "HEADER", "Message-ID", message_id)
                if found[0]:
                    _, data = imap.fetch(found[0].split()[-1], "(RFC822)")
                    part = data[0]
                    return part[1] if isinstance(part, tuple) else None
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.2)

    return in_netns(WORLD_NS, look)


@dataclass(frozen=True)
class Relayed:
    sender: str
    recipients: list[str]
    login: str
    raw: bytes


def relayed(info: LabInfo, message_id: str, wait: float = 60) -> Relayed | None:
    """The message as the SES stand-in accepted it, waiting for Postfix to relay it."""
    spool = Path(info.ses_spool)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        for meta in sorted(spool.glob("*.json")):
            raw = meta.with_suffix(".eml").read_bytes()
            if message_id.encode() in raw:
                envelope = json.loads(meta.read_text())
                return Relayed(envelope["from"], envelope["to"], envelope["login"], raw)
        time.sleep(0.2)
    return None


def smoke(info: LabInfo) -> list[str]:
    """One round trip, told in plain words: inbound to a mailbox, and out through the relay."""
    lines = []
    user, password = next(iter(info.passwords.items()))
    domain = user.rpartition("@")[2]
    inbound = message(f"dana@{REMOTE_DOMAIN}", user, "lab smoke: inbound")
    started = time.monotonic()
    send_inbound(inbound)
    found = find(user, password, inbound["Message-ID"])
    elapsed = (time.monotonic() - started) * 1000
    if found is None:
        raise RuntimeError(f"inbound mail to {user} did not reach INBOX within 60 s")
    lines.append(
        f"inbound: dana@{REMOTE_DOMAIN} -> {user} on port 25, found in INBOX over IMAPS after {elapsed:.0f} ms"
    )
    outbound = message(user, f"dana@{REMOTE_DOMAIN}", "lab smoke: outbound")
    started = time.monotonic()
    submit(outbound, user, password)
    accepted = relayed(info, outbound["Message-ID"])
    elapsed = (time.monotonic() - started) * 1000
    if accepted is None:
        raise RuntimeError("submitted mail did not reach the SES stand-in within 60 s")
    signed = b"DKIM-Signature:" in accepted.raw and f"d={domain}".encode() in accepted.raw
    lines.append(
        f"outbound: {user} -> dana@{REMOTE_DOMAIN} submitted on 587, accepted by the SES stand-in after "
        f"{elapsed:.0f} ms, {'DKIM-signed for ' + domain if signed else 'NOT DKIM-signed'}"
    )
    return lines
