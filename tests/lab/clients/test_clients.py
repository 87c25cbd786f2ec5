"""What a user's clients do beyond IMAP and SMTP: a Sieve rule uploaded over ManageSieve (port
4190) files mail, and Roundcube, with webmail switched on by the program, lets a user log in over
HTTPS and read a message."""

from __future__ import annotations

import base64
import http.client
import imaplib
import json
import re
import socket
import ssl
import urllib.parse
from collections.abc import Iterator

import pytest

from infra.core.facts import IMAPS_PORT
from infra.lab import deploy, host, network
from infra.lab.mail import find, message, send_inbound, unverified
from infra.lab.network import REMOTE_DOMAIN, WORLD_NS
from infra.lab.state import LabInfo
from infra.tools import check
from infra.tools.rehearsal import DROPLET_IPV4

pytestmark = [pytest.mark.lab]
MANAGESIEVE_PORT = 4190
HOST = "mail.example.net"
USER = "alice@example.net"


class ManageSieve:
    """The few RFC 5804 commands a mail client's filter editor uses."""

    def __init__(self) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection((DROPLET_IPV4, MANAGESIEVE_PORT), 30)
        self.pending = b""

    def line(self) -> bytes:
        while b"\r\n" not in self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("ManageSieve closed the connection")
            self.pending += data
        line, _, self.pending = self.pending.partition(b"\r\n")
        return line

    def response(self) -> tuple[bytes, list[bytes]]:
        """Lines up to the final OK / NO / BYE, and that line."""
        lines: list[bytes] = []
        while True:
            line = self.line()
            if line.split(b" ", 1)[0] in (b"OK", b"NO", b"BYE"):
                return line, lines
            lines.append(line)

    def command(self, text: bytes) -> bytes:
        self.sock.sendall(text + b"\r\n")
        return self.response()[0]


def test_a_sieve_rule_uploaded_over_managesieve_files_matching_mail(lab: LabInfo) -> None:
    password = lab.passwords[USER]
    script = b'require ["fileinto", "mailbox"];\r\nif header :contains "subject" "[lists]" {\r\n  fileinto :create "Lists";\r\n}\r\n'

    def upload() -> tuple[list[bytes], list[bytes]]:
        sieve = ManageSieve()
        _, before_tls = sieve.response()
        assert sieve.command(b"STARTTLS").startswith(b"OK")
        sieve.sock = unverified().wrap_socket(sieve.sock, server_hostname=HOST)
        _, after_tls = sieve.response()  # the capabilities again, now with the login mechanisms
        token = base64.b64encode(f"\0{USER}\0{password}".encode())
        assert sieve.command(b'AUTHENTICATE "PLAIN" "' + token + b'"').startswith(b"OK")
        put = b'PUTSCRIPT "lists" {%d+}\r\n' % len(script) + script
        assert sieve.command(put).startswith(b"OK")
        assert sieve.command(b'SETACTIVE "lists"').startswith(b"OK")
        sieve.command(b"LOGOUT")
        return before_tls, after_tls

    before_tls, after_tls = network.in_netns(WORLD_NS, upload)
    # No password is taken before TLS: SASL mechanisms appear only after STARTTLS.
    assert not [c for c in before_tls if c.startswith(b'"SASL" "') and c != b'"SASL" ""']
    assert b'"SASL" "PLAIN LOGIN"' in after_tls or any(c.startswith(b'"SASL" "PLAIN') for c in after_tls)
    try:
        filed = message(f"dana@{REMOTE_DOMAIN}", USER, "[lists] this week's digest")
        send_inbound(filed)
        assert find(USER, password, filed["Message-ID"], folder="Lists") is not None
        other = message(f"dana@{REMOTE_DOMAIN}", USER, "lunch?")
        send_inbound(other)
        assert find(USER, password, other["Message-ID"]) is not None
        assert find(USER, password, filed["Message-ID"], wait=0) is None  # not in INBOX
    finally:
        host.guest(f"sudo doveadm sieve deactivate -u {USER} && sudo doveadm sieve delete -u {USER} lists", lab)


