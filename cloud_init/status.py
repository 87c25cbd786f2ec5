#!/usr/bin/python3
"""mailroom's status checks that run on the server, and the model every check shares.

Installed by the bundle at /usr/local/lib/mailroom/status.py, with what to expect in
/etc/mailroom/status.json (rendered from the settings and the program's DNS records). Run as root:

    status.py server           the server's inside as JSON: daemons, fail2ban, the queue, the mail
                               volume, memory, updates, the certificate, the relay's login
    status.py daily            the server's inside and the DNS records (through the server's
                               resolver); mails the owner only when a line changed since the last run
    status.py show             the same checks as `daily`, printed, nothing mailed or remembered

The operator's `python -m infra check` imports this file for the model and the DNS comparison,
and runs `status.py server` over SSH for the inside. Standard library only, dnspython (Debian's
python3-dnspython) for DNS and dkimpy (python3-dkim) for the DKIM probe. Nothing here prints a
secret: the relay's password is read from Postfix's sasl_passwd and only ever sent to the relay.
"""

from __future__ import annotations

import datetime
import email.message
import email.utils
import json
import os
import re
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CONFIG = Path("/etc/mailroom/status.json")
STATE = Path("/var/lib/mailroom/status-last.json")
SASL_PASSWD = Path("/etc/postfix/sasl_passwd")
CERTIFICATE = Path("/etc/mailroom/tls/fullchain.pem")

OK, WARNING, FAILURE = "ok", "warning", "failure"
SKIPPED = "skipped"  # not checked, for a reason the line gives (no credentials, not this mode)
EXIT_CODES = {OK: 0, SKIPPED: 0, WARNING: 1, FAILURE: 2}
GROUPS = ("dns", "addresses", "tls", "blocklists", "relay", "server")

# Thresholds: (warn below/above, fail below/above).
CERT_DAYS = (21, 7)
QUEUE_AGE_HOURS = (1, 24)
VOLUME_FREE_PERCENT = (20, 10)
MEMORY_AVAILABLE_PERCENT = (10, 5)
SWAP_USED_PERCENT = (50, 80)


@dataclass(frozen=True)
class Result:
    """One line of the status: what was checked, how it stands, and what to do about it."""

    group: str
    name: str
    status: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status.upper():8} {self.group:10} {self.name}: {self.detail}"
        label = "to check it" if self.status == SKIPPED else "fix"
        return f"{text}\n{'':20}{label}: {self.fix}" if self.fix and self.status != OK else text


def ok(group: str, name: str, detail: str) -> Result:
    return Result(group, name, OK, detail)


def graded(
    group: str, name: str, value: float, limits: tuple[float, float], detail: str, fix: str, *, low_is_bad: bool = True
) -> Result:
    """A figure against its warning and failure limits."""
    warn, fail = limits

    def bad(v: float, limit: float) -> bool:
        return v < limit if low_is_bad else v > limit

    status = FAILURE if bad(value, fail) else WARNING if bad(value, warn) else OK
    return Result(group, name, status, detail, fix if status != OK else "")


def exit_code(results: Iterable[Result]) -> int:
    return max((EXIT_CODES[r.status] for r in results), default=0)


def report(results: Sequence[Result]) -> str:
    """The lines, grouped in GROUPS order, failures and warnings first within a group."""
    rank = {FAILURE: 0, WARNING: 1, OK: 2, SKIPPED: 3}
    ordered = sorted(results, key=lambda r: (GROUPS.index(r.group) if r.group in GROUPS else 99, rank[r.status]))
    counts = Counter(r.status for r in results)
    summary = f"{counts[FAILURE]} failure(s), {counts[WARNING]} warning(s), {counts[OK]} ok"
    summary += f", {counts[SKIPPED]} skipped" if counts[SKIPPED] else ""
    return "\n".join([*(r.line() for r in ordered), summary]) + "\n"


def from_json(items: Iterable[dict[str, str]]) -> list[Result]:
    return [Result(**{k: item.get(k, "") for k in ("group", "name", "status", "detail", "fix")}) for item in items]


