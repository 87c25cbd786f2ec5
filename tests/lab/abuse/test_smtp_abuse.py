"""Open-relay and spoofing attempts from outside, and malformed or hostile SMTP on port 25, each
as real SMTP against the lab host, asserting what a sender or a user sees.

The relay and spoofing attempts are a table in the spirit of the classic open-relay test suites:
every attempt must get the refusal Postfix documents for it, and afterwards neither the SES
stand-in (the only way out) nor the host's queue holds anything for the foreign recipients. The
hostile SMTP tests feed port 25 what smtplib cannot say (talking before the greeting, unasked
pipelining, bare LF / bare CR, oversized input) on raw sockets, and each ends by checking that a
normal message still reaches its mailbox.
"""

from __future__ import annotations

import base64
import email.utils
import imaplib
import json
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from infra.core.facts import IMAPS_PORT, SMTP_PORT, SUBMISSION_PORT, SUBMISSIONS_PORT
from infra.lab import host, network
from infra.lab.mail import unverified
from infra.lab.network import REMOTE_DOMAIN, REMOTE_IP, WORLD_NS
from infra.lab.state import LabInfo
from infra.tools.rehearsal import DROPLET_IPV4
from tests.support.lab import world_address, zone_changed

pytestmark = [pytest.mark.lab, pytest.mark.reliability]

HOST = "mail.example.net"
TIMEOUT = 60
T = TypeVar("T")


def world(fn: Callable[[], T]) -> T:
    """FN with its sockets in the lab's outside world."""
    return network.in_netns(WORLD_NS, fn)


@dataclass(frozen=True)
class Reply:
    code: int
    text: bytes

    def __str__(self) -> str:
        return self.text.decode(errors="replace")


class Smtp:
    """One SMTP conversation on a raw socket: every byte is ours to choose (smtplib would fix them)."""

    def __init__(self, port: int = SMTP_PORT, source: str = REMOTE_IP, implicit_tls: bool = False) -> None:
        sock = socket.create_connection((DROPLET_IPV4, port), timeout=TIMEOUT, source_address=(source, 0))
        self.sock: socket.socket = unverified().wrap_socket(sock, server_hostname=HOST) if implicit_tls else sock
        self.pending = b""

    def __enter__(self) -> Smtp:
        return self

    def __exit__(self, *_: object) -> None:
        self.sock.close()

    def line(self) -> bytes:
        while b"\n" not in self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"the server closed the connection; unread: {self.pending!r}")
            self.pending += data
        line, _, self.pending = self.pending.partition(b"\n")
        return line.rstrip(b"\r")

    def reply(self) -> Reply:
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        return Reply(int(lines[-1][:3]), b"\n".join(lines))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, line: str | bytes) -> Reply:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def starttls(self) -> Reply:
        reply = self.command("STARTTLS")
        assert reply.code == 220, f"STARTTLS refused: {reply}"
        self.sock = unverified().wrap_socket(self.sock, server_hostname=HOST)
        return reply

    def login(self, user: str, password: str) -> None:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        reply = self.command(f"AUTH PLAIN {token}")
        assert reply.code == 235, f"login as {user} refused: {reply.code}"

    def data(self, content: bytes) -> Reply:
        """DATA, then CONTENT as is (it must carry its own end-of-data), and the final reply."""
        reply = self.command("DATA")
        if reply.code != 354:
            return reply
        self.send(content)
        return self.reply()


def greeted(port: int = SMTP_PORT, helo: str = "mx.example.com") -> tuple[Smtp, Reply]:
    """A conversation past the greeting and EHLO (whose reply comes with it), from the remote MX."""
    smtp = Smtp(port, implicit_tls=port == SUBMISSIONS_PORT)
    greeting = smtp.reply()
    assert greeting.code == 220, f"greeting: {greeting}"
    ehlo = smtp.command(f"EHLO {helo}")
    assert ehlo.code == 250, f"EHLO: {ehlo}"
    return smtp, ehlo


def send_one(content: bytes, sender: str = "dana@example.com", recipient: str = "alice@example.net") -> list[Reply]:
    """MAIL, RCPT and DATA with CONTENT as is (carrying its own end-of-data) on port 25."""

    def talk() -> list[Reply]:
        smtp, _ = greeted()
        with smtp:
            replies = [smtp.command(f"MAIL FROM:<{sender}>".encode()), smtp.command(f"RCPT TO:<{recipient}>".encode())]
            return [*replies, smtp.data(content)]

    return world(talk)


def headers(subject: str, message_id: str, sender: str = "dana@example.com", to: str = "alice@example.net") -> bytes:
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: {email.utils.formatdate()}\r\n"
        f"Message-ID: {message_id}\r\n"
    ).encode()


def new_id(tag: str) -> str:
    return f"<{tag}.{uuid.uuid4().hex}@example.com>"


# --- what a user sees: mailboxes over IMAPS, the relay's spool, the host's queue ------------------


