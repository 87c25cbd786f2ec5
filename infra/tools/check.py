"""`python -m infra check --stack NAME`: everything wrong with the live mail domain, in plain words.

Expected values come from where the program takes them: the stack's settings and `records()`,
with the deploy-time facts from the stack's outputs (`pulumi stack output --json`: the droplet's
addresses, SES's DKIM tokens) and the DKIM key from the server itself. Observed values come from
the live world: DNS through a resolver (the system's, or --resolver), the server's ports from
where this runs, and the server's inside over SSH (`status.py server`, which the bundle installs).

Every line is ok, warning or failure, grouped; each warning and failure says what to do. Exit
status: 0 all ok, 1 warnings, 2 failures. Nothing printed is a secret: the relay's password never
leaves the server (its login is tried there), the Spamhaus DQS key is never shown.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.util
import ipaddress
import json
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

from infra.core.dns import MAIL_FROM_LABEL, Facts, mta_sts_policy, records
from infra.core.facts import CLOUD_INIT, HTTPS_PORT, IMAPS_PORT, SMTP_PORT, SUBMISSION_PORT, SUBMISSIONS_PORT
from infra.core.settings import Relay, Settings
from infra.core.stack import PROJECT

STATUS_SCRIPT = CLOUD_INIT / "status.py"
STATUS_PATH = "/usr/local/lib/mailroom/status.py"  # where the bundle installs it on the server
GROUPS = ("dns", "addresses", "tls", "blocklists", "relay", "server")

# Where each relay's sending addresses are published (an address its SPF authorises stands for it).
RELAY_SPF_DOMAIN = {Relay.SES: "amazonses.com", Relay.SMTP2GO: "spf.smtp2go.com"}
RELAY_NAME = {Relay.SES: "Amazon SES", Relay.SMTP2GO: "SMTP2GO"}
# Spamhaus's answers that are not listings (https://docs.spamhaus.com/datasets/docs/source/40-real-world-usage/PublicMirrors/MTAs/020-Postfix.html).
SPAMHAUS_ERRORS = {
    "127.255.255.252": "typing error in the DNSBL name",
    "127.255.255.254": "the query came through a public resolver, which Spamhaus does not answer",
    "127.255.255.255": "rate-limited: too many queries from this resolver",
}
DELISTING = "https://check.spamhaus.org/"


def load_status() -> ModuleType:
    """cloud_init/status.py, the file the server runs, imported as a module: one model, one comparison."""
    spec = importlib.util.spec_from_file_location("mailroom_status", STATUS_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


status = load_status()
Result = status.Result
OK, WARNING, FAILURE = status.OK, status.WARNING, status.FAILURE


class CheckError(RuntimeError):
    """The check cannot start (no stack outputs, no SSH): what is missing and how to give it."""


@dataclass
class Target:
    """The stack as deployed: its settings, the facts of its outputs, and how to reach it."""

    settings: Settings
    ipv4: str
    ipv6: str
    ses_dkim_tokens: tuple[str, ...] = ()
    resolver: str | None = None  # None: the system's resolver
    resolver_port: int = 53
    ca_file: str | None = None  # None: the system's trusted roots
    ssh: list[str] = field(default_factory=list)  # argv before the remote command; [] = skip the inside
    aws: bool = True  # ask SES's API (with the environment's AWS credentials) for the account and identity
    timeout: float = 15

    @classmethod
    def from_outputs(cls, settings: Settings, outputs: dict[str, Any], **kwargs: Any) -> Target:
        missing = [k for k in ("ipv4", "ipv6") if not outputs.get(k)]
        if missing:
            raise CheckError(f"the stack's outputs lack {', '.join(missing)}: has `pulumi up` finished?")
        return cls(
            settings, str(outputs["ipv4"]), str(outputs["ipv6"]), tuple(outputs.get("sesDkimTokens") or ()), **kwargs
        )


def _pulumi(argv: Sequence[str], needs: str) -> str:
    """What the Pulumi CLI prints for ARGV (on a pipe); NEEDS says what the check wanted of it."""
    if shutil.which("pulumi") is None:
        raise CheckError(f"{needs} needs the Pulumi CLI, which is not installed (https://www.pulumi.com/docs/install/)")
    done = subprocess.run(["pulumi", *argv], capture_output=True, text=True, check=False, timeout=120)
    if done.returncode != 0:
        raise CheckError(f"pulumi {' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


def stack_outputs(stack: str) -> dict[str, Any]:
    """`pulumi stack output --json` (plain outputs only: none of them is a secret)."""
    text = _pulumi(
        ["stack", "output", "--json", "--stack", stack], "reading the stack's outputs (or pass --outputs FILE)"
    )
    outputs: dict[str, Any] = json.loads(text)
    return outputs


# The secret settings the check itself uses (the DQS key names Spamhaus's zones to ask).
SECRETS_USED = ("spamhausDqsKey",)


def stack_secret(stack: str, key: str) -> str:
    """A setting the stack holds encrypted, decrypted by the Pulumi CLI (`pulumi config get`);
    it travels on a pipe, never on a command line, and is never printed."""
    text = _pulumi(
        ["config", "get", f"{PROJECT}:{key}", "--stack", stack], f"the stack holds {key} encrypted: reading it"
    )
    return text.rstrip("\n")


def _resolver(target: Target) -> Any:
    return status.resolver_for(target.resolver, target.timeout, target.resolver_port)


def _context(target: Target) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=target.ca_file)


# ---------------------------------------------------------------------------------------------
# The server's inside, over SSH.


def inside(target: Target) -> tuple[list[Any], dict[str, str]]:
    """The server's own checks, its DKIM public key and a probe signed by it (`status.py server`);
    a failure line when SSH does not work."""
    if not target.ssh:
        return [
            Result(
                "server",
                "inside",
                WARNING,
                "not checked: no SSH access given",
                "run check with SSH access to the server (--ssh-user, --ssh-key)",
            )
        ], {}
    done = subprocess.run(
        [*target.ssh, f"sudo python3 {STATUS_PATH} server"], capture_output=True, text=True, check=False, timeout=300
    )
    if done.returncode != 0 or not done.stdout.strip().startswith("{"):
        why = (done.stderr.strip().splitlines() or ["no answer"])[-1]
        return [
            Result(
                "server",
                "inside",
                FAILURE,
                f"could not run the server's checks over SSH: {why}",
                f"ssh to {target.settings.admin_user}@{target.settings.host_name} must work with your key; "
                "if status.py is missing, `pulumi up` installs it",
            )
        ], {}
    answer = json.loads(done.stdout)
    keys = ("dkim_public_key", "dkim_signed")
    return status.from_json(answer["results"]), {k: str(answer[k]) for k in keys if answer.get(k)}


# ---------------------------------------------------------------------------------------------
# DNS.


def expected_records(target: Target, dkim_key: str | None) -> list[dict[str, Any]]:
    facts = Facts(target.ipv4, target.ipv6, dkim_key or "", target.ses_dkim_tokens)
    out = [asdict(r) for r in records(target.settings, facts) if r.hosted]
    return [r for r in out if dkim_key or r["key"] != "dkim"]


def dns_checks(target: Target, server: dict[str, str]) -> list[Any]:
    """SERVER: what `status.py server` told of the DKIM key ({} when the inside was not reached)."""
    dkim_key = server.get("dkim_public_key")
    resolver = _resolver(target)
    results = list(status.check_records(expected_records(target, dkim_key), resolver))
    signed = server.get("dkim_signed", "")
    if dkim_key is None:
        results.append(
            Result(
                "dns",
                "DKIM key",
                WARNING,
                "the DKIM record was not compared: the server's key is unknown",
                "let check reach the server over SSH; it reads the key the signer uses",
            )
        )
    elif signed.startswith("DKIM-Signature:"):
        results.append(status.check_dkim_signature(signed, resolver))
    else:
        results.append(
            Result(
                "dns",
                "DKIM signature",
                WARNING,
                f"the server signed no probe message ({signed or 'no answer'})",
                "run `pulumi up`: it installs python3-dkim, which the probe needs",
            )
        )
    results += stray_selector_checks(target)
    results += spf_checks(target)
    results.append(dmarc_check(target))
    results.append(mta_sts_check(target))
    return results


# Selectors other signers commonly publish: a key left at one of them from an old server or
# provider still lets whoever holds its private half sign as the domain.
COMMON_SELECTORS = ("default", "mail", "dkim", "selector1", "selector2", "s1", "s2", "k1", "google", "smtp")


def stray_selector_checks(target: Target) -> list[Any]:
    s = target.settings
    resolver = _resolver(target)
    results = []
    for selector in COMMON_SELECTORS:
        if selector == s.dkim_selector:
            continue
        name = f"{selector}._domainkey.{s.domain}"
        keys = [t for t in status.lookup(resolver, name, "TXT") or [] if "p=" in t and "p=;" not in t.replace(" ", "")]
        if keys:
            results.append(
                Result(
                    "dns",
                    f"TXT {name}",
                    WARNING,
                    f"a DKIM key the program does not declare (the program signs with {s.dkim_selector})",
                    f"if no other service sends mail as {s.domain} with the selector {selector}, delete "
                    f"`{name} TXT` at Cloudflare: whoever holds its private key can sign as the domain",
                )
            )
    return results


def dmarc_check(target: Target) -> Any:
    """The published DMARC policy read as a receiver does, and how each path aligns with it."""
    s = target.settings
    name = f"_dmarc.{s.domain}"
    found = [t.strip('"') for t in status.lookup(_resolver(target), name, "TXT") or []]
    policies = [t for t in found if t.startswith("v=DMARC1")]
    if len(policies) != 1:
        why = "no DMARC record" if not policies else f"{len(policies)} DMARC records (receivers then ignore all)"
        return Result(
            "dns",
            "DMARC",
            FAILURE,
            f"{why} at {name}: receivers apply no policy and send no reports",
            "set the DMARC record as `python -m infra zone` prints it, or run `pulumi up`",
        )
    tags = dict(part.strip().split("=", 1) for part in policies[0].split(";") if "=" in part)
    policy = tags.get("p", "?")
    if s.relay is Relay.SES:
        spf_path = f"SPF aligns through SES's MAIL FROM {MAIL_FROM_LABEL}.{s.domain} (relaxed)"
    else:
        spf_path = f"SPF aligns (MAIL FROM {s.domain})"
    detail = f"p={policy}, reports to {tags.get('rua', 'nobody')}; DKIM aligns (d={s.domain}); {spf_path}"
    if policy not in ("quarantine", "reject", "none"):
        return Result("dns", "DMARC", FAILURE, detail, "the p= tag must be none, quarantine or reject")
    return Result("dns", "DMARC", OK, detail)


def _spf_sample_address(resolver: Any, domain: str, depth: int = 0) -> str | None:
    """An address DOMAIN's SPF authorises: the first ip4 of it or of its first include."""
    for text in status.lookup(resolver, domain, "TXT") or []:
        terms = text.strip('"').split()
        if not terms or terms[0] != "v=spf1":
            continue
        for term in terms[1:]:
            if term.startswith("ip4:"):
                return str(next(iter(ipaddress.ip_network(term[4:], strict=False).hosts()), term[4:].split("/")[0]))
            if term.startswith("include:") and depth < 3:
                found = _spf_sample_address(resolver, term[8:], depth + 1)
                if found:
                    return found
    return None