def _run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# DNS: every record the program declares, exactly; drift at the names it manages.


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def record_text(record: dict[str, Any]) -> str:
    """A record as one would type it into a zone or the DNS provider: name, type, value."""
    value = record["value"]
    kind = record["type"]
    if kind == "MX":
        value = f"{record['priority']} {value}."
    elif kind == "SRV":
        target = "." if value == "." else f"{value}."
        value = f"{record['priority']} {record['weight']} {record['port']} {target}"
    elif kind == "CNAME":
        value = f"{value}."
    elif kind == "TXT":
        value = _quoted(value)
    elif kind == "CAA":
        value = f"{record['flags']} {record['tag']} {_quoted(value)}"
    return f"{record['name']} {kind} {value}"


def normalised(kind: str, rdata: Any) -> str:
    """An answer in the same form as record_text's value."""
    if kind == "TXT":
        return _quoted(b"".join(rdata.strings).decode("utf-8", "replace"))
    if kind == "CAA":
        return f"{rdata.flags} {rdata.tag.decode()} {_quoted(rdata.value.decode('utf-8', 'replace'))}"
    if kind == "MX":
        return f"{rdata.preference} {str(rdata.exchange).lower()}"
    if kind == "SRV":
        return f"{rdata.priority} {rdata.weight} {rdata.port} {str(rdata.target).lower()}"
    if kind == "CNAME":
        return str(rdata.target).lower()
    return str(rdata).lower()


def resolver_for(nameserver: str | None, timeout: float = 5, port: int = 53) -> Any:
    import dns.resolver

    resolver = dns.resolver.Resolver(configure=nameserver is None)
    if nameserver:
        resolver.nameservers = [nameserver]
        resolver.port = port
    resolver.lifetime = timeout
    return resolver


def lookup(resolver: Any, name: str, kind: str) -> list[str] | None:
    """The answers for NAME/KIND as strings; [] for none; None when the resolver gave no answer at all."""
    import dns.exception
    import dns.resolver

    try:
        return sorted(normalised(kind, r) for r in resolver.resolve(name, kind, search=False))
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except (dns.resolver.NoNameservers, dns.exception.Timeout):
        return None


def _value(text: str) -> str:
    return text.split(" ", 2)[2]


def check_records(expected: Sequence[dict[str, Any]], resolver: Any) -> list[Result]:
    """Each expected record present with its exact value, and nothing else at the (name, type)
    pairs the program manages; at a TXT name it shares (the domain's apex), only a second SPF
    record is drift: other TXT records there (site verifications) are the owner's."""
    results: list[Result] = []
    wanted: dict[tuple[str, str], list[str]] = {}
    for record in expected:
        wanted.setdefault((record["name"].lower(), record["type"]), []).append(record_text(record))
    for (name, kind), lines in wanted.items():
        label = f"{kind} {name}"
        answers = lookup(resolver, name, kind)
        if answers is None:
            # A resolver that does not answer one name answers none: one line, not one per record.
            results.append(
                Result(
                    "dns",
                    label,
                    FAILURE,
                    "the resolver gave no answer (server failure or timeout); no other record was checked",
                    "check that the domain's name servers at the registrar are the stack's "
                    "nameServers output, and that DNSSEC there matches the zone",
                )
            )
            break
        fold = (lambda v: v) if kind == "TXT" else str.lower
        values = [fold(_value(line)) for line in lines]
        observed = [fold(a) for a in answers]
        extra = [a for a in observed if a not in values]
        if kind == "TXT" and not _managed_txt(name):
            extra = [a for a in extra if a.startswith('"v=spf1') and any(v.startswith('"v=spf1') for v in values)]
        missing = [(line, v) for line, v in zip(lines, values, strict=True) if v not in observed]
        for line, value in missing:
            # A value of the same kind in its place is this record changed, not a stray one.
            changed = [a for a in extra if kind != "TXT" or a.split(" ")[0] == value.split(" ")[0]][:1]
            extra = [a for a in extra if a not in changed]
            now = f"it has {changed[0]}" if changed else "absent"
            results.append(
                Result(
                    "dns",
                    label,
                    FAILURE,
                    f"{value} expected ({now})",
                    f"set the record `{line}` at Cloudflare, or run `pulumi up`, which sets it",
                )
            )
        for other in extra:
            why = (
                "a second SPF record makes SPF fail for every message (permerror)"
                if other.startswith('"v=spf1')
                else "the program does not declare it"
            )
            results.append(
                Result(
                    "dns",
                    label,
                    FAILURE,
                    f"an extra record {other}: {why}",
                    f"delete `{name} {kind} {other}` at Cloudflare; the program keeps its own",
                )
            )
        if not missing and not extra:
            many = f" ({len(lines)} records)" if len(lines) > 1 else ""
            results.append(ok("dns", label, f"as the program declares{many}"))
    return results


