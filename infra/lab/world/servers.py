"""The outside world, stood in for inside the lab's world namespace.

`python -m infra.lab.world.servers dns ZONEFILE ADDRESS` serves a zone file (the records
function's output, plus the lab's few outside names) as the authoritative and only DNS of the
lab. It re-reads the file when it changes, so the lab can publish records later (an ACME DNS-01
TXT).

`python -m infra.lab.world.servers ses DIR ADDRESS HOSTNAME USER PASSWORD_FILE CERT KEY [POLICY_FILE]`
answers as the SES SMTP endpoint: STARTTLS with a lab CA certificate, AUTH PLAIN/LOGIN accepting
only the one user and password, each accepted message written to DIR. Given the SMTP user's IAM
policy (the document the program declares), it refuses, as SES does with "554 Access denied", a
message whose From (header, or envelope sender) the policy's `ses:FromAddress` condition does not
allow; each refusal is logged to DIR/refused.jsonl. Writing `4xx` or `5xx` into DIR/mode
makes it answer 451 / 554 to recipients; `away` closes its port (connection refused) until the
mode changes again; `refuse-login` answers every login 535, as SES does once the key is gone;
`untrusted-certificate` answers STARTTLS with a self-signed certificate for the same name, as
something intercepting the path would (a client that verifies refuses it); stopping the process
takes it away for good.

`python -m infra.lab.world.servers cloudflare DIR ADDRESS ZONE TOKEN_FILE CERT KEY [NETWORKS_FILE]`
answers as api.cloudflare.com for the few calls certbot's dns-cloudflare plugin makes (find the
zone; add, find and delete a TXT record), over HTTPS with a lab CA certificate, only for the one
API token, and (given the token's request-IP condition, a JSON list of networks) only from them.
The records it holds are written to DIR/records.zone, which the DNS stand-in serves alongside
its zone file (`dns ZONEFILE ADDRESS [MORE_ZONEFILES...]`); each call is logged to
DIR/calls.jsonl (never the token).
"""

from __future__ import annotations

import asyncio
import email
import email.utils
import fnmatch
import hashlib
import ipaddress
import json
import ssl
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from infra.core.facts import SUBMISSION_PORT


class ReloadingZone:
    """dnslib resolver over zone files, re-read whenever one of them changes (or appears)."""

    def __init__(self, *zone_files: Path) -> None:
        self.zone_files = zone_files
        self.loaded: tuple[float, ...] = ()
        self.resolver: Any = None
        self.lock = threading.Lock()

    def resolve(self, request: Any, handler: Any) -> Any:
        from dnslib.zoneresolver import ZoneResolver

        with self.lock:
            modified = tuple(f.stat().st_mtime_ns if f.exists() else -1 for f in self.zone_files)
            if modified != self.loaded:
                text = "\n".join(f.read_text() for f in self.zone_files if f.exists())
                self.resolver = ZoneResolver(text, glob=False)
                self.loaded = modified
            resolver = self.resolver
        return resolver.resolve(request, handler)


def serve_dns(zone_file: Path, address: str, *more: Path) -> None:
    from dnslib.server import DNSLogger, DNSServer

    resolver = ReloadingZone(zone_file, *more)
    quiet = DNSLogger("-request,-reply,-truncated,-data")  # errors only: the lab's logs stay readable
    servers = [DNSServer(resolver, address=address, port=53, tcp=tcp, logger=quiet) for tcp in (False, True)]
    for server in servers:
        server.start_thread()
    while all(s.isAlive() for s in servers):
        time.sleep(1)


def allowed_senders(policy: str) -> list[str]:
    """The `ses:FromAddress` patterns (IAM StringLike) of a policy document; [] means any sender."""
    patterns: list[str] = []
    for statement in json.loads(policy)["Statement"]:
        like = statement.get("Condition", {}).get("StringLike", {}).get("ses:FromAddress", [])
        patterns += [like] if isinstance(like, str) else like
    return patterns


class SesStandIn:
    """aiosmtpd handler: record what SES would have accepted, or fail as told."""

    def __init__(self, spool: Path, senders: list[str] | None = None) -> None:
        self.spool = spool
        self.senders = senders or []

    def refused_sender(self, envelope: Any) -> str | None:
        """The From the IAM condition does not allow, if any (IAM StringLike: * and ?, case kept)."""
        if not self.senders:
            return None
        header = email.message_from_bytes(envelope.original_content or envelope.content).get("From", "")
        addresses = [a for _, a in email.utils.getaddresses([header]) if a]
        addresses += [envelope.mail_from] if envelope.mail_from else []
        for address in addresses or [""]:
            if not any(fnmatch.fnmatchcase(address, pattern) for pattern in self.senders):
                return address
        return None

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
        refused = self.refused_sender(envelope)
        if refused is not None:
            with (self.spool / "refused.jsonl").open("a") as log:
                log.write(json.dumps({"from": refused, "to": envelope.rcpt_tos}) + "\n")
            return f"554 Access denied: not authorized to perform ses:SendRawEmail as {refused} (lab)"
        (self.spool / f"{stamp}.eml").write_bytes(envelope.original_content or envelope.content)
        # The user name the client logged in with (the authenticator keeps it; never the password).
        meta = {"from": envelope.mail_from, "to": envelope.rcpt_tos, "login": str(session.auth_data or "")}
        (self.spool / f"{stamp}.json").write_text(json.dumps(meta))
        return f"250 Ok {email.utils.make_msgid(domain='amazonses.com')[1:-1]}"