def copies(
    lab: LabInfo, user: str, message_id: str, wait: float = 60, folders: tuple[str, ...] = ("INBOX", "Junk")
) -> list[bytes]:
    """Every copy of the message (by Message-ID header) in the user's FOLDERS, over IMAPS,
    waiting up to WAIT seconds for the first to arrive."""

    def look() -> list[bytes]:
        deadline = time.monotonic() + wait
        with imaplib.IMAP4_SSL(DROPLET_IPV4, IMAPS_PORT, ssl_context=unverified(), timeout=TIMEOUT) as imap:
            imap.login(user, lab.passwords[user])
            while True:
                found = []
                for folder in folders:
                    if imap.select(f'"{folder}"', readonly=True)[0] != "OK":
                        continue
                    _, numbers = imap.search(None, "HEADER", "Message-ID", message_id)
                    for number in numbers[0].split():
                        _, data = imap.fetch(number, "(RFC822)")
                        part = data[0]
                        if isinstance(part, tuple):
                            found.append(part[1])
                if found or time.monotonic() > deadline:
                    return found
                time.sleep(0.3)

    return world(look)


def assert_still_delivers(lab: LabInfo) -> None:
    """The server still answers, and a normal message still reaches alice's INBOX. Delivery is in
    order, so a message refused or lost earlier would have arrived by now if it was going to."""
    message_id = new_id("still-up")
    replies = send_one(headers("still up", message_id) + b"\r\nA normal message after the hostile one.\r\n.\r\n")
    assert [r.code for r in replies] == [250, 250, 250], [str(r) for r in replies]
    assert len(copies(lab, "alice@example.net", message_id)) == 1, "a normal message did not arrive after"


def relayed_recipients(lab: LabInfo) -> list[str]:
    """Every envelope recipient the SES stand-in (the only way out) has accepted."""
    return [r.lower() for meta in Path(lab.ses_spool).glob("*.json") for r in json.loads(meta.read_text())["to"]]


def queued_recipients(lab: LabInfo) -> list[str]:
    """Every recipient of every message in the host's Postfix queue (`postqueue -j`)."""
    result = host.guest("sudo postqueue -j", lab)
    assert result.returncode == 0, result.stderr
    return [r["address"].lower() for line in result.stdout.splitlines() for r in json.loads(line)["recipients"]]


def postconf(lab: LabInfo, name: str) -> int:
    result = host.guest(f"/usr/sbin/postconf -h {name}", lab)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip())


# --- open-relay and spoofing attempts -------------------------------------------------------------

# The replies Postfix documents (postconf(5), RESTRICTION_CLASS_README, SMTPD_ACCESS_README).
Expect = tuple[int, str, str]
RELAY_DENIED: Expect = (554, "5.7.1", "Relay access denied")  # reject_unauth_destination, relay_domains_reject_code
NOT_LOCAL: Expect = (550, "5.1.1", "User unknown in local recipient table")  # local_recipient_maps
NOT_FQDN: Expect = (504, "5.5.2", "need fully-qualified address")  # reject_non_fqdn_recipient
BAD_SYNTAX: Expect = (501, "5.1.3", "Bad recipient address syntax")  # smtpd's address parser
NO_AUTH_HERE: Expect = (503, "5.5.1", "authentication not enabled")  # smtpd_sasl_auth_enable = no on 25
NOT_AUTHORIZED: Expect = (550, "5.7.0", "insufficient authorization")  # smtpd_authorized_xclient/xforward_hosts
NEED_TLS: Expect = (530, "5.7.0", "Must issue a STARTTLS command first")  # smtpd_tls_security_level = encrypt
CLIENT_REJECTED: Expect = (554, "5.7.1", "Client host rejected: Access denied")  # permit_sasl_authenticated, reject
NOT_OWNED: Expect = (553, "5.7.1", "not owned by user")  # reject_sender_login_mismatch
NOT_LOGGED_IN: Expect = (553, "5.7.1", "Sender address rejected: not logged in")  # check_sender_access, our domain
AUTH_PROBE = "AUTH PLAIN " + base64.b64encode(b"\0alice@example.net\0guess").decode()


@dataclass(frozen=True)
class Attempt:
    """One try at getting mail for someone else's domain (or as someone else) through the host.
    {v} in the recipient or sender is this attempt's own victim local part."""

    name: str
    recipient: str
    expect: Expect
    sender: str = "dana@example.com"
    port: int = SMTP_PORT
    starttls: bool = False
    login: str | None = None
    helo: str = "mx.example.com"
    before: tuple[tuple[str, Expect], ...] = ()
    brackets: bool = True