@pytest.fixture
def webmail(lab: LabInfo) -> Iterator[LabInfo]:
    """The lab host with the program's webmail setting switched on, and off again afterwards."""
    if lab.overrides.get("spamFilter") == "rspamd":
        pytest.skip("Roundcube does not depend on the spam filter: tested once, in spamassassin mode")
    steps = deploy.redeploy({"webmail": True})
    assert all(s["exit"] == 0 for s in steps)
    try:
        yield lab
    finally:
        deploy.redeploy()


class Browser:
    """HTTPS to the lab host with a cookie jar: enough of a browser for Roundcube's forms."""

    def __init__(self) -> None:
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, form: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        connection = http.client.HTTPSConnection(DROPLET_IPV4, 443, context=unverified(), timeout=60)
        headers = {"Host": HOST, "Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())}
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        for name, value in response.getheaders():
            if name.lower() == "set-cookie":
                key, _, rest = value.partition("=")
                self.cookies[key] = rest.split(";", 1)[0]
        text = response.read().decode(errors="replace")
        return response.status, {k.lower(): v for k, v in response.getheaders()}, text


def test_a_user_logs_in_to_webmail_and_reads_a_message(webmail: LabInfo) -> None:
    password = webmail.passwords[USER]
    msg = message(f"dana@{REMOTE_DOMAIN}", USER, "Seen in Roundcube", body="Hello from the webmail test.\n")
    send_inbound(msg)
    assert find(USER, password, msg["Message-ID"]) is not None

    def uid() -> str:
        with imaplib.IMAP4_SSL(DROPLET_IPV4, IMAPS_PORT, ssl_context=unverified(), timeout=60) as imap:
            imap.login(USER, password)
            imap.select("INBOX", readonly=True)
            _, found = imap.uid("SEARCH", "HEADER", "Message-ID", msg["Message-ID"])
            return str(found[0].split()[-1].decode())

    def browse() -> tuple[int, str, int, str]:
        browser = Browser()
        status, _, page = browser.request("GET", "/")
        assert status == 200, status
        token = re.search(r'name="_token" value="([^"]+)"', page)
        assert token, "no login form"
        form = {"_token": token.group(1), "_task": "login", "_action": "login", "_timezone": "UTC",
                "_url": "", "_user": USER, "_pass": password}  # fmt: skip
        status, headers, _ = browser.request("POST", "/?_task=login", form)
        location = headers.get("location", "")
        shown_status, _, shown = browser.request("GET", f"/?_task=mail&_mbox=INBOX&_uid={message_uid}&_action=show")
        return status, location, shown_status, shown

    message_uid = network.in_netns(WORLD_NS, uid)
    status, location, shown_status, shown = network.in_netns(WORLD_NS, browse)
    assert status == 302 and "_task=mail" in location, f"login refused: {status} {location}"
    assert shown_status == 200
    assert "Seen in Roundcube" in shown and "Hello from the webmail test." in shown
    # The status check watches the webmail's PHP, by the name this distribution gives it.
    assert "php8.2-fpm" in server_line("daemons").detail
    host.guest("sudo systemctl stop php8.2-fpm", webmail)
    try:
        stopped = server_line("daemons")
    finally:
        host.guest("sudo systemctl start php8.2-fpm", webmail)
    assert (stopped.status, stopped.detail) == ("failure", "not running: php8.2-fpm")


def server_line(name: str) -> check.Result:
    """The line NAME of the server's own checks (`status.py server`, as `check` runs it over SSH)."""
    done = host.guest(f"sudo python3 {check.STATUS_PATH} server")
    assert done.returncode == 0, done.stderr
    [line] = [r for r in check.status.from_json(json.loads(done.stdout)["results"]) if r.name == name]
    return line