def spf_checks(target: Target) -> list[Any]:
    """SPF evaluated (pyspf) for the address mail really leaves from, on the domain of its MAIL FROM."""
    import dns.resolver
    import spf

    s = target.settings
    resolver = _resolver(target)
    if s.relay is Relay.DIRECT:
        address, envelope, path = target.ipv4, s.domain, "the droplet"
    else:
        address = _spf_sample_address(resolver, RELAY_SPF_DOMAIN[s.relay]) or ""
        envelope = f"{MAIL_FROM_LABEL}.{s.domain}" if s.relay is Relay.SES else s.domain
        path = f"{RELAY_NAME[s.relay]}'s servers"
        if not address:
            return [
                Result(
                    "dns",
                    "SPF",
                    WARNING,
                    f"could not find an address in {RELAY_SPF_DOMAIN[s.relay]}'s SPF",
                    "nothing to do unless mail is refused for SPF",
                )
            ]
    default = dns.resolver.default_resolver
    dns.resolver.default_resolver = resolver  # pyspf asks dnspython's default resolver
    try:
        result, explanation = spf.check2(i=address, s=f"postmaster@{envelope}", h=s.host_name, timeout=target.timeout)
    finally:
        dns.resolver.default_resolver = default
    aligned = "aligned with the From domain (relaxed)" if envelope.endswith(s.domain) else "NOT aligned"
    if result != "pass":
        return [
            Result(
                "dns",
                "SPF",
                FAILURE,
                f"mail from {path} ({address}) with MAIL FROM {envelope} gets SPF {result}: {explanation}",
                "set the SPF records as `python -m infra zone` prints them (one v=spf1 record per name)",
            )
        ]
    return [Result("dns", "SPF", OK, f"pass for {path} ({address}) with MAIL FROM {envelope}, {aligned}")]