ATTEMPTS = [
    # Port 25, unauthenticated, from the remote domain's MX: the classic relay tests.
    Attempt("foreign-domain", "{v}@example.org", RELAY_DENIED),
    Attempt("foreign-domain-upper-case", "{V}@EXAMPLE.ORG", RELAY_DENIED),
    Attempt("foreign-domain-trailing-dot", "{v}@example.org.", RELAY_DENIED),
    Attempt("foreign-domain-no-angle-brackets", "{v}@example.org", RELAY_DENIED, brackets=False),
    Attempt("foreign-domain-utf8-local-part", "{v}\u00fc@example.org", RELAY_DENIED),
    Attempt("percent-hack", "{v}%example.org@example.net", RELAY_DENIED),
    Attempt("percent-hack-upper-case-trailing-dot", "{v}%example.org@EXAMPLE.NET.", RELAY_DENIED),
    Attempt("percent-hack-host-name", "{v}%example.org@mail.example.net", RELAY_DENIED),
    Attempt("percent-hack-own-ip-literal", "{v}%example.org@[203.0.113.10]", RELAY_DENIED),
    Attempt("percent-hack-localhost", "{v}%example.org@localhost", RELAY_DENIED),
    Attempt("percent-hack-no-domain", "{v}%example.org", RELAY_DENIED),
    Attempt("bang-path", "example.org!{v}@example.net", RELAY_DENIED),
    Attempt("bang-path-own-ip-literal", "example.org!{v}@[203.0.113.10]", RELAY_DENIED),
    Attempt("bang-path-no-domain", "example.org!{v}", RELAY_DENIED),
    Attempt("source-route", "@mail.example.net:{v}@example.org", RELAY_DENIED),
    Attempt("source-route-two-hops", "@example.net,@mail.example.net:{v}@example.org", RELAY_DENIED),
    Attempt("quoted-local-part", '"{v}@example.org"@example.net', RELAY_DENIED),
    Attempt("quoted-address-no-domain", '"{v}@example.org"', RELAY_DENIED),
    Attempt("two-at-signs", "{v}@example.org@example.net", RELAY_DENIED),
    Attempt("own-ip-literal-then-foreign-domain", "{v}@[203.0.113.10]@example.org", RELAY_DENIED),
    Attempt("percent-after-the-domain", "{v}@example.org%example.net", BAD_SYNTAX),
    Attempt("foreign-ip-literal", "{v}@[203.0.113.30]", RELAY_DENIED),
    Attempt("foreign-ipv6-literal", "{v}@[IPv6:2001:db8::30]", RELAY_DENIED),
    Attempt("own-ip-literal-is-local-not-relayed", "{v}@[203.0.113.10]", NOT_LOCAL),
    Attempt("our-domain-as-a-subdomain-label", "{v}@example.net.example.org", RELAY_DENIED),
    Attempt("foreign-domain-under-ours", "{v}@example.org.example.net", RELAY_DENIED),
    Attempt("no-domain", "{v}", NOT_FQDN),
    Attempt("localhost", "{v}@localhost", NOT_FQDN),
    Attempt("null-sender", "{v}@example.org", RELAY_DENIED, sender=""),
    Attempt("null-sender-percent-hack", "{v}%example.org@example.net", RELAY_DENIED, sender=""),
    Attempt("own-domain-sender", "{v}@example.org", NOT_LOGGED_IN, sender="alice@example.net"),
    Attempt("own-domain-sender-upper-case-trailing-dot", "{v}@example.org", NOT_LOGGED_IN, sender="ALICE@EXAMPLE.NET."),
    Attempt("own-host-name-sender", "{v}@example.org", NOT_LOGGED_IN, sender="root@mail.example.net"),
    Attempt("helo-as-the-server", "{v}@example.org", RELAY_DENIED, helo=HOST),
    Attempt("helo-as-the-servers-ip-literal", "{v}@example.org", RELAY_DENIED, helo="[203.0.113.10]"),
    Attempt("auth-on-port-25", "{v}@example.org", RELAY_DENIED, before=((AUTH_PROBE, NO_AUTH_HERE),)),
    Attempt(
        "xclient-as-localhost", "{v}@example.org", RELAY_DENIED, before=(("XCLIENT ADDR=127.0.0.1", NOT_AUTHORIZED),)
    ),
    Attempt(
        "xforward-as-localhost", "{v}@example.org", RELAY_DENIED, before=(("XFORWARD ADDR=127.0.0.1", NOT_AUTHORIZED),)
    ),
    Attempt("after-starttls", "{v}@example.org", RELAY_DENIED, starttls=True),
    # Submission without a login: TLS first on 587, and no login means no relay on either port.
    Attempt("587-without-tls", "{v}@example.org", NEED_TLS, port=SUBMISSION_PORT),
    Attempt(
        "587-auth-before-starttls", "{v}@example.org", NEED_TLS, port=SUBMISSION_PORT, before=((AUTH_PROBE, NEED_TLS),)
    ),
    Attempt("587-tls-no-login", "{v}@example.org", CLIENT_REJECTED, port=SUBMISSION_PORT, starttls=True),
    Attempt(
        "587-tls-no-login-own-sender",
        "{v}@example.org",
        CLIENT_REJECTED,
        sender="alice@example.net",
        port=SUBMISSION_PORT,
        starttls=True,
    ),
    Attempt("587-tls-no-login-to-a-mailbox", "alice@example.net", CLIENT_REJECTED, port=SUBMISSION_PORT, starttls=True),
    Attempt("465-no-login", "{v}@example.org", CLIENT_REJECTED, port=SUBMISSIONS_PORT),
    Attempt("465-no-login-null-sender", "{v}@example.org", CLIENT_REJECTED, sender="", port=SUBMISSIONS_PORT),
    # Logged in, but sending as someone else.
    Attempt(
        "587-alice-as-bob",
        "{v}@example.org",
        NOT_OWNED,
        sender="bob@example.net",
        port=SUBMISSION_PORT,
        starttls=True,
        login="alice@example.net",
    ),
    Attempt(
        "587-alice-as-another-domain",
        "{v}@example.org",
        NOT_OWNED,
        sender="dana@example.com",
        port=SUBMISSION_PORT,
        starttls=True,
        login="alice@example.net",
    ),
    Attempt(
        "587-alice-as-bob-upper-case-trailing-dot",
        "{v}@example.org",
        NOT_OWNED,
        sender="BOB@EXAMPLE.NET.",
        port=SUBMISSION_PORT,
        starttls=True,
        login="alice@example.net",
    ),
    Attempt(
        "587-alice-as-quoted-bob",
        "{v}@example.org",
        NOT_OWNED,
        sender='"bob"@example.net',
        port=SUBMISSION_PORT,
        starttls=True,
        login="alice@example.net",
    ),
    Attempt(
        "587-alice-as-bob-source-routed",
        "{v}@example.org",
        NOT_OWNED,
        sender="@mail.example.net:bob@example.net",
        port=SUBMISSION_PORT,
        starttls=True,
        login="alice@example.net",
    ),
    Attempt(
        "587-alice-as-bob-percent-hack",
        "{v}@example.org",
        NOT_OWNED,
        sender="bob%example.net@example.net",
        port=SUBMISSION_PORT,
        starttls=True,
        login="alice@example.net",
    ),
    Attempt(
        "587-bob-as-an-alias-only-alice-owns",
        "{v}@example.org",
        NOT_OWNED,
        sender="info@example.net",
        port=SUBMISSION_PORT,
        starttls=True,
        login="bob@example.net",
    ),
    Attempt(
        "465-alice-as-bob",
        "{v}@example.org",
        NOT_OWNED,
        sender="bob@example.net",
        port=SUBMISSIONS_PORT,
        login="alice@example.net",
    ),
    Attempt(
        "465-alice-as-another-domain",
        "{v}@example.org",
        NOT_OWNED,
        sender="dana@example.org",
        port=SUBMISSIONS_PORT,
        login="alice@example.net",
    ),
]
VICTIMS = {a.name: f"victim{i:02d}" for i, a in enumerate(ATTEMPTS)}
ATTEMPTED: list[str] = []  # the victims of the attempts this session made