def _managed_txt(name: str) -> bool:
    """A TXT name the program owns entirely (DMARC, DKIM, MTA-STS, TLS-RPT), not a shared one."""
    return name.startswith(("_dmarc.", "_mta-sts.", "_smtp._tls.")) or "._domainkey." in name


# ---------------------------------------------------------------------------------------------
# The server's inside.


def _unit_names(unit: str) -> list[str]:
    """UNIT, or the services a pattern (php*-fpm) names on this host; the pattern when none is loaded."""
    if "*" not in unit:
        return [unit]
    done = _run("systemctl", "list-units", "--all", "--plain", "--no-legend", "--type=service", f"{unit}.service")
    names = [line.split()[0].removesuffix(".service") for line in done.stdout.splitlines() if line.strip()]
    return names or [unit]


def check_daemons(patterns: Sequence[str]) -> list[Result]:
    units = [name for unit in patterns for name in _unit_names(unit)]
    stopped = [u for u in units if _run("systemctl", "is-active", "--quiet", u).returncode != 0]
    if stopped:
        return [
            Result(
                "server",
                "daemons",
                FAILURE,
                f"not running: {', '.join(stopped)}",
                f"sudo systemctl restart {' '.join(stopped)}; `journalctl -u {stopped[0]} -n 50` tells why "
                "it stopped; mail waits in the queue meanwhile",
            )
        ]
    return [ok("server", "daemons", f"all {len(units)} running ({', '.join(units)})")]


def check_fail2ban(jails: Sequence[str]) -> list[Result]:
    done = _run("fail2ban-client", "status")
    if done.returncode != 0:
        return [
            Result(
                "server",
                "fail2ban",
                FAILURE,
                "fail2ban is not answering: password guessing goes unbanned",
                "sudo systemctl restart fail2ban; `journalctl -u fail2ban -n 50` tells why",
            )
        ]
    listed = done.stdout.split("Jail list:", 1)[-1].replace(",", " ").split()
    missing = [j for j in jails if j not in listed]
    if missing:
        return [
            Result(
                "server",
                "fail2ban",
                FAILURE,
                f"jails not running: {', '.join(missing)}",
                "sudo fail2ban-client reload; `fail2ban-client -t` shows a broken jail",
            )
        ]
    return [ok("server", "fail2ban", f"running with jails {', '.join(listed)}")]


def check_queue(now: float | None = None) -> list[Result]:
    done = _run("postqueue", "-j")
    if done.returncode != 0:
        return [
            Result(
                "server", "queue", FAILURE, "postqueue failed: Postfix is not running", "sudo systemctl restart postfix"
            )
        ]
    entries = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    deferred = [e for e in entries if e.get("queue_name") == "deferred"]
    if not deferred:
        return [ok("server", "queue", f"{len(entries)} message(s) queued, none deferred")]
    now = time.time() if now is None else now
    oldest = min(int(e.get("arrival_time", now)) for e in deferred)
    hours = (now - oldest) / 3600
    reasons = Counter(r.get("delay_reason", "") for e in deferred for r in e.get("recipients", []))
    reason = reasons.most_common(1)[0][0] if reasons else "unknown"
    return [
        graded(
            "server",
            "queue",
            hours,
            QUEUE_AGE_HOURS,
            f"{len(deferred)} message(s) deferred, the oldest for {hours:.1f} h; most often: {reason}",
            "read the reason above: a relay refusing its login is fixed by `pulumi up`; a remote server "
            "refusing is theirs to fix; `sudo postqueue -f` retries now, nothing is lost meanwhile "
            "(Postfix gives up after 5 days)",
            low_is_bad=False,
        )
    ]