def serve_ses(
    spool: Path, address: str, hostname: str, user: str, password_file: Path, cert: Path, key: Path, senders: list[str]
) -> None:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    password = password_file.read_text().strip()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    untrusted = _self_signed_context(hostname)

    def in_mode(name: str) -> bool:
        mode = spool / "mode"
        return mode.exists() and mode.read_text().strip() == name

    def refusing() -> bool:  # "refuse-login": the password no longer works (a deleted IAM key)
        return in_mode("refuse-login")

    def server_name(sock: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        if in_mode("untrusted-certificate"):  # chosen per handshake: the next STARTTLS sees it
            sock.context = untrusted

    context.sni_callback = server_name

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and data.login.decode() == user and data.password.decode() == password
        ok = ok and not refusing()
        return AuthResult(success=ok, handled=False, auth_data=data.login.decode() if ok else None)

    spool.mkdir(parents=True, exist_ok=True)

    def listening() -> Any:  # a stopped Controller's loop is closed: each start needs a new one
        controller = Controller(
            SesStandIn(spool, senders),
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
            away = in_mode("away")
            if away and controller is not None:
                controller.stop()
                controller = None
            elif not away and controller is None:
                controller = listening()
            time.sleep(0.2)
    finally:
        if controller is not None:
            controller.stop()


def _self_signed_context(hostname: str) -> ssl.SSLContext:
    """A server context with a self-signed certificate for HOSTNAME, that no client trusts."""
    import datetime
    import tempfile

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory() as directory:  # load_cert_chain reads files only
        pem = Path(directory) / "untrusted.pem"
        pem.write_bytes(
            certificate.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        context.load_cert_chain(pem)
    return context


def _api_error(code: int, message: str) -> dict[str, Any]:
    """The API's envelope for a refused call."""
    return {"success": False, "errors": [{"code": code, "message": message}], "messages": [], "result": None}


class CloudflareApi:
    """What api.cloudflare.com/client/v4 holds for one zone: its id and the records added."""

    def __init__(self, directory: Path, zone: str, token: str, networks: list[str] | None = None) -> None:
        self.directory, self.zone, self.token = directory, zone, token
        # The token's request-IP condition, as the program declares it; None: from anywhere.
        self.networks = [ipaddress.ip_network(n) for n in networks] if networks else None
        self.zone_id = hashlib.sha256(zone.encode()).hexdigest()[:32]
        self.records: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True)
        self.publish()

    def publish(self) -> None:
        """The records as zone-file lines, replaced in one rename (the DNS never reads half)."""
        lines = [f'{r["name"]}. {r["ttl"]} IN TXT "{r["content"]}"' for r in self.records.values()]
        staged = self.directory / "records.zone.new"
        staged.write_text("".join(line + "\n" for line in lines))
        staged.replace(self.directory / "records.zone")

    def log(self, entry: dict[str, Any]) -> None:
        with (self.directory / "calls.jsonl").open("a") as calls:
            calls.write(json.dumps(entry) + "\n")

    def answer(
        self, method: str, path: str, query: dict[str, str], body: Any, token: str, client: str = ""
    ) -> tuple[int, Any]:
        """(HTTP status, the API's JSON envelope) for one call from the address CLIENT."""
        if token != self.token:
            return 403, _api_error(10000, "Authentication error")
        if self.networks is not None and not any(ipaddress.ip_address(client) in n for n in self.networks):
            return 403, _api_error(9109, f"Cannot use the access token from location: {client}")
        parts = path.removeprefix("/client/v4/").strip("/").split("/")
        result: Any
        with self.lock:
            if parts == ["zones"] and method == "GET":
                result = [{"id": self.zone_id, "name": self.zone}] if query.get("name") == self.zone else []
            elif parts[:3] == ["zones", self.zone_id, "dns_records"]:
                result = self.dns_records(method, parts[3:], query, body)
                if result is None:
                    return 404, _api_error(81044, "Record not found")
            else:
                return 404, _api_error(7003, "No route for that URI")
        return 200, {"success": True, "errors": [], "messages": [], "result": result}

    def dns_records(self, method: str, rest: list[str], query: dict[str, str], body: Any) -> Any:
        if method == "POST" and not rest:
            record = {"id": uuid.uuid4().hex, "type": body["type"], "name": body["name"].rstrip("."),
                      "content": body["content"], "ttl": int(body.get("ttl") or 120)}  # fmt: skip
            self.records[record["id"]] = record
            self.publish()
            return record
        if method == "GET" and not rest:
            wanted = {k: v for k, v in query.items() if k in ("type", "name", "content")}
            return [r for r in self.records.values() if all(str(r[k]) == v for k, v in wanted.items())]
        if method == "DELETE" and len(rest) == 1 and rest[0] in self.records:
            del self.records[rest[0]]
            self.publish()
            return {"id": rest[0]}
        return None


def serve_cloudflare(
    directory: Path, address: str, zone: str, token_file: Path, cert: Path, key: Path, networks: list[str] | None
) -> None:
    import http.server
    import urllib.parse

    api = CloudflareApi(directory, zone, token_file.read_text().strip(), networks)

    class Handler(http.server.BaseHTTPRequestHandler):
        def handle_call(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query))
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
            client = self.client_address[0]
            status, envelope = api.answer(self.command, url.path, query, body, token, client)
            api.log({"method": self.command, "path": url.path, "query": query, "status": status, "client": client})
            payload = json.dumps(envelope).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_DELETE = handle_call  # noqa: N815

        def log_message(self, format: str, *args: Any) -> None:
            pass  # calls.jsonl is the log

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = http.server.ThreadingHTTPServer((address, 443), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.serve_forever()


class SesApi:
    """What SES's v2 API (https://email.REGION.amazonaws.com/v2/email/...) answers for one account
    and its domain identities: GetAccount and GetEmailIdentity, in the JSON of the API reference
    (the tests hold each document against botocore's service model). moto implements
    GetEmailIdentity but not GetAccount, and creates every identity verified; this answers for an
    account in the sandbox or in production, and for identities verified, pending or failed.

    A call signed for another region is refused as SES refuses it (403, the signature's scope)."""

    def __init__(self, region: str, *, production: bool = True, sending: bool = True) -> None:
        self.region, self.production, self.sending = region, production, sending
        self.enforcement = "HEALTHY"
        self.identities: dict[str, dict[str, Any]] = {}

    def add_identity(self, domain: str, mail_from: str, status: str = "SUCCESS", mail_from_status: str = "") -> None:
        """A domain identity with Easy DKIM, its verification and DKIM in STATUS."""
        self.identities[domain] = {
            "IdentityType": "DOMAIN",
            "FeedbackForwardingStatus": True,
            "VerifiedForSendingStatus": status == "SUCCESS",
            "DkimAttributes": {
                "SigningEnabled": True,
                "Status": status,
                "Tokens": [hashlib.sha256(f"{domain}{i}".encode()).hexdigest()[:32] for i in range(3)],
                "SigningAttributesOrigin": "AWS_SES",
                "NextSigningKeyLength": "RSA_2048_BIT",
                "CurrentSigningKeyLength": "RSA_2048_BIT",
            },
            "MailFromAttributes": {
                "MailFromDomain": mail_from,
                # MAIL FROM has no NOT_STARTED: it is PENDING from the identity's creation.
                "MailFromDomainStatus": mail_from_status or status.replace("NOT_STARTED", "PENDING"),
                "BehaviorOnMxFailure": "USE_DEFAULT_VALUE",
            },
            "Policies": {},
            "Tags": [],
            "VerificationStatus": status,
        }

    def account(self) -> dict[str, Any]:
        quota = (50000.0, 14.0) if self.production else (200.0, 1.0)
        return {
            "DedicatedIpAutoWarmupEnabled": False,
            "EnforcementStatus": self.enforcement,
            "ProductionAccessEnabled": self.production,
            "SendQuota": {"Max24HourSend": quota[0], "MaxSendRate": quota[1], "SentLast24Hours": 3.0},
            "SendingEnabled": self.sending,
            "SuppressionAttributes": {"SuppressedReasons": ["BOUNCE", "COMPLAINT"]},
        }

    def answer(self, method: str, path: str, authorization: str) -> tuple[int, dict[str, str], dict[str, Any]]:
        """(HTTP status, headers, JSON body) for one call."""
        scope = authorization.partition("Credential=")[2].split(",")[0].split("/")
        if len(scope) < 4 or scope[2] != self.region or scope[3] != "ses":
            why = f"Credential should be scoped to a valid region, not {scope[2:3]}"
            return _aws_error(403, "SignatureDoesNotMatch", why)
        if method == "GET" and path == "/v2/email/account":
            return 200, {}, self.account()
        if method == "GET" and path.startswith("/v2/email/identities/"):
            name = path.removeprefix("/v2/email/identities/")
            if name in self.identities:
                return 200, {}, self.identities[name]
            return _aws_error(404, "NotFoundException", f"Email identity {name} does not exist.")
        return _aws_error(404, "UnknownOperationException", f"no operation {method} {path}")


def _aws_error(code: int, kind: str, message: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    """A refused call of a REST-JSON AWS API: the error's type in x-amzn-ErrorType, the message in the body."""
    kind_header = f"{kind}:http://internal.amazon.com/coral/com.amazonaws.sesv2/"
    return code, {"x-amzn-ErrorType": kind_header}, {"message": message}


def ses_api_server(api: SesApi, address: str, port: int = 0) -> Any:
    """An HTTP server answering as API (serve_forever in a thread; server_address tells the port)."""
    import http.server
    import urllib.parse

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
            status, headers, body = api.answer(self.command, path, self.headers.get("Authorization") or "")
            payload = json.dumps(body).encode()
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **headers}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return http.server.ThreadingHTTPServer((address, port), Handler)


def serve_s3(
    address: str,
    hostname: str,
    bucket: str,
    region: str,
    cert: Path,
    key: Path,
    server_key: Path | None = None,
    owner_key: Path | None = None,
) -> None:
    """moto's S3 over HTTPS as HOSTNAME (a lab CA certificate), holding BUCKET with versioning on,
    as the program declares it. With SERVER_KEY (the server's access key and the IAM policy the
    program gives it), every request must be signed by a key moto knows and be allowed by its
    policy, as AWS decides; an owner's key with every right is written to OWNER_KEY, for tests
    to do what only the owner may."""
    from moto import settings
    from moto.core.models import DEFAULT_ACCOUNT_ID
    from moto.iam.models import iam_backends
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from moto.s3.models import s3_backends
    from werkzeug.serving import run_simple

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    backend.create_bucket(bucket, region)
    backend.put_bucket_versioning(bucket, "Enabled")
    if server_key is not None and owner_key is not None:
        from moto.core.authorization import ActionAuthenticatorMixin

        given = json.loads(server_key.read_text())
        iam = iam_backends[DEFAULT_ACCOUNT_ID]["aws"]
        policy = json.loads(given["policy"])
        # moto authorises HEAD on a bucket as s3:HeadBucket; AWS as s3:ListBucket, which the policy
        # allows (docs.aws.amazon.com/AmazonS3/latest/API/API_HeadBucket.html).
        policy["Statement"][0]["Action"].append("s3:HeadBucket")
        everything = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        for user, document in (("mailroom-backup", policy), ("owner", everything)):
            iam.create_user(region, user)
            iam.put_user_policy(user, user, json.dumps(document))
            made = iam.create_access_key(user)
            if user == "mailroom-backup":  # the key the stack's state holds, not one moto makes up
                made.access_key_id, made.secret_access_key = given["id"], given["secret"]
            else:
                owner_key.write_text("")
                owner_key.chmod(0o600)
                owner_key.write_text(json.dumps({"id": made.access_key_id, "secret": made.secret_access_key}))
        # From here on every request is authenticated and authorised (moto's /moto-api/reset-auth 0).
        settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
        ActionAuthenticatorMixin.request_count = 0
    # moto picks the service from the Host header: requests to HOSTNAME are S3's.
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(address, 443, app, ssl_context=(str(cert), str(key)), threaded=True)


def main(argv: list[str]) -> None:
    asyncio.set_event_loop(asyncio.new_event_loop())
    if argv[0] == "dns":
        serve_dns(Path(argv[1]), argv[2], *(Path(a) for a in argv[3:]))
    elif argv[0] == "cloudflare":
        directory, address, zone, token_file, cert, key = argv[1:7]
        networks = json.loads(Path(argv[7]).read_text()) if len(argv) > 7 else None
        serve_cloudflare(Path(directory), address, zone, Path(token_file), Path(cert), Path(key), networks)
    elif argv[0] == "ses":
        spool, address, hostname, user, password_file, cert, key = argv[1:8]
        senders = allowed_senders(Path(argv[8]).read_text()) if len(argv) > 8 else []
        serve_ses(Path(spool), address, hostname, user, Path(password_file), Path(cert), Path(key), senders)
    elif argv[0] == "s3":
        address, hostname, bucket, region, cert, key = argv[1:7]
        guard = [Path(a) for a in argv[7:9]]
        serve_s3(address, hostname, bucket, region, Path(cert), Path(key), *guard)
    else:
        raise SystemExit(f"unknown stand-in {argv[0]!r}; accepted: dns, ses, cloudflare, s3")


if __name__ == "__main__":
    main(sys.argv[1:])