def fill(text: str, victim: str) -> str:
    return text.replace("{v}", victim).replace("{V}", victim.upper())


def mentions(addresses: list[str], victim: str) -> list[str]:
    return [a for a in addresses if re.search(rf"\b{victim}(?![0-9])", a)]


def attempt_relay(lab: LabInfo, attempt: Attempt) -> list[tuple[str, Reply, Expect | None]]:
    """The attempt's conversation: each command, its reply, and the reply Postfix promises for it.
    Should the server accept a recipient anyway, the message is sent, for the checks that follow."""
    victim = VICTIMS[attempt.name]
    sender, recipient = fill(attempt.sender, victim), fill(attempt.recipient, victim)

    def talk() -> list[tuple[str, Reply, Expect | None]]:
        said: list[tuple[str, Reply, Expect | None]] = []
        smtp, ehlo = greeted(attempt.port, helo=attempt.helo)
        with smtp:
            if attempt.port == SUBMISSION_PORT:  # RFC 8314 / smtpd_tls_auth_only: no AUTH in the clear
                assert b"AUTH" not in ehlo.text, f"AUTH offered before STARTTLS: {ehlo}"
            if attempt.starttls:
                smtp.starttls()
                smtp.command(f"EHLO {attempt.helo}")
            if attempt.login:
                smtp.login(attempt.login, lab.passwords[attempt.login])
            for command, expect in attempt.before:
                said.append((command.split()[0], smtp.command(command), expect))
            said.append((f"MAIL FROM:<{sender}>", smtp.command(f"MAIL FROM:<{sender}>"), None))
            rcpt = f"RCPT TO:<{recipient}>" if attempt.brackets else f"RCPT TO: {recipient}"
            said.append((rcpt, smtp.command(rcpt.encode()), attempt.expect))
            content = headers(f"relay attempt {attempt.name}", new_id(victim), sender or "x@example.org", recipient)
            said.append(("DATA", smtp.data(content + b"\r\nrelay test\r\n.\r\n"), None))
            smtp.command("QUIT")
        return said

    return world(talk)


@pytest.mark.parametrize("attempt", ATTEMPTS, ids=[a.name for a in ATTEMPTS])
def test_relay_and_spoofing_attempts_get_the_documented_refusal(lab: LabInfo, attempt: Attempt) -> None:
    ATTEMPTED.append(VICTIMS[attempt.name])
    said = attempt_relay(lab, attempt)
    for command, reply, expect in said:
        if expect is not None:
            code, status, text = expect
            assert reply.code == code and f"{code} {status}".encode() in reply.text, f"{command}: {reply}"
            assert text.encode() in reply.text, f"{command}: {reply}"
    data = said[-1][1]
    assert data.code >= 500, f"{attempt.name}: DATA was answered {data} (the message was taken)"
    assert not mentions(relayed_recipients(lab), VICTIMS[attempt.name]), "the SES stand-in accepted it"


def test_no_relay_attempt_reached_the_relay_or_waits_in_the_queue(lab: LabInfo) -> None:
    if not ATTEMPTED:
        pytest.skip("no relay attempt ran in this session (the table above was deselected)")
    assert_still_delivers(lab)  # anything accepted earlier would have been handed on by now
    relayed, queued = relayed_recipients(lab), queued_recipients(lab)
    for victim in ATTEMPTED:
        assert not mentions(relayed, victim), f"{victim}: accepted by the SES stand-in"
        assert not mentions(queued, victim), f"{victim}: waiting in the host's queue"


SPOOFS = [
    ("alice@example.net", "alice@example.net"),
    ("bob@example.net", "alice@example.net"),
    ("postmaster@example.net", "bob@example.net"),
    ("ceo@example.net", "alice@example.net"),
    ("ALICE@EXAMPLE.NET.", "alice@example.net"),
    ("root@mail.example.net", "bob@example.net"),
]
# Failures only (DMARC_PASS and DMARC_POLICY_ALLOW are verdicts too), each within its own header
# line (the head is unfolded first; no DOTALL, so `.*` cannot run on into the next header).
SPF_DMARC_FAILURE = re.compile(
    rb"^(Authentication-Results:.*\b(spf=(fail|softfail)|dmarc=fail)"
    rb"|X-Spam-Status:.*\b(SPF_FAIL|SPF_SOFTFAIL|DMARC_REJECT|DMARC_QUAR|DMARC_NONE)\b"
    rb"|X-Spamd-Result:.*\b(R_SPF_FAIL|R_SPF_SOFTFAIL|DMARC_POLICY_(REJECT|QUARANTINE|SOFTFAIL))\b)",
    re.MULTILINE | re.IGNORECASE,
)