def check_volume(mail_dir: str) -> list[Result]:
    if _run("mountpoint", "-q", mail_dir).returncode != 0:
        return [
            Result(
                "server",
                "mail volume",
                FAILURE,
                f"{mail_dir} is not mounted: mail would go to the droplet's disk",
                "sudo /usr/local/sbin/mailroom-mount-volume; check the volume is attached in DigitalOcean",
            )
        ]
    stat = os.statvfs(mail_dir)
    free = 100.0 * stat.f_bavail / stat.f_blocks if stat.f_blocks else 0.0
    size_gb = stat.f_blocks * stat.f_frsize / 1e9
    return [
        graded(
            "server",
            "mail volume",
            free,
            VOLUME_FREE_PERCENT,
            f"{free:.0f} % free of {size_gb:.1f} GB",
            "raise volumeSizeGb in the stack's settings and run `pulumi up` (the volume grows in place); "
            "mail is deferred, not lost, while it is full",
        )
    ]


def check_memory(meminfo: str | None = None) -> list[Result]:
    text = meminfo if meminfo is not None else Path("/proc/meminfo").read_text()
    info = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)}
    available = 100.0 * info.get("MemAvailable", 0) / max(info.get("MemTotal", 1), 1)
    results = [
        graded(
            "server",
            "memory",
            available,
            MEMORY_AVAILABLE_PERCENT,
            f"{available:.0f} % available of {info.get('MemTotal', 0) // 1024} MiB",
            "see what grew with `ps aux --sort=-rss | head`; a larger droplet size (dropletSize) "
            "is one `pulumi up` away",
        )
    ]
    if info.get("SwapTotal"):
        used = 100.0 * (info["SwapTotal"] - info.get("SwapFree", 0)) / info["SwapTotal"]
        results.append(
            graded(
                "server",
                "swap",
                used,
                SWAP_USED_PERCENT,
                f"{used:.0f} % of swap in use",
                "the droplet is short of memory: see `ps aux --sort=-rss | head`",
                low_is_bad=False,
            )
        )
    return results


def check_updates() -> list[Result]:
    results = []
    done = _run("apt-get", "-s", "-o", "Debug::NoLocking=1", "upgrade", timeout=120)
    pending = [line for line in done.stdout.splitlines() if line.startswith("Inst ")]
    security = [line.split()[1] for line in pending if "security" in line.lower()]
    if done.returncode != 0:
        results.append(
            Result(
                "server",
                "updates",
                WARNING,
                "could not ask apt for pending updates",
                "sudo apt-get update, and read what it says",
            )
        )
    elif security:
        results.append(
            Result(
                "server",
                "updates",
                WARNING,
                f"{len(security)} security update(s) pending: {', '.join(security[:5])}",
                "sudo apt-get upgrade (unattended-upgrades installs them nightly when enabled)",
            )
        )
    else:
        results.append(ok("server", "updates", f"no security update pending ({len(pending)} other)"))
    if Path("/var/run/reboot-required").exists():
        results.append(
            Result(
                "server",
                "reboot",
                WARNING,
                "a reboot is pending (a new kernel or library)",
                "sudo reboot at a quiet hour; mail waits at the senders meanwhile",
            )
        )
    return results


def check_certificate(path: Path = CERTIFICATE, now: float | None = None) -> list[Result]:
    done = _run("openssl", "x509", "-noout", "-enddate", "-in", str(path))
    if done.returncode != 0:
        return [
            Result(
                "server",
                "certificate",
                FAILURE,
                f"no certificate at {path}",
                "sudo /usr/local/sbin/mailroom-certificate",
            )
        ]
    ends = datetime.datetime.strptime(done.stdout.strip().split("=", 1)[1], "%b %d %H:%M:%S %Y %Z")
    days = (ends.replace(tzinfo=datetime.UTC).timestamp() - (time.time() if now is None else now)) / 86400
    results = [
        graded(
            "server",
            "certificate",
            days,
            CERT_DAYS,
            f"expires in {days:.0f} days",
            "sudo certbot renew; then sudo /usr/local/sbin/mailroom-certificate; `journalctl -u certbot` "
            "tells why renewal failed",
        )
    ]
    enabled = _run("systemctl", "is-enabled", "--quiet", "certbot.timer").returncode == 0
    results.append(
        ok("server", "renewal", "certbot.timer enabled")
        if enabled
        else Result(
            "server",
            "renewal",
            FAILURE,
            "certbot.timer is not enabled: the certificate will expire",
            "sudo systemctl enable --now certbot.timer",
        )
    )
    return results


