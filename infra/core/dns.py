"""Every DNS record the mail domain needs, computed once, from settings and deploy-time facts.

`records(settings, facts)` is the one list. It becomes Cloudflare records (infra.cloud.zone), the
BIND zone file (`python -m infra zone`) and the lab's DNS server. Which records exist depends
only on the settings; the facts (addresses, keys, SES tokens) only fill in values, so the
Cloudflare resources can be declared before the facts are known.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from infra.core.facts import IMAPS_PORT, SUBMISSION_PORT, SUBMISSIONS_PORT
from infra.core.settings import MtaStsMode, Relay, Settings

TXT_CHUNK = 255
# RFC 6186 §3.4 SRV records saying a service is not offered (target "."). Kept in the BIND export,
# not declared to Cloudflare: its API has answered such a record's target as `false` rather than
# a string (github.com/StackExchange/dnscontrol/issues/561), refused an empty one
# (github.com/octodns/octodns/issues/640), and the provider's v5 line (pulumi-cloudflare 6.x) has
# shown SRV `data` drifting on every plan (github.com/cloudflare/terraform-provider-cloudflare/
# issues/5405 and /5383). A diff on every `pulumi up`, or a refused create, costs more than the
# hint is worth: clients that find no _imap or _pop3 SRV try the ones that are there.
NOT_OFFERED = ("imap", "pop3", "pop3s")
# Host addresses change when the droplet is replaced: keep their TTL short.
TTL_ADDRESS = 300
TTL_DEFAULT = 3600
MX_PRIORITY = 10
MAIL_FROM_LABEL = "bounce"
SES_DKIM_TOKENS = 3

# The relay's SPF mechanism, published in the domain's SPF next to the server's own mx.
RELAY_SPF: dict[Relay, str] = {
    Relay.SES: "include:amazonses.com",
    Relay.SMTP2GO: "include:spf.smtp2go.com",
    Relay.DIRECT: "",
}
# MTA-STS max_age by mode: short while testing, a week once enforced (RFC 8461 §3.2).
MTA_STS_MAX_AGE: dict[MtaStsMode, int] = {
    MtaStsMode.NONE: 86400,
    MtaStsMode.TESTING: 86400,
    MtaStsMode.ENFORCE: 604800,
}


@dataclass(frozen=True)
class Facts:
    """What is only known at deploy time."""

    ipv4: str
    ipv6: str
    dkim_public_key: str  # base64 body of the DKIM public key (the p= value)
    ses_dkim_tokens: tuple[str, ...] = ()

    @classmethod
    def placeholder(cls, settings: Settings) -> Facts:
        """Stand-in facts with the right shape, to learn which records exist."""
        tokens = tuple(f"token{i}" for i in range(SES_DKIM_TOKENS)) if settings.relay is Relay.SES else ()
        return cls("0.0.0.0", "::", "AAAA", tokens)  # noqa: S104 - an address value, not a bind


@dataclass(frozen=True)
class Record:
    """One DNS record. `key` names it stably (a resource name); `name` is the full owner name."""

    key: str
    type: str
    name: str
    value: str  # address, target host, text (unquoted) or CAA value
    ttl: int = TTL_DEFAULT
    priority: int | None = None  # MX, SRV
    weight: int | None = None  # SRV
    port: int | None = None  # SRV
    flags: int | None = None  # CAA
    tag: str | None = None  # CAA
    # False: in the BIND export only, never declared to Cloudflare nor expected by the status check
    # (see NOT_OFFERED).
    hosted: bool = True

    def txt_strings(self) -> tuple[str, ...]:
        """The TXT value split into character-strings of at most 255 bytes (RFC 1035 §3.3)."""
        data = self.value.encode()
        return tuple(data[i : i + TXT_CHUNK].decode() for i in range(0, max(len(data), 1), TXT_CHUNK))

    def rdata(self) -> str:
        """The record data in zone-file presentation form."""
        if self.type == "TXT":
            return " ".join('"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"' for s in self.txt_strings())
        if self.type == "MX":
            return f"{self.priority} {_absolute(self.value)}"
        if self.type == "SRV":
            return f"{self.priority} {self.weight} {self.port} {_absolute(self.value)}"
        if self.type == "CAA":
            return f'{self.flags} {self.tag} "{self.value}"'
        if self.type == "CNAME":
            return _absolute(self.value)
        return self.value


def _absolute(host: str) -> str:
    return host if host.endswith(".") else host + "."


def mta_sts_policy(settings: Settings) -> str:
    """The policy served at https://mta-sts.DOMAIN/.well-known/mta-sts.txt (RFC 8461 §3.2)."""
    return (
        "version: STSv1\n"
        f"mode: {settings.mta_sts_mode.value}\n"
        f"mx: {settings.host_name}\n"
        f"max_age: {MTA_STS_MAX_AGE[settings.mta_sts_mode]}\n"
    )