@pytest.mark.parametrize(("sender", "recipient"), SPOOFS, ids=[s for s, _ in SPOOFS])
def test_mail_from_our_own_domain_arriving_from_outside_is_refused_or_marked(
    lab: LabInfo, sender: str, recipient: str
) -> None:
    """From the remote domain's MX on port 25, MAIL FROM one of our addresses: SPF for example.net
    does not cover that host. Refused outright (553, before SPF/DMARC are consulted), or, if taken,
    the delivered message must show the SPF/DMARC failure to the user."""
    message_id = new_id("spoof")

    def talk() -> list[Reply]:
        smtp, _ = greeted()
        with smtp:
            smtp.starttls()
            smtp.command("EHLO mx.example.com")
            replies = [smtp.command(f"MAIL FROM:<{sender}>"), smtp.command(f"RCPT TO:<{recipient}>")]
            content = headers("from ourselves?", message_id, sender.rstrip("."), recipient)
            replies.append(smtp.data(content + b"\r\nPlease pay the attached invoice.\r\n.\r\n"))
            return replies

    mail, rcpt, data = world(talk)
    assert mail.code == 250, str(mail)  # smtpd_delay_reject: the verdict comes at RCPT TO
    if rcpt.code != 250:
        code, status, text = NOT_LOGGED_IN
        assert rcpt.code == code and f"{code} {status}".encode() in rcpt.text and text.encode() in rcpt.text, str(rcpt)
        assert data.code >= 500, str(data)
        assert_still_delivers(lab)
        assert copies(lab, recipient, message_id, wait=0) == [], "a refused message was delivered"
        return
    assert data.code == 250, str(data)
    delivered = copies(lab, recipient, message_id)
    assert len(delivered) == 1, f"taken with {data}, but {len(delivered)} copies arrived"
    head = delivered[0].split(b"\r\n\r\n", 1)[0].replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ")
    assert SPF_DMARC_FAILURE.search(head), f"taken without an SPF/DMARC failure mark:\n{head.decode(errors='replace')}"


def forged(message_id: str, subject: str) -> list[Reply]:
    """From an address example.com's SPF does not list (the world's gateway, not its MX), as
    dana@example.com, unsigned: SPF fails and no DKIM signature aligns, so DMARC fails."""

    def talk() -> list[Reply]:
        # The gateway's first connection waits out postscreen's greet test (6 s), then passes.
        smtp = Smtp(source=network.WORLD_IPV4)
        with smtp:
            assert smtp.reply().code == 220
            smtp.command("EHLO mx.example.com")
            smtp.starttls()
            smtp.command("EHLO mx.example.com")
            replies = [smtp.command("MAIL FROM:<dana@example.com>"), smtp.command("RCPT TO:<alice@example.net>")]
            content = headers(subject, message_id) + b"\r\nYour account is locked, log in here.\r\n.\r\n"
            return [*replies, smtp.data(content)]

    return world(talk)


def test_mail_forged_from_a_domain_with_dmarc_p_reject_is_refused_at_smtp_time(lab: LabInfo) -> None:
    """example.com publishes DMARC p=reject: the forged message is refused at the end of DATA, as
    its policy asks, so the forging server is told (550/554 5.7.1) and nothing is delivered,
    queued or bounced here."""
    message_id = new_id("forged")
    mail, rcpt, data = forged(message_id, "forged")
    assert (mail.code, rcpt.code) == (250, 250)
    if lab.overrides.get("spamFilter") == "rspamd":
        # rspamd answers with its one reject text; its log names the DMARC module as the cause.
        assert (data.code, data.text) == (554, b"554 5.7.1 Spam message rejected"), str(data)
        token = message_id.strip("<>").split("@")[0]  # forged.<hex>: letters, digits and a dot
        log = host.guest(f"sudo grep -F {token} /var/log/rspamd/rspamd.log", lab).stdout
        assert 'forced: reject "Action set by DMARC"' in log, log[-500:]
    else:
        assert data.code == 550 and b"5.7.1" in data.text and b"DMARC" in data.text.upper(), str(data)
    assert_still_delivers(lab)
    assert copies(lab, "alice@example.net", message_id, wait=0) == []
    assert not mentions(queued_recipients(lab), "dana@example.com"), "a bounce to the forged sender waits in the queue"
    relayed = [m.read_bytes() for m in Path(lab.ses_spool).glob("*.eml")]
    assert not [m for m in relayed if message_id.encode() in m], "a bounce of the forged message left through the relay"