def _https_get(target: Target, name: str, path: str) -> tuple[int, str]:
    """GET https://NAME/PATH, NAME resolved through the target's resolver, the certificate verified."""
    resolver = _resolver(target)
    addresses = status.lookup(resolver, name, "A") or []
    if not addresses and (cname := status.lookup(resolver, name, "CNAME")):
        addresses = status.lookup(resolver, cname[0], "A") or []
    if not addresses:
        raise OSError(f"{name} has no address")
    with (
        socket.create_connection((addresses[0], HTTPS_PORT), timeout=target.timeout) as raw,
        _context(target).wrap_socket(raw, server_hostname=name) as tls,
    ):
        tls.sendall(f"GET {path} HTTP/1.0\r\nHost: {name}\r\nUser-Agent: mailroom-check\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode("utf-8", "replace")


def mta_sts_check(target: Target) -> Any:
    s = target.settings
    name = f"mta-sts.{s.domain}"
    try:
        code, body = _https_get(target, name, "/.well-known/mta-sts.txt")
    except (OSError, ssl.SSLError) as exc:
        return Result(
            "dns",
            "MTA-STS policy",
            FAILURE,
            f"https://{name}/.well-known/mta-sts.txt failed: {exc}",
            "senders that use MTA-STS cannot read the policy: check nginx on the server and the certificate",
        )
    wanted = mta_sts_policy(s)
    if code != 200 or body != wanted:
        fields = dict(line.split(":", 1) for line in body.splitlines() if ":" in line)
        served = f"mode {fields.get('mode', '?').strip()}, mx {fields.get('mx', '?').strip()}"
        return Result(
            "dns",
            "MTA-STS policy",
            FAILURE,
            f"the policy served (HTTP {code}, {served}) is not the program's",
            "run `pulumi up`: it installs the policy file; a changed policy also needs the new id in DNS",
        )
    return Result(
        "dns", "MTA-STS policy", OK, f"served over HTTPS as the program writes it (mode {s.mta_sts_mode.value})"
    )


# ---------------------------------------------------------------------------------------------
# Addresses: the droplet's PTRs name the host and confirm forward.


def address_checks(target: Target) -> list[Any]:
    import dns.reversename

    resolver = _resolver(target)
    host = target.settings.host_name
    results = []
    for kind, address in (("A", target.ipv4), ("AAAA", target.ipv6)):
        version = "IPv4" if kind == "A" else "IPv6"
        names = status.lookup(resolver, str(dns.reversename.from_address(address)), "PTR") or []
        forward = status.lookup(resolver, host, kind) or []
        canonical = str(ipaddress.ip_address(address))
        if names != [f"{host}."]:
            shown = ", ".join(names) if names else "none"
            results.append(
                Result(
                    "addresses",
                    f"{version} PTR",
                    FAILURE,
                    f"{address} points back to {shown}, not {host}: receivers distrust or refuse the mail",
                    f"DigitalOcean sets the PTR from the droplet's name: the droplet must be named {host} "
                    "(it is when the program creates it; a renamed droplet needs its name back)",
                )
            )
        elif canonical not in [str(ipaddress.ip_address(a)) for a in forward]:
            results.append(
                Result(
                    "addresses",
                    f"{version} PTR",
                    FAILURE,
                    f"{host} does not resolve back to {address}",
                    f"set `{host} {kind} {address}` (run `pulumi up`)",
                )
            )
        else:
            results.append(Result("addresses", f"{version} PTR", OK, f"{address} is {host}, and {host} is {address}"))
    return results


# ---------------------------------------------------------------------------------------------
# TLS on every port.

PORTS = (
    (SMTP_PORT, "smtp"),
    (SUBMISSIONS_PORT, "tls"),
    (SUBMISSION_PORT, "smtp"),
    (IMAPS_PORT, "tls"),
    (HTTPS_PORT, "tls"),
)


def _certificate(target: Target, port: int, starttls: bool) -> tuple[bytes, dict[str, Any]]:
    import smtplib

    host = target.settings.host_name
    context = _context(target)
    if starttls:
        with smtplib.SMTP(target.ipv4, port, timeout=target.timeout, local_hostname="mailroom-check") as smtp:
            # starttls checks the certificate against _host and sends it as SNI: the name, not the address.
            smtp._host = host  # type: ignore[attr-defined]
            smtp.starttls(context=context)
            tls = smtp.sock
            assert isinstance(tls, ssl.SSLSocket)
            der, info = tls.getpeercert(binary_form=True) or b"", tls.getpeercert() or {}
            return der, info
    with (
        socket.create_connection((target.ipv4, port), timeout=target.timeout) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        return tls.getpeercert(binary_form=True) or b"", tls.getpeercert() or {}


def tls_checks(target: Target, now: float | None = None) -> list[Any]:
    results = []
    seen: dict[str, list[int]] = {}
    for port, kind in PORTS:
        name = f"port {port}" + (" STARTTLS" if kind == "smtp" else "")
        try:
            der, info = _certificate(target, port, kind == "smtp")
        except ssl.SSLCertVerificationError as exc:
            results.append(
                Result(
                    "tls",
                    name,
                    FAILURE,
                    f"the certificate does not verify: {exc.verify_message}",
                    "sudo /usr/local/sbin/mailroom-certificate on the server installs the current "
                    "one; `sudo certbot renew` first if it expired",
                )
            )
            continue
        except (OSError, ssl.SSLError, Exception) as exc:
            results.append(
                Result(
                    "tls",
                    name,
                    FAILURE,
                    f"no TLS answer: {exc.__class__.__name__}: {exc}",
                    "check the daemon behind this port is running (the server group says) and the "
                    "cloud firewall allows the port",
                )
            )
            continue
        fingerprint = hashlib.sha256(der).hexdigest()
        seen.setdefault(fingerprint, []).append(port)
        ends = datetime.datetime.strptime(info["notAfter"], "%b %d %H:%M:%S %Y %Z").replace(tzinfo=datetime.UTC)
        days = (ends.timestamp() - (datetime.datetime.now(datetime.UTC).timestamp() if now is None else now)) / 86400
        results.append(
            status.graded(
                "tls",
                name,
                days,
                status.CERT_DAYS,
                f"valid for {target.settings.host_name}, {days:.0f} days left",
                "renewal is failing: on the server, `sudo certbot renew` says why; "
                "then `sudo /usr/local/sbin/mailroom-certificate`",
            )
        )
    if len(seen) > 1:
        common = max(seen.values(), key=len)
        odd = sorted(p for ports in seen.values() if ports is not common for p in ports)
        results.append(
            Result(
                "tls",
                "one certificate",
                FAILURE,
                f"port(s) {', '.join(map(str, odd))} serve a different certificate from port(s) "
                f"{', '.join(map(str, common))}",
                "sudo /usr/local/sbin/mailroom-certificate installs the current one for every daemon",
            )
        )
    elif seen:
        results.append(Result("tls", "one certificate", OK, "every port serves the same certificate"))
    return results


# ---------------------------------------------------------------------------------------------
# Blocklists.


def _reversed(address: str) -> str:
    return str(ipaddress.ip_address(address).reverse_pointer).rsplit(".", 2)[0]


def blocklist_checks(target: Target) -> list[Any]:
    s = target.settings
    resolver = _resolver(target)
    key = s.spamhaus_dqs_key.reveal()
    zen = f"{key}.zen.dq.spamhaus.net" if key else "zen.spamhaus.org"
    dbl = f"{key}.dbl.dq.spamhaus.net" if key else "dbl.spamhaus.org"
    shown_zen = "Spamhaus ZEN (DQS)" if key else "Spamhaus ZEN"
    results = []
    queries = [
        ("IPv4 " + target.ipv4, f"{_reversed(target.ipv4)}.{zen}", shown_zen),
        ("IPv6 " + target.ipv6, f"{_reversed(target.ipv6)}.{zen}", shown_zen),
        (s.domain, f"{s.domain}.{dbl}", "the Spamhaus DBL"),
    ]
    for what, query, listname in queries:
        answers = status.lookup(resolver, query, "A")
        name = f"{what} on {listname}"
        if answers is None:
            results.append(
                Result(
                    "blocklists",
                    name,
                    WARNING,
                    "the blocklist did not answer",
                    "try again later, or set spamhausDqsKey (a free Spamhaus DQS key)",
                )
            )
        elif not answers:
            results.append(Result("blocklists", name, OK, "not listed"))
        elif errors := [SPAMHAUS_ERRORS[a] for a in answers if a in SPAMHAUS_ERRORS]:
            results.append(
                Result(
                    "blocklists",
                    name,
                    WARNING,
                    f"not known: Spamhaus answered {errors[0]}",
                    "set spamhausDqsKey (a free Spamhaus DQS key), or run check with a resolver "
                    "of your own (--resolver)",
                )
            )
        else:
            results.append(
                Result(
                    "blocklists",
                    name,
                    FAILURE,
                    f"listed ({', '.join(answers)})",
                    f"look the address up at {DELISTING} and follow its delisting steps; first find "
                    "what sent spam (a stolen password: the server group's queue line)",
                )
            )
    return results


# ---------------------------------------------------------------------------------------------
# SES's side of the relay, through its API with the operator's AWS credentials.

SES_PRODUCTION_ACCESS = "https://docs.aws.amazon.com/ses/latest/dg/request-production-access.html"


def ses_checks(target: Target) -> list[Any]:
    """The identity verified, Easy DKIM and the MAIL FROM domain SUCCESS, the account out of the
    sandbox and sending (boto3's sesv2 GetAccount and GetEmailIdentity); skipped without credentials."""
    s = target.settings
    if s.relay is not Relay.SES:
        return []
    if not target.aws:
        return [
            Result(
                "relay",
                "SES account",
                status.SKIPPED,
                "SES's side was not checked (--no-aws, or the lab, which stands in for SES's SMTP only)",
                "run check without --no-aws against the real stack, with the AWS credentials `pulumi up` uses",
            )
        ]
    import boto3
    import botocore.config
    import botocore.exceptions

    session = boto3.session.Session(region_name=s.ses_region)
    if session.get_credentials() is None:
        return [
            Result(
                "relay",
                "SES account",
                status.SKIPPED,
                "SES's side was not checked: no AWS credentials here",
                "run check with the AWS credentials `pulumi up` uses (AWS_PROFILE, or "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)",
            )
        ]
    config = botocore.config.Config(
        connect_timeout=target.timeout, read_timeout=target.timeout, retries={"max_attempts": 2}
    )
    client = session.client("sesv2", config=config)
    where = f"SES in {s.ses_region}"
    results: list[Any] = []
    try:
        results += _ses_account(client.get_account(), where)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        results.append(_ses_unreadable("SES account", where, exc))
    try:
        identity = client.get_email_identity(EmailIdentity=s.domain)
    except client.exceptions.NotFoundException:
        results.append(
            Result(
                "relay",
                "SES identity",
                FAILURE,
                f"{where} has no identity for {s.domain}: it refuses every message from the domain",
                f"run `pulumi up` (it creates the identity), with sesRegion {s.ses_region}",
            )
        )
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        results.append(_ses_unreadable("SES identity", where, exc))
    else:
        results += _ses_identity(identity, s.domain, f"{MAIL_FROM_LABEL}.{s.domain}", where)
    return results


def _ses_unreadable(name: str, where: str, exc: Exception) -> Any:
    error = getattr(exc, "response", {}).get("Error", {})
    why = f"{error.get('Code', '?')}: {error.get('Message', '')}" if error else str(exc)
    why = (why.strip().splitlines() or ["?"])[0][:160]  # an answer that is a whole HTML page: its first line
    return Result(
        "relay",
        name,
        WARNING,
        f"could not ask {where}: {why}",
        "the credentials need ses:GetAccount and ses:GetEmailIdentity; an administrator's have them",
    )


def _ses_account(account: dict[str, Any], where: str) -> list[Any]:
    quota = account.get("SendQuota") or {}
    if not account.get("SendingEnabled", False):
        return [
            Result(
                "relay",
                "SES account",
                FAILURE,
                f"{where} has paused sending for the account (reputation {account.get('EnforcementStatus', '?')}): "
                "every message waits in the queue",
                "the SES console's Account dashboard and the AWS e-mail to the account's owner say why "
                "and how to ask for sending back",
            )
        ]
    if not account.get("ProductionAccessEnabled", False):
        return [
            Result(
                "relay",
                "SES account",
                FAILURE,
                f"the account is in {where}'s sandbox: mail reaches only verified addresses, "
                f"{quota.get('Max24HourSend', 200):.0f} a day",
                f"request production access for {where.removeprefix('SES in ')}: {SES_PRODUCTION_ACCESS}",
            )
        ]
    detail = (
        f"production access, sending enabled, {quota.get('SentLast24Hours', 0):.0f} of "
        f"{quota.get('Max24HourSend', 0):.0f} sent in the last 24 hours"
    )
    if account.get("EnforcementStatus", "HEALTHY") != "HEALTHY":
        return [
            Result(
                "relay",
                "SES account",
                WARNING,
                f"{detail}; reputation {account['EnforcementStatus']}: SES may pause sending",
                "the SES console's reputation metrics show the bounce and complaint rates to bring down",
            )
        ]
    return [Result("relay", "SES account", OK, detail)]


def _ses_identity(identity: dict[str, Any], domain: str, mail_from: str, where: str) -> list[Any]:
    results = []
    verification = identity.get("VerificationStatus") or (
        "SUCCESS" if identity.get("VerifiedForSendingStatus") else "PENDING"
    )
    dkim = (identity.get("DkimAttributes") or {}).get("Status", "NOT_STARTED")
    if verification == "SUCCESS" and dkim == "SUCCESS":
        results.append(Result("relay", "SES identity", OK, f"{domain} is verified and Easy DKIM is SUCCESS"))
    else:
        waiting = verification in ("PENDING", "NOT_STARTED") and dkim in ("PENDING", "NOT_STARTED")
        results.append(
            Result(
                "relay",
                "SES identity",
                WARNING if waiting else FAILURE,
                f"{domain} is {verification} and Easy DKIM {dkim} at {where}: SES refuses the domain's "
                "mail until both are SUCCESS",
                "SES looks for the three DKIM CNAME records (the dns group checks them) for 72 hours after "
                "`pulumi up`; once they resolve it verifies within hours; after FAILED, run `pulumi up` again",
            )
        )
    attributes = identity.get("MailFromAttributes") or {}
    found, state = attributes.get("MailFromDomain", ""), attributes.get("MailFromDomainStatus", "")
    if found != mail_from or state != "SUCCESS":
        shown = f"{found} is {state}" if found else "none is set"
        results.append(
            Result(
                "relay",
                "SES MAIL FROM",
                WARNING if found == mail_from and state == "PENDING" else FAILURE,
                f"MAIL FROM {mail_from} expected, {shown}: SES falls back to amazonses.com and SPF no longer "
                "aligns for DMARC",
                f"the MX and SPF records of {mail_from} (the dns group) must resolve; `pulumi up` sets "
                "them and the identity's MAIL FROM",
            )
        )
    else:
        results.append(Result("relay", "SES MAIL FROM", OK, f"{mail_from} is SUCCESS"))
    return results


# ---------------------------------------------------------------------------------------------


def run(target: Target, groups: Sequence[str] = GROUPS) -> list[Any]:
    """Every check of GROUPS, in order; the inside is fetched once (it also gives the DKIM key)."""
    inside_results, server = inside(target) if {"dns", "relay", "server"} & set(groups) else ([], {})
    steps: dict[str, Callable[[], list[Any]]] = {
        "dns": lambda: dns_checks(target, server),
        "addresses": lambda: address_checks(target),
        "tls": lambda: tls_checks(target),
        "blocklists": lambda: blocklist_checks(target),
        "relay": lambda: [r for r in inside_results if r.group == "relay"] + ses_checks(target),
        "server": lambda: [r for r in inside_results if r.group == "server"],
    }
    results: list[Any] = []
    for group in groups:
        results += steps[group]()
    return results


def as_json(results: Sequence[Any]) -> str:
    return json.dumps(
        {"status": [OK, WARNING, FAILURE][status.exit_code(results)], "results": [asdict(r) for r in results]}, indent=2
    )