def relay_credentials(path: Path = SASL_PASSWD) -> tuple[str, str] | None:
    """The user and password Postfix logs in to the relay with (never printed)."""
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            user, _, password = line.split(None, 1)[1].partition(":")
            return user, password
    return None


def check_relay_login(relay: dict[str, Any] | None, context: ssl.SSLContext | None = None) -> list[Result]:
    """The relay answers, its certificate verifies, and it accepts the server's login; nothing is sent."""
    if not relay:
        return [ok("relay", "login", "direct delivery: no relay to log in to")]
    host, port = relay["host"], int(relay["port"])
    credentials = relay_credentials()
    if credentials is None:
        return [
            Result(
                "relay",
                "login",
                FAILURE,
                "Postfix has no relay credentials (/etc/postfix/sasl_passwd)",
                "run `pulumi up`: it sends them with the server's files",
            )
        ]
    try:
        with smtplib.SMTP(host, port, timeout=20) as smtp:
            smtp.ehlo(socket.getfqdn())
            smtp.starttls(context=context or ssl.create_default_context())
            smtp.ehlo(socket.getfqdn())
            smtp.login(*credentials)
    except smtplib.SMTPAuthenticationError as exc:
        return [
            Result(
                "relay",
                "login",
                FAILURE,
                f"{host} refused the server's login ({exc.smtp_code}): outbound mail is deferred",
                "run `pulumi up` to send the current credentials; for SES, check the IAM user's access "
                "key still exists; for SMTP2GO, the password in the stack's settings",
            )
        ]
    except ssl.SSLError as exc:
        why = getattr(exc, "verify_message", None) or exc.reason  # "self-signed certificate", ...
        return [
            Result(
                "relay",
                "login",
                FAILURE,
                f"{host}'s certificate did not verify ({why}): outbound mail is deferred, not sent in clear",
                "update ca-certificates (sudo apt-get upgrade); if it still fails, something between the "
                "droplet and the relay answers in its place: check /etc/resolv.conf and the relay's status page",
            )
        ]
    except (OSError, smtplib.SMTPException) as exc:
        return [
            Result(
                "relay",
                "login",
                FAILURE,
                f"{host}:{port} did not answer ({exc.__class__.__name__}: {exc})",
                "outbound mail waits in the queue; check the relay's status page; DigitalOcean allows "
                "port 587 outbound",
            )
        ]
    return [ok("relay", "login", f"{host}:{port} answers, STARTTLS verifies, the server's login is accepted")]


def dkim_public_key(key_path: str) -> str:
    """The base64 body of the public half of the key the signer uses (what DKIM's p= must hold)."""
    done = _run("openssl", "pkey", "-in", key_path, "-pubout")
    return "".join(line for line in done.stdout.splitlines() if not line.startswith("-----"))


def dkim_signed_sample(config: dict[str, Any], now: float | None = None) -> str:
    """A short message signed with the key file the signer uses (dkimpy); it is never sent.

    Verifying it against the live DNS proves what a receiver would see: the published key is the
    signer's, parses, and the selector and domain are the ones the signer puts in d= and s=."""
    import dkim

    domain = config["domain"]
    when = email.utils.formatdate(now, localtime=False)
    message = (
        f"From: mailroom status <postmaster@{domain}>\r\nTo: postmaster@{domain}\r\n"
        f"Subject: mailroom DKIM probe\r\nDate: {when}\r\n"
        f"Message-ID: <dkim-probe.{int(time.time())}@{config['host']}>\r\n\r\n"
        "Signed by the status check to prove the published DKIM key; never sent.\r\n"
    ).encode()
    signature: bytes = dkim.sign(
        message,
        config["dkim_selector"].encode(),
        domain.encode(),
        Path(config["dkim_key"]).read_bytes(),
        include_headers=[b"From", b"To", b"Subject", b"Date", b"Message-ID"],
    )
    return (signature + message).decode()


