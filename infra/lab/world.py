"""The outside world, stood in for inside the lab's world namespace.

`python -m infra.lab.world dns ZONEFILE ADDRESS` serves a zone file (the records function's
output, plus the lab's few outside names) as the authoritative and only DNS of the lab. It
re-reads the file when it changes, so the lab can publish records later (an ACME DNS-01 TXT).

`python -m infra.lab.world ses DIR ADDRESS HOSTNAME USER PASSWORD_FILE` answers as the SES SMTP
endpoint: STARTTLS with a lab CA certificate, AUTH PLAIN/LOGIN accepting only the one user and
password, each accepted message written to DIR. Writing `4xx` or `5xx` into DIR/mode makes it
answer 451 / 554 to recipients; `away` closes its port (connection refused) until the mode
changes again; stopping the process takes it away for good.

`python -m infra.lab.world sink DIR ADDRESS HOSTNAME CERT KEY` is another domain's mail server:
port 25, STARTTLS offered, no AUTH, every message written to DIR.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Any

SMTP_PORT, SUBMISSION_PORT = 25, 587


class ReloadingZone:
    """dnslib resolver over a zone file, re-read whenever the file's modification time changes."""

    def __init__(self, zone_file: Path) -> None:
        self.zone_file = zone_file
        self.loaded_at = -1.0
        self.resolver: Any = None
        self.lock = threading.Lock()

    def resolve(self, request: Any, handler: Any) -> Any:
        from dnslib.zoneresolver import ZoneResolver

        with self.lock:
            modified = self.zone_file.stat().st_mtime
            if modified != self.loaded_at:
                self.resolver = ZoneResolver(self.zone_file.read_text(), glob=False)
                self.loaded_at = modified
            resolver = self.resolver
        return resolver.resolve(request, handler)


def serve_dns(zone_file: Path, address: str) -> None:
    from dnslib.server import DNSLogger, DNSServer

    resolver = ReloadingZone(zone_file)
    quiet = DNSLogger("-request,-reply,-truncated,-data")  # errors only: the lab's logs stay readable
    servers = [DNSServer(resolver, address=address, port=53, tcp=tcp, logger=quiet) for tcp in (False, True)]
    for server in servers:
        server.start_thread()
    while all(s.isAlive() for s in servers):
        time.sleep(1)


class SesStandIn:
    """aiosmtpd handler: record what SES would have accepted, or fail as told."""

    def __init__(self, spool: Path) -> None:
        self.spool = spool

    def mode(self) -> str:
        path = self.spool / "mode"
        return path.read_text().strip() if path.exists() else "ok"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:  # noqa: N802
        mode = self.mode()
        if mode == "4xx":
            return "451 4.4.2 Temporary service failure (lab)"
        if mode == "5xx" or "reject" in address:
            return "554 5.7.1 Message rejected: address is not verified (lab)"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        stamp = f"{time.time():.6f}"
        (self.spool / f"{stamp}.eml").write_bytes(envelope.original_content or envelope.content)
        # The user name the client logged in with (the authenticator keeps it; never the password).
        meta = {"from": envelope.mail_from, "to": envelope.rcpt_tos, "login": str(session.auth_data or "")}
        (self.spool / f"{stamp}.json").write_text(json.dumps(meta))
        return f"250 Ok {email.utils.make_msgid(domain='amazonses.com')[1:-1]}"


def serve_ses(spool: Path, address: str, hostname: str, user: str, password_file: Path, cert: Path, key: Path) -> None:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    password = password_file.read_text().strip()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and data.login.decode() == user and data.password.decode() == password
        return AuthResult(success=ok, handled=False, auth_data=data.login.decode() if ok else None)

    spool.mkdir(parents=True, exist_ok=True)

    def listening() -> Any:  # a stopped Controller's loop is closed: each start needs a new one
        controller = Controller(
            SesStandIn(spool),
            hostname=address,
            port=SUBMISSION_PORT,
            server_hostname=hostname,
            tls_context=context,
            require_starttls=True,
            auth_required=True,
            auth_require_tls=True,
            authenticator=authenticate,
            data_size_limit=40 * 1024 * 1024,
        )
        controller.start()
        return controller

    controller = listening()
    try:
        while True:
            # "away": the endpoint is unreachable (connection refused), as during an outage.
            away = (spool / "mode").exists() and (spool / "mode").read_text().strip() == "away"
            if away and controller is not None:
                controller.stop()
                controller = None
            elif not away and controller is None:
                controller = listening()
            time.sleep(0.2)
    finally:
        if controller is not None:
            controller.stop()


def serve_sink(spool: Path, address: str, hostname: str, cert: Path, key: Path) -> None:
    """Another domain's MX: accepts any mail on port 25 (STARTTLS offered, not required)."""
    from aiosmtpd.controller import Controller

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    spool.mkdir(parents=True, exist_ok=True)
    controller = Controller(
        SesStandIn(spool), hostname=address, port=SMTP_PORT, server_hostname=hostname, tls_context=context
    )
    controller.start()
    try:
        while True:
            time.sleep(1)
    finally:
        controller.stop()


def main(argv: list[str]) -> None:
    asyncio.set_event_loop(asyncio.new_event_loop())
    if argv[0] == "dns":
        serve_dns(Path(argv[1]), argv[2])
    elif argv[0] == "ses":
        spool, address, hostname, user, password_file, cert, key = argv[1:8]
        serve_ses(Path(spool), address, hostname, user, Path(password_file), Path(cert), Path(key))
    elif argv[0] == "sink":
        spool, address, hostname, cert, key = argv[1:6]
        serve_sink(Path(spool), address, hostname, Path(cert), Path(key))
    else:
        raise SystemExit(f"unknown stand-in {argv[0]!r}; accepted: dns, ses, sink")


if __name__ == "__main__":
    main(sys.argv[1:])