def test_mail_forged_from_a_domain_with_dmarc_p_quarantine_goes_to_junk(lab: LabInfo) -> None:
    """The same forgery while example.com publishes p=quarantine: taken, and filed into Junk."""
    message_id = new_id("quarantined")
    dmarc = f'_dmarc.{REMOTE_DOMAIN}. 300 IN TXT "v=DMARC1; p=quarantine"'
    with zone_changed(lab, add=dmarc, remove=f"_dmarc.{REMOTE_DOMAIN}."):
        host.guest("sudo systemctl restart unbound", lab)  # the host's resolver forgets p=reject
        replies = forged(message_id, "quarantined")
    host.guest("sudo systemctl restart unbound", lab)
    assert [r.code for r in replies] == [250, 250, 250], [str(r) for r in replies]
    (copy,) = copies(lab, "alice@example.net", message_id, folders=("Junk",))
    assert copies(lab, "alice@example.net", message_id, wait=0, folders=("INBOX",)) == []
    head = copy.split(b"\r\n\r\n", 1)[0].replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ")
    dmarc_mark = re.compile(rb"^(X-Spam-Status:.*\bDMARC_QUAR\b|X-Spamd-Result:.*\bDMARC_POLICY_QUARANTINE\b)",
                            re.MULTILINE)  # fmt: skip
    assert dmarc_mark.search(head), f"no DMARC quarantine mark:\n{head.decode(errors='replace')}"


# --- malformed and hostile SMTP on port 25 --------------------------------------------------------

PREGREET_SOURCE = "203.0.113.41"  # an address postscreen has never seen pass: its first contact


@pytest.fixture
def new_client() -> Iterator[str]:
    """A second outside address on the world link, for a client postscreen meets for the first time."""
    with world_address(PREGREET_SOURCE) as address:
        yield address


def test_a_client_talking_before_the_greeting_gets_no_mail_in(lab: LabInfo, new_client: str) -> None:
    """postscreen's pre-greet test (postscreen_greet_action = enforce): a bot that sends EHLO before
    the greeting is over is answered by postscreen itself, which refuses every recipient with
    550 5.5.1 Protocol error (POSTSCREEN_README), and no message can follow."""

    def talk() -> tuple[bytes, list[Reply]]:
        smtp = Smtp(source=new_client)
        with smtp:
            first = smtp.line()  # postscreen's multi-line greeting starts, and waits for a talker
            smtp.send(b"EHLO bot.example.org\r\n")
            reply = smtp.reply()
            while reply.code == 220:  # the rest of the greeting, if postscreen sends it
                reply = smtp.reply()
            replies = [reply, smtp.command("MAIL FROM:<dana@example.com>"), smtp.command("RCPT TO:<alice@example.net>")]
            replies.append(smtp.command("DATA"))
            return first, replies

    first, (ehlo, mail, rcpt, data) = world(talk)
    assert first.startswith(b"220-"), f"no multi-line greeting to catch a pre-greet talker: {first!r}"
    assert ehlo.code == 250 and b"PIPELINING" not in ehlo.text, str(ehlo)
    assert mail.code == 250, str(mail)
    assert rcpt.code == 550 and b"5.5.1 Protocol error" in rcpt.text, str(rcpt)
    assert data.code >= 500 and data.code != 354, str(data)
    assert_still_delivers(lab)


def test_commands_pipelined_without_asking_are_refused_at_data(lab: LabInfo) -> None:
    """A client that said HELO (no ESMTP, so no PIPELINING) but sends MAIL, RCPT and DATA at once:
    reject_unauth_pipelining in smtpd_data_restrictions answers DATA with 503 5.5.0."""
    message_id = new_id("pipelined")

    def talk() -> list[Reply]:
        with Smtp() as smtp:
            assert smtp.reply().code == 220
            assert smtp.command("HELO mx.example.com").code == 250
            smtp.send(b"MAIL FROM:<dana@example.com>\r\nRCPT TO:<alice@example.net>\r\nDATA\r\n")
            replies = [smtp.reply(), smtp.reply(), smtp.reply()]
            if replies[-1].code == 354:
                smtp.send(headers("pipelined", message_id) + b"\r\nunasked pipelining\r\n.\r\n")
                replies.append(smtp.reply())
            return replies

    mail, rcpt, data, *rest = world(talk)
    assert (mail.code, rcpt.code) == (250, 250), (str(mail), str(rcpt))
    assert data.code == 503 and b"5.5.0" in data.text and b"Improper use of SMTP command pipelining" in data.text, (
        f"{data} {[str(r) for r in rest]}"
    )
    assert_still_delivers(lab)
    assert copies(lab, "alice@example.net", message_id, wait=0) == []