def check_dkim_signature(signed: str, resolver: Any) -> Result:
    """Verify SIGNED (dkimpy) with the key its d= and s= name, fetched through RESOLVER."""
    import logging

    import dkim
    import dns.exception
    import dns.resolver

    def txt(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
            raise dkim.DnsTimeoutError(str(exc)) from exc
        return b"".join(b"".join(r.strings) for r in answer)

    reasons: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            reasons.append(record.getMessage())

    logger = logging.getLogger("mailroom.dkim")
    logger.propagate = False
    logger.handlers = [Collect()]
    message = signed.encode()
    verifier = dkim.DKIM(message, logger=logger)
    verified = verifier.verify(dnsfunc=txt)
    header = " ".join(str(email.message_from_bytes(message).get("DKIM-Signature", "")).split())
    tags = dict(part.strip().split("=", 1) for part in header.split(";") if "=" in part)
    where = f"{tags.get('s', '?')}._domainkey.{tags.get('d', '?')}"
    if verified:
        return ok("dns", "DKIM signature", f"a fresh signature by the server's key verifies with the key at {where}")
    # dkimpy's messages show names as bytes (b'...'): shown as the names they are.
    why = re.sub(r"b'([^']*)'", r"\1", reasons[-1]) if reasons else "the signature does not match the published key"
    return Result(
        "dns",
        "DKIM signature",
        FAILURE,
        f"a message signed by the server's key does not verify with {where}: {why}",
        "receivers treat the mail as unsigned: set the DKIM record as `python -m infra zone` prints it, "
        "or run `pulumi up`",
    )


def dns_side(config: dict[str, Any], resolver: Any) -> list[Result]:
    """The daily run's DNS part: the records, and a fresh DKIM signature checked against them."""
    results = check_records(config["records"], resolver)
    try:
        results.append(check_dkim_signature(dkim_signed_sample(config), resolver))
    except Exception as exc:  # no python3-dkim yet, an unreadable key: say so, keep the rest
        results.append(
            Result(
                "dns",
                "DKIM signature",
                WARNING,
                f"no probe signature: {exc.__class__.__name__}: {exc}",
                "run `pulumi up`: it installs python3-dkim and the key",
            )
        )
    return results


BOOTSTRAPPED = Path("/var/lib/mailroom-bootstrapped")


def check_backup(
    backup: dict[str, Any] | None, now: float | None = None, installed: Path = BOOTSTRAPPED
) -> list[Result]:
    """The nightly off-site backup: on, run within the last day, its last run good, and its history
    out of the server key's reach."""
    results = _backup_age(backup, now, installed)
    if backup is not None and not backup.get("history_protected", True):
        results.append(
            Result(
                "server",
                "backup history",
                WARNING,
                "the server's own Spaces key can delete the backup's old versions (Spaces has no finer "
                "grant than read/write/delete): whoever takes the server can destroy the backup",
                "backupTarget s3 keeps the history out of the server key's reach (its policy denies it)",
            )
        )
    return results


def _backup_age(backup: dict[str, Any] | None, now: float | None, installed: Path) -> list[Result]:
    if backup is None:
        return [
            Result(
                "server",
                "backup",
                WARNING,
                "no off-site backup (backupTarget is none): a lost volume loses every message",
                "set backupTarget to s3 (or spaces) and run `pulumi up`",
            )
        ]
    now = time.time() if now is None else now
    limit = float(backup["max_age_hours"])
    fix_run = (
        "sudo journalctl -u mailroom-backup says why; `sudo python3 /usr/local/lib/mailroom/backup.py run` tries now"
    )
    path = Path(backup["result"])
    if not path.exists():
        age = (now - installed.stat().st_mtime) / 3600 if installed.exists() else 0.0
        if age < limit:
            return [ok("server", "backup", "no backup yet: the first runs tonight (mailroom-backup.timer)")]
        return [Result("server", "backup", FAILURE, f"no backup has run in the {age:.0f} h since install", fix_run)]
    result = json.loads(path.read_text())
    last = result.get("last_success")
    hours = (now - float(last)) / 3600 if last else None
    if not result.get("ok"):
        since = f"the newest good one is {hours:.0f} h old" if hours is not None else "no run has succeeded yet"
        return [
            Result(
                "server", "backup", FAILURE, f"the last backup failed ({result.get('error', '?')}); {since}", fix_run
            )
        ]
    if hours is None or hours > limit:
        return [
            Result(
                "server",
                "backup",
                FAILURE,
                f"the newest backup is {hours or 0:.0f} h old (more than {limit:.0f} h): the nightly run stopped",
                "`systemctl list-timers mailroom-backup.timer` shows when it runs; " + fix_run,
            )
        ]
    size = result.get("bytes", 0) / 1e6
    return [
        ok(
            "server",
            "backup",
            f"{hours:.1f} h ago to {backup['repository']}: snapshot {str(result.get('snapshot', ''))[:8]}, "
            f"{result.get('files', 0)} files, {size:.1f} MB, verified",
        )
    ]


def server_checks(config: dict[str, Any]) -> list[Result]:
    checks: list[Callable[[], list[Result]]] = [
        lambda: check_daemons(config["units"]),
        lambda: check_fail2ban(config["jails"]),
        check_queue,
        lambda: check_volume(config["mail_dir"]),
        check_memory,
        check_updates,
        check_certificate,
        lambda: check_relay_login(config.get("relay")),
    ]
    # Configs written before the backup existed have no "backup" key: nothing to check there.
    if "backup" in config:
        checks.append(lambda: check_backup(config["backup"]))
    results: list[Result] = []
    for check in checks:
        try:
            results += check()
        except Exception as exc:
            results.append(
                Result(
                    "server",
                    getattr(check, "__name__", "check"),
                    WARNING,
                    f"the check itself failed: {exc.__class__.__name__}: {exc}",
                    "report it",
                )
            )
    return results


# ---------------------------------------------------------------------------------------------
# The daily run: mail the owner when anything changed.


def changed_lines(before: Sequence[Result], after: Sequence[Result]) -> list[str]:
    """The lines of AFTER that were not in BEFORE (by group, name and status), then those gone."""
    key = {(r.group, r.name): r for r in before}
    lines = [
        r.line()
        for r in after
        if (old := key.get((r.group, r.name))) is None
        or old.status != r.status
        or (r.status != OK and old.detail != r.detail)
    ]
    now = {(r.group, r.name) for r in after}
    lines += [f"GONE     {r.group:10} {r.name}" for r in before if (r.group, r.name) not in now]
    return lines


def daily(config: dict[str, Any], state: Path = STATE) -> int:
    results = server_checks(config) + dns_side(config, resolver_for(None))
    before = from_json(json.loads(state.read_text())) if state.exists() else []
    changed = changed_lines(before, results)
    if changed:
        message = email.message.EmailMessage()
        counts = Counter(r.status for r in results)
        message["Subject"] = (
            f"mailroom status of {config['host']}: {counts[FAILURE]} failure(s), {counts[WARNING]} warning(s)"
        )
        message["From"] = f"mailroom status <root@{config['host']}>"
        message["To"] = config["alert_email"]
        message.set_content(
            "What changed since the last check:\n\n" + "\n".join(changed) + "\n\nEvery line now:\n\n" + report(results)
        )
        subprocess.run(["/usr/sbin/sendmail", "-oi", "-t"], input=message.as_bytes(), check=True, timeout=60)
    state.parent.mkdir(parents=True, exist_ok=True)
    tmp = state.with_suffix(".tmp")
    tmp.write_text(json.dumps([asdict(r) for r in results]))
    tmp.replace(state)
    print(f"{len(changed)} line(s) changed; {'mailed ' + config['alert_email'] if changed else 'nothing mailed'}")
    return exit_code(results)


def main(argv: Sequence[str]) -> int:
    command = argv[0] if argv else "show"
    config = json.loads(CONFIG.read_text())
    if command == "server":
        results = server_checks(config)
        try:
            sample = dkim_signed_sample(config)
        except Exception as exc:  # the operator's side says the probe is missing, and why
            sample = f"error: {exc.__class__.__name__}: {exc}"
        answer = {
            "results": [asdict(r) for r in results],
            "dkim_public_key": dkim_public_key(config["dkim_key"]),
            "dkim_signed": sample,
        }
        print(json.dumps(answer))
        return 0
    if command == "daily":
        return daily(config)
    if command == "show":
        results = server_checks(config) + dns_side(config, resolver_for(None))
        print(report(results), end="")
        return exit_code(results)
    print(f"usage: {Path(sys.argv[0]).name} server|daily|show", file=sys.stderr)
    return 64


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