def mta_sts_id(settings: Settings) -> str:
    """The policy id: it changes exactly when the policy text changes."""
    return hashlib.sha256(mta_sts_policy(settings).encode()).hexdigest()[:20]


def spf(settings: Settings) -> str:
    mechanisms = ["v=spf1", "mx", RELAY_SPF[settings.relay], "~all"]
    return " ".join(m for m in mechanisms if m)


def dmarc(settings: Settings) -> str:
    return (
        f"v=DMARC1; p={settings.dmarc_policy.value}; rua=mailto:{settings.dmarc_report_address}; adkim=r; aspf=r; fo=1"
    )


def dkim(public_key: str) -> str:
    return f"v=DKIM1; k=rsa; p={public_key}"


def records(settings: Settings, facts: Facts) -> list[Record]:
    """Every record of the mail domain, in a stable order."""
    d, host = settings.domain, settings.host_name
    out = [
        Record("host-a", "A", host, facts.ipv4, TTL_ADDRESS),
        Record("host-aaaa", "AAAA", host, facts.ipv6, TTL_ADDRESS),
        Record("mx", "MX", d, host, priority=MX_PRIORITY),
        Record("spf", "TXT", d, spf(settings)),
        Record("dkim", "TXT", f"{settings.dkim_selector}._domainkey.{d}", dkim(facts.dkim_public_key)),
        Record("dmarc", "TXT", f"_dmarc.{d}", dmarc(settings)),
        Record("mta-sts-policy", "TXT", f"_mta-sts.{d}", f"v=STSv1; id={mta_sts_id(settings)}"),
        Record("mta-sts-host", "CNAME", f"mta-sts.{d}", host),
        Record("tls-rpt", "TXT", f"_smtp._tls.{d}", f"v=TLSRPTv1; rua=mailto:{settings.tls_rpt_address}"),
        # RFC 6186 / RFC 8314: clients find submission and IMAP by SRV; "." means not offered.
        Record("srv-submission", "SRV", f"_submission._tcp.{d}", host, priority=0, weight=1, port=SUBMISSION_PORT),
        Record("srv-submissions", "SRV", f"_submissions._tcp.{d}", host, priority=0, weight=1, port=SUBMISSIONS_PORT),
        Record("srv-imaps", "SRV", f"_imaps._tcp.{d}", host, priority=0, weight=1, port=IMAPS_PORT),
        *(
            Record(f"srv-{service}", "SRV", f"_{service}._tcp.{d}", ".", priority=0, weight=0, port=0, hosted=False)
            for service in NOT_OFFERED
        ),
        Record("autoconfig", "CNAME", f"autoconfig.{d}", host),
        Record("autodiscover", "CNAME", f"autodiscover.{d}", host),
        Record("caa-issue", "CAA", d, settings.caa_issuer, flags=0, tag="issue"),
        Record("caa-issuewild", "CAA", d, ";", flags=0, tag="issuewild"),
        Record("caa-iodef", "CAA", d, f"mailto:{settings.alert_email}", flags=0, tag="iodef"),
    ]
    if settings.relay is Relay.SES:
        out += _ses_records(settings, facts.ses_dkim_tokens)
    return out


def _ses_records(settings: Settings, tokens: Sequence[str]) -> list[Record]:
    d = settings.domain
    mail_from = f"{MAIL_FROM_LABEL}.{d}"
    out = [
        Record(f"ses-dkim-{i}", "CNAME", f"{token}._domainkey.{d}", f"{token}.dkim.amazonses.com")
        for i, token in enumerate(tokens)
    ]
    out += [
        Record(
            "ses-mail-from-mx",
            "MX",
            mail_from,
            f"feedback-smtp.{settings.ses_region}.amazonses.com",
            priority=MX_PRIORITY,
        ),
        Record("ses-mail-from-spf", "TXT", mail_from, "v=spf1 include:amazonses.com ~all"),
    ]
    return out


def zone_file(settings: Settings, facts: Facts) -> str:
    """The records as a BIND zone file fragment, for DNS hosted somewhere else than Cloudflare
    (the not-offered SRV records included: a zone file states them plainly)."""
    lines = [
        f"; mailroom records for {settings.domain}",
        f"$ORIGIN {settings.domain}.",
    ]
    for r in records(settings, facts):
        lines.append(f"{_absolute(r.name)}\t{r.ttl}\tIN\t{r.type}\t{r.rdata()}")
    return "\n".join(lines) + "\n"


def dkim_public_key_body(public_key_pem: str) -> str:
    """The p= value: the PEM body of the public key, base64 without header lines or breaks."""
    return "".join(
        line.strip() for line in public_key_pem.splitlines() if line.strip() and not line.startswith("-----")
    )