def test_an_oversized_message_is_refused_with_552_and_the_limit_is_advertised(lab: LabInfo) -> None:
    """message_size_limit: EHLO advertises it (SIZE, RFC 1870); MAIL FROM with a larger SIZE= gets
    552 5.3.4 "Message size exceeds fixed limit", and a message that turns out larger while it is
    sent gets 552 5.3.4 at the end of DATA; the session stays usable."""
    limit = postconf(lab, "message_size_limit")
    message_id = new_id("oversized")

    def talk() -> tuple[Reply, list[Reply]]:
        smtp, ehlo = greeted()
        with smtp:
            declared = smtp.command(f"MAIL FROM:<dana@example.com> SIZE={limit + 1}")
        # A new session: Postfix 3.7 keeps the refused SIZE= for the next MAIL FROM of the same one.
        smtp, _ = greeted()
        with smtp:
            replies = [smtp.command("MAIL FROM:<dana@example.com>"), smtp.command("RCPT TO:<alice@example.net>")]
            replies.append(smtp.command("DATA"))
            smtp.send(headers("oversized", message_id) + b"\r\n")
            block = (b"z" * 998 + b"\r\n") * 1000  # 1 MB of lines of the longest length RFC 5322 allows
            for _ in range(limit // len(block) + 2):
                smtp.send(block)
            smtp.send(b".\r\n")
            replies += [smtp.reply(), smtp.command("RSET"), smtp.command("MAIL FROM:<dana@example.com>")]
            return ehlo, [declared, *replies]

    ehlo, (declared, mail, rcpt, data, sent, rset, again) = world(talk)
    assert f"250-SIZE {limit}".encode() in ehlo.text, str(ehlo)
    assert declared.code == 552 and b"5.3.4 Message size exceeds fixed limit" in declared.text, str(declared)
    assert (mail.code, rcpt.code, data.code) == (250, 250, 354)
    assert sent.code == 552 and b"5.3.4" in sent.text and b"too big" in sent.text, str(sent)
    assert (rset.code, again.code) == (250, 250), "the session did not survive the refusal"
    assert_still_delivers(lab)
    assert copies(lab, "alice@example.net", message_id, wait=0) == [], "the oversized message was delivered"


# Each: an end-of-data look-alike that is not <CR><LF>.<CR><LF>, then a second, smuggled message.
SMUGGLING = {
    "lf-dot-lf": b"\n.\n",
    "crlf-dot-lf": b"\r\n.\n",
    "lf-dot-crlf": b"\n.\r\n",
    "cr-dot-cr": b"\r.\r",
    "cr-dot-crlf": b"\r.\r\n",
}


@pytest.mark.parametrize("end", SMUGGLING.values(), ids=SMUGGLING.keys())
def test_a_smuggled_second_message_after_a_false_end_of_data_never_arrives(lab: LabInfo, end: bytes) -> None:
    """SMTP smuggling (CVE-2023-51764): with smtpd_forbid_bare_newline = yes (normalize), only
    <CR><LF>.<CR><LF> ends DATA, so the smuggled MAIL FROM / RCPT TO / DATA are message text. The
    server answers exactly once (250, then QUIT's 221: no replies to smuggled commands), one message
    arrives, and the smuggled one never does; or the whole message is refused with a 5xx."""
    real, smuggled = new_id("real"), new_id("smuggled")
    content = (
        headers("smuggling", real)
        + b"\r\nThe real message."
        + end
        + b"MAIL FROM:<ceo@example.com>\r\nRCPT TO:<alice@example.net>\r\nDATA\r\n"
        + headers("smuggled", smuggled, sender="ceo@example.com")
        + b"\r\nThe smuggled message.\r\n.\r\n"
    )

    def talk() -> list[Reply]:
        smtp, _ = greeted()
        with smtp:
            replies = [smtp.command("MAIL FROM:<dana@example.com>"), smtp.command("RCPT TO:<alice@example.net>")]
            replies.append(smtp.data(content))
            smtp.send(b"QUIT\r\n")
            try:
                while True:
                    replies.append(smtp.reply())
            except (EOFError, OSError):
                return replies

    mail, rcpt, data, *after = world(talk)
    assert (mail.code, rcpt.code) == (250, 250)
    if data.code >= 500:  # refused as a whole: nothing at all arrives
        assert_still_delivers(lab)
        assert copies(lab, "alice@example.net", real, wait=0) == []
    else:
        assert data.code == 250 and b"queued as" in data.text, str(data)
        assert [r.code for r in after] == [221], f"replies to smuggled commands: {[str(r) for r in after]}"
        delivered = copies(lab, "alice@example.net", real)
        assert len(delivered) == 1, f"{len(delivered)} copies of the real message"
        assert b"The smuggled message." in delivered[0], "the smuggled text is not in the real message's body"
        assert_still_delivers(lab)
    assert copies(lab, "alice@example.net", smuggled, wait=0) == [], "the smuggled message was delivered"


def test_an_8bit_body_arrives_intact(lab: LabInfo) -> None:
    """8BITMIME (RFC 6152) is advertised and an 8-bit UTF-8 body reaches the mailbox octet for octet."""
    message_id = new_id("8bit")
    text = "Gr\u00fc\u00dfe aus K\u00f6ln, 10 \u20ac, \u65e5\u672c\u8a9e".encode()
    content = (
        headers("8bit", message_id)
        + b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + text
        + b"\r\n.\r\n"
    )

    def talk() -> tuple[Reply, list[Reply]]:
        with Smtp() as smtp:
            assert smtp.reply().code == 220
            ehlo = smtp.command("EHLO mx.example.com")
            replies = [
                smtp.command("MAIL FROM:<dana@example.com> BODY=8BITMIME"),
                smtp.command("RCPT TO:<alice@example.net>"),
            ]
            return ehlo, [*replies, smtp.data(content)]

    ehlo, replies = world(talk)
    assert b"8BITMIME" in ehlo.text
    assert [r.code for r in replies] == [250, 250, 250], [str(r) for r in replies]
    delivered = copies(lab, "alice@example.net", message_id)
    assert len(delivered) == 1 and text in delivered[0]
    assert_still_delivers(lab)


def test_smtputf8_is_refused_at_mail_from_never_bounced_later_and_utf8_headers_arrive(lab: LabInfo) -> None:
    """Dovecot 2.3's LMTP offers no SMTPUTF8, so Postfix could only bounce a message from a UTF-8
    address after taking it (backscatter, and nothing reaches alice). Port 25 therefore does not
    offer SMTPUTF8 (smtputf8_enable = no there): MAIL FROM ... SMTPUTF8 gets 555 5.5.4 and the
    sender's own server tells its user; no bounce leaves this host. RFC 6532 UTF-8 headers from an
    ASCII address still arrive intact, and a UTF-8 local part that is no mailbox gets 550 5.1.1."""
    message_id = new_id("utf8-headers")
    sender = "j\u00fcrgen@example.com"
    content = (
        headers("Gr\u00fc\u00dfe", message_id, sender="J\u00fcrgen <dana@example.com>")
        + "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHallo von J\u00fcrgen.\r\n.\r\n".encode()
    )
    bounced_before = relayed_recipients(lab).count(sender)

    def talk() -> tuple[Reply, Reply, list[Reply], Reply]:
        smtp, ehlo = greeted()
        with smtp:
            utf8 = smtp.command(f"MAIL FROM:<{sender}> SMTPUTF8".encode())
            replies = [
                smtp.command("MAIL FROM:<dana@example.com> BODY=8BITMIME"),
                smtp.command("RCPT TO:<alice@example.net>"),
            ]
            replies.append(smtp.data(content))
            assert smtp.command("MAIL FROM:<dana@example.com>").code == 250
            unknown = smtp.command("RCPT TO:<j\u00fcrgen@example.net>".encode())
            return ehlo, utf8, replies, unknown

    ehlo, utf8, replies, unknown = world(talk)
    assert b"SMTPUTF8" not in ehlo.text, str(ehlo)
    assert utf8.code == 555 and b"5.5.4 Unsupported option: SMTPUTF8" in utf8.text, str(utf8)
    assert [r.code for r in replies] == [250, 250, 250], [str(r) for r in replies]
    assert unknown.code == 550 and b"5.1.1" in unknown.text and b"User unknown" in unknown.text, str(unknown)
    delivered = copies(lab, "alice@example.net", message_id)
    assert len(delivered) == 1 and "From: J\u00fcrgen <dana@example.com>".encode() in delivered[0]
    assert "Subject: Gr\u00fc\u00dfe".encode() in delivered[0]
    assert_still_delivers(lab)
    assert relayed_recipients(lab).count(sender) == bounced_before, "a bounce went out to the UTF-8 sender"


def test_a_line_longer_than_998_octets_arrives_folded_with_nothing_lost(lab: LabInfo) -> None:
    """RFC 5322 caps lines at 998 octets; Postfix takes longer ones (line_length_limit pieces,
    reconstructed on delivery) and, as lmtp_line_length_limit promises, hands them on broken into
    lines of at most 998 octets with <CR><LF><SPACE>: every octet still arrives."""
    message_id = new_id("long-line")
    long_line = "".join(f"{i:05d}," for i in range(1000)).encode()  # 6000 octets, each position readable
    content = headers("long line", message_id) + b"\r\n" + long_line + b"\r\nafter the long line\r\n.\r\n"

    assert [r.code for r in send_one(content)] == [250, 250, 250]
    (delivered,) = copies(lab, "alice@example.net", message_id)
    body = delivered.split(b"\r\n\r\n", 1)[1]
    assert max(len(line) for line in delivered.split(b"\r\n")) <= 998
    assert long_line in body.replace(b"\r\n ", b""), "octets of the long line were lost"
    assert b"after the long line" in body
    assert_still_delivers(lab)


def test_a_header_larger_than_header_size_limit_is_cut_and_the_message_still_arrives(lab: LabInfo) -> None:
    """header_size_limit: "If a header is larger, the excess is discarded" (postconf(5)). A 200 kB
    header line (far over 998 octets and the limit) costs the header, not the message: the body
    arrives intact, and what is left of the header is within the limit."""
    limit = postconf(lab, "header_size_limit")
    message_id = new_id("long-header")
    huge = b"X-Huge: " + b"y" * (2 * limit) + b"\r\n"
    content = headers("long header", message_id) + huge + b"\r\nThe body after a huge header.\r\n.\r\n"

    assert [r.code for r in send_one(content)] == [250, 250, 250]
    (delivered,) = copies(lab, "alice@example.net", message_id)
    head, body = delivered.split(b"\r\n\r\n", 1)
    assert b"The body after a huge header." in body
    assert head.count(b"y") <= limit, "more of the header arrived than header_size_limit keeps"
    assert_still_delivers(lab)


def test_recipients_beyond_smtpd_recipient_limit_get_452_and_the_rest_is_delivered_once(lab: LabInfo) -> None:
    """smtpd_recipient_limit: the recipients past it get 452 4.5.3 "Error: too many recipients"
    (a sender retries those later); the accepted ones get the message, here alice, once."""
    limit = postconf(lab, "smtpd_recipient_limit")
    message_id = new_id("many-recipients")
    extra = 3

    def talk() -> tuple[list[Reply], Reply]:
        smtp, _ = greeted()
        with smtp:
            assert smtp.command("MAIL FROM:<dana@example.com>").code == 250
            smtp.send(b"RCPT TO:<alice@example.net>\r\n" * (limit + extra))  # PIPELINING was offered
            replies = [smtp.reply() for _ in range(limit + extra)]
            return replies, smtp.data(headers("many recipients", message_id) + b"\r\nto alice, many times\r\n.\r\n")

    replies, data = world(talk)
    assert [r.code for r in replies[:limit]] == [250] * limit
    assert all(r.code == 452 and b"4.5.3 Error: too many recipients" in r.text for r in replies[limit:]), [
        str(r) for r in replies[limit:]
    ]
    assert data.code == 250, str(data)
    assert len(copies(lab, "alice@example.net", message_id)) == 1
    assert_still_delivers(lab)
