"""The stack settings: parsed from plain data into frozen, typed objects, or refused.

`parse_settings` is pure: a mapping of setting name to value in, `Settings` out, or one
`SettingsError` that lists every problem, each naming the key, the value and what is accepted.
Secret values are wrapped in `Secret` and never appear in an error message or a repr.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import yaml

from infra.core.facts import PROJECT_FILE


class Relay(StrEnum):
    SES = "ses"
    SMTP2GO = "smtp2go"
    DIRECT = "direct"


class SpamFilter(StrEnum):
    SPAMASSASSIN = "spamassassin"
    RSPAMD = "rspamd"


class Image(StrEnum):
    UBUNTU_24_04 = "ubuntu-24-04-x64"
    DEBIAN_12 = "debian-12-x64"


class BackupPlan(StrEnum):
    WEEKLY = "weekly"
    DAILY = "daily"


class BackupTarget(StrEnum):
    """Where the off-site backup of the mail goes (not the droplet backups of `BackupPlan`)."""

    S3 = "s3"
    SPACES = "spaces"
    NONE = "none"


class DmarcPolicy(StrEnum):
    NONE = "none"
    QUARANTINE = "quarantine"
    REJECT = "reject"


class MtaStsMode(StrEnum):
    NONE = "none"
    TESTING = "testing"
    ENFORCE = "enforce"


# DigitalOcean regions that offer both droplets and block storage volumes.
REGIONS = frozenset({"nyc1", "nyc3", "sfo2", "sfo3", "tor1", "ams3", "fra1", "lon1", "sgp1", "blr1", "syd1", "atl1"})

# Shared-CPU droplet sizes, in MB of memory. The stack needs 1 GB; smaller sizes are refused.
DROPLET_MEMORY_MB: Mapping[str, int] = {
    "s-1vcpu-512mb-10gb": 512,
    "s-1vcpu-1gb": 1024,
    "s-1vcpu-1gb-amd": 1024,
    "s-1vcpu-1gb-intel": 1024,
    "s-1vcpu-2gb": 2048,
    "s-1vcpu-2gb-amd": 2048,
    "s-1vcpu-2gb-intel": 2048,
    "s-2vcpu-2gb": 2048,
    "s-2vcpu-2gb-amd": 2048,
    "s-2vcpu-2gb-intel": 2048,
    "s-2vcpu-4gb": 4096,
    "s-2vcpu-4gb-amd": 4096,
    "s-2vcpu-4gb-intel": 4096,
    "s-4vcpu-8gb": 8192,
    "s-4vcpu-8gb-amd": 8192,
    "s-4vcpu-8gb-intel": 8192,
    "s-8vcpu-16gb": 16384,
}
MIN_MEMORY_MB = 1024

# AWS regions with an SES SMTP endpoint (email-smtp.REGION.amazonaws.com).
SES_REGIONS = frozenset(
    {
        "us-east-1", "us-east-2", "us-west-1", "us-west-2", "ca-central-1", "sa-east-1",
        "af-south-1", "ap-south-1", "ap-south-2", "ap-northeast-1", "ap-northeast-2",
        "ap-northeast-3", "ap-southeast-1", "ap-southeast-2", "ap-southeast-3", "eu-central-1",
        "eu-central-2", "eu-west-1", "eu-west-2", "eu-west-3", "eu-south-1", "eu-north-1",
        "il-central-1", "me-central-1", "me-south-1", "us-gov-east-1", "us-gov-west-1",
    }
)  # fmt: skip

# DigitalOcean regions with Spaces (Standard Storage): docs.digitalocean.com/products/spaces/details/availability/
# (generated 23 Mar 2026). NYC1, NYC2 and RIC1 have none.
SPACES_REGIONS = frozenset({"nyc3", "ams3", "sfo2", "sfo3", "sgp1", "lon1", "fra1", "tor1", "blr1", "syd1", "atl1"})
# An AWS region name of the standard and GovCloud partitions (S3 at s3.REGION.amazonaws.com, ARNs
# arn:aws:...); China's (cn-north-1, .amazonaws.com.cn, arn:aws-cn) is not accepted.
AWS_REGION_RE = re.compile(
    r"^(us|ca|mx|sa|eu|af|me|il|ap)(-gov)?-(north|south|east|west|central|northeast|northwest|southeast|southwest)-[1-9]$"
)
# S3 bucket names (docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html): 3 to 63
# lower case letters, digits, hyphens and dots, starting and ending with a letter or digit, some
# prefixes and suffixes reserved. Dots are refused too: a dotted name breaks TLS to the
# virtual-hosted endpoint (BUCKET.s3.REGION.amazonaws.com). Spaces names follow the same rules.
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
BUCKET_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
BUCKET_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", "--x-s3", "--table-s3")
BUCKET_SUFFIX = "-mail-backup"
BUCKET_NAME_LIMIT = 63
BACKUP_HOUR_RANGE = (0, 23)
BACKUP_KEEP_RANGE = (1, 1000)

# Hash schemes Dovecot verifies; a value without one of these prefixes is taken for plaintext.
PASSWORD_SCHEMES: Mapping[str, str] = {
    "{BLF-CRYPT}": "$2",
    "{ARGON2ID}": "$argon2id$",
    "{ARGON2I}": "$argon2i$",
    "{SHA512-CRYPT}": "$6$",
    "{SHA256-CRYPT}": "$5$",
}

DEFAULT_QUOTA_MB = 1024
VOLUME_GB_RANGE = (1, 16384)
MESSAGE_MB_RANGE = (1, 100)
ADMIN_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
# A DNS label (RFC 1035 letters-digits-hyphen form, as used in host names and selectors).
LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# Local parts as mail providers hand them out: letters, digits and . _ % + = -. RFC 5322 allows
# more (` $ ' | ...), which a shell or a config file would read as syntax; none is accepted.
LOCAL_PART_RE = re.compile(r"^[a-z0-9_%+=-]+(\.[a-z0-9_%+=-]+)*$")
SSH_KEY_RE = re.compile(
    r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com"
    r"|sk-ecdsa-sha2-nistp256@openssh\.com) [A-Za-z0-9+/]{40,}={0,3}( \S.*)?$"
)
QUOTA_RE = re.compile(r"^(\d+)([MG])$")


@dataclass(frozen=True)
class Secret:
    """A secret value: it shows as ******** in reprs, messages and plans; `reveal()` reads it."""

    _value: str = field(repr=False)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(********)"

    def __str__(self) -> str:
        return "********"

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True)
class Mailbox:
    address: str
    password_hash: Secret
    quota_mb: int
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Alias:
    source: str
    targets: tuple[str, ...]


@dataclass(frozen=True)
class Settings:
    domain: str
    host_name: str
    region: str
    droplet_size: str
    image: Image
    admin_user: str
    ssh_public_keys: tuple[str, ...]
    admin_cidrs: tuple[str, ...]
    allow_ssh_from_anywhere: bool
    volume_size_gb: int
    backups: bool  # DigitalOcean droplet backups (the droplet's disk, not the mail volume)
    backup_plan: BackupPlan
    backup_target: BackupTarget  # the mail's off-site backup
    backup_bucket: str
    backup_region: str
    backup_hour: int  # UTC
    backup_keep_daily: int
    backup_keep_weekly: int
    backup_keep_monthly: int
    relay: Relay
    ses_region: str
    smtp2go_username: str
    smtp2go_password: Secret
    spam_filter: SpamFilter
    webmail: bool
    dkim_selector: str
    dmarc_policy: DmarcPolicy
    dmarc_report_address: str
    mta_sts_mode: MtaStsMode
    tls_rpt_address: str
    acme_server: str  # the ACME directory URL certbot uses
    caa_issuer: str  # the CA's domain in the CAA record
    alert_email: str
    do_alert_email: str  # empty: the DigitalOcean account's own address
    mailboxes: tuple[Mailbox, ...]
    aliases: tuple[Alias, ...]
    message_size_limit_mb: int
    spamhaus_dqs_key: Secret

    @property
    def host_label(self) -> str:
        """The host name relative to the domain (mail for mail.example.org)."""
        return self.host_name.removesuffix("." + self.domain)

    @property
    def volume_name(self) -> str:
        """DigitalOcean volume name; the volume appears at /dev/disk/by-id/scsi-0DO_Volume_<name>."""
        return "mail-" + self.domain.replace(".", "-")[:58]


class SettingsError(ValueError):
    """Every problem found in a set of stack settings, each a line naming key, value and remedy."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{len(problems)} {noun} in the stack settings:\n{lines}")


@dataclass(frozen=True)
class SettingSpec:
    """One setting as Pulumi.yaml declares it."""

    name: str
    type: str
    description: str
    secret: bool = False
    default: Any = None
    required: bool = True


def load_schema(project_file: Path = PROJECT_FILE) -> dict[str, SettingSpec]:
    """The settings declared in Pulumi.yaml's config: block (the one place they are declared)."""
    project = yaml.safe_load(project_file.read_text())
    specs = {}
    for name, decl in project["config"].items():
        specs[name] = SettingSpec(
            name=name,
            type=decl["type"],
            description=decl.get("description", ""),
            secret=decl.get("description", "").startswith("Secret:"),
            default=decl.get("default"),
            required="default" not in decl,
        )
    return specs


def _closest(name: str, candidates: Iterable[str]) -> str:
    import difflib

    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    if not match:
        match = [c for c in candidates if c.lower() == name.lower()]
    return f"; did you mean {match[0]!r}?" if match else ""


def _show(spec: SettingSpec | None, value: Any) -> str:
    return "(secret, not shown)" if spec is not None and spec.secret else repr(value)


def is_domain_name(name: str) -> bool:
    labels = name.split(".")
    return (
        len(name) <= 253
        and len(labels) >= 2
        and all(LABEL_RE.match(label) for label in labels)
        and not labels[-1].isdigit()
    )


def _address_parts(address: str) -> tuple[str, str] | None:
    local, sep, domain = address.rpartition("@")
    if not sep or not LOCAL_PART_RE.match(local) or not is_domain_name(domain):
        return None
    return local, domain


T = TypeVar("T", bound=StrEnum)


class _Parser:
    """Collects problems while reading values, so that one error can list them all."""

    def __init__(self, raw: Mapping[str, Any], schema: Mapping[str, SettingSpec]) -> None:
        self.raw = raw
        self.schema = schema
        self.problems: list[str] = []

    def problem(self, key: str, value: Any, accepted: str) -> None:
        self.problems.append(f"{key}: {_show(self.schema.get(key), value)} is {accepted}")

    def value(self, key: str) -> Any:
        spec = self.schema[key]
        value = self.raw.get(key, spec.default)
        if value is None:
            self.problems.append(f"{key}: missing; {spec.description}")
            return None
        expected: dict[str, type | tuple[type, ...]] = {
            "string": str,
            "integer": int,
            "boolean": bool,
            "array": list,
        }
        kind = expected[spec.type]
        if (spec.type == "integer" and isinstance(value, bool)) or not isinstance(value, kind):
            self.problem(key, value, f"not a{'n' if spec.type[0] in 'ai' else ''} {spec.type}")
            return None
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            self.problem(key, value, "not a list of strings")
            return None
        return value

    def string(self, key: str) -> str:
        value = self.value(key)
        return value.strip() if isinstance(value, str) else ""

    def strings(self, key: str) -> list[str]:
        value = self.value(key)
        return [v.strip() for v in value] if isinstance(value, list) else []

    def integer(self, key: str, low: int, high: int) -> int:
        value = self.value(key)
        if isinstance(value, int) and not low <= value <= high:
            self.problem(key, value, f"out of range; accepted: {low} to {high}")
        return value if isinstance(value, int) else low

    def boolean(self, key: str) -> bool:
        return bool(self.value(key))

    def choice(self, key: str, enum: type[T]) -> T:
        value = self.string(key)
        try:
            return enum(value)
        except ValueError:
            accepted = ", ".join(m.value for m in enum)
            if key in self.raw or self.schema[key].default is not None:
                self.problem(key, value, f"not accepted; accepted: {accepted}")
            return next(iter(enum))

    def one_of(self, key: str, allowed: Iterable[str], what: str) -> str:
        value = self.string(key)
        if value and value not in allowed:
            self.problem(key, value, f"not {what}; accepted: {', '.join(sorted(allowed))}")
        return value

    def address(
        self, key: str, value: str, *, in_domain: str | None = None, outside: str = "outside the mail domain"
    ) -> str:
        parts = _address_parts(value.lower())
        if parts is None:
            self.problem(
                key, value, "not an e-mail address mailroom accepts (local@domain.tld; letters, digits, . _ % + = -)"
            )
        elif in_domain is not None and parts[1] != in_domain:
            self.problem(key, value, f"{outside}; accepted: addresses @{in_domain}")
        return value.lower()


def _check_items(parser: _Parser, key: str, items: list[str], check: Callable[[str], str | None]) -> None:
    for i, item in enumerate(items):
        reason = check(item)
        if reason:
            parser.problem(f"{key}[{i}]", item, reason)


def _ssh_key_problem(key: str) -> str | None:
    if SSH_KEY_RE.match(key):
        return None
    return "not an OpenSSH public key; accepted: one line like 'ssh-ed25519 AAAA... comment'"


def _parse_cidrs(p: _Parser) -> tuple[str, ...]:
    allow_world = p.boolean("allowSshFromAnywhere")
    cidrs = p.strings("adminCidrs")
    if "adminCidrs" in p.raw and not cidrs:
        p.problem("adminCidrs", cidrs, "empty; SSH would be unreachable. Add your network, e.g. 198.51.100.7/32")
    out = []
    for i, text in enumerate(cidrs):
        key = f"adminCidrs[{i}]"
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            why = "a host address with a prefix" if "host bits" in str(exc) else "not a network"
            p.problem(key, text, f"{why}; accepted: a CIDR network such as 198.51.100.0/24 or 2001:db8::/48")
            continue
        if net.prefixlen == 0 and not allow_world:
            p.problem(
                key, text,
                "open to the whole internet; accepted: a narrower network, or set "
                "allowSshFromAnywhere: true to opt in",
            )  # fmt: skip
        out.append(str(net))
    return tuple(out)


def _parse_quota(text: str) -> int | None:
    m = QUOTA_RE.match(text.upper())
    if not m:
        return None
    number = int(m.group(1))
    return number * 1024 if m.group(2) == "G" else number


# bcrypt's cost is log2 of its rounds; Dovecot's default (5) takes a GPU microseconds per guess.
MIN_BCRYPT_COST = 10
BCRYPT_COST_RE = re.compile(r"^\$2[abxy]\$(\d\d)\$")


def _parse_password_hashes(p: _Parser) -> dict[str, Secret]:
    hashes: dict[str, Secret] = {}
    for i, line in enumerate(p.strings("passwordHashes")):
        key = f"passwordHashes[{i}]"
        address, _, value = line.partition(" ")
        value = value.strip()
        address = address.lower()
        if _address_parts(address) is None or not value:
            p.problems.append(
                f"{key}: (secret, not shown) is not 'ADDRESS HASH'; "
                "accepted: e.g. 'alice@example.org {BLF-CRYPT}$2y$10$...'"
            )
            continue
        scheme = next((s for s in PASSWORD_SCHEMES if value.startswith(s)), None)
        if scheme is None:
            bare = next((s for s, start in PASSWORD_SCHEMES.items() if value.startswith(start)), None)
            if bare is not None:
                # A crypt hash without Dovecot's {SCHEME} prefix: add the prefix it implies.
                scheme, value = bare, bare + value
        if scheme is None or not value.removeprefix(scheme).startswith(PASSWORD_SCHEMES[scheme]):
            p.problems.append(
                f"{key}: the value for {address} (secret, not shown) is not a password hash, it "
                "looks like plaintext; accepted: a Dovecot hash such as {BLF-CRYPT}$2y$..., "
                "{ARGON2ID}$argon2id$... or {SHA512-CRYPT}$6$... (make one with: doveadm pw -s BLF-CRYPT -r 10)"
            )
            continue
        cost = BCRYPT_COST_RE.match(value.removeprefix(scheme)) if scheme == "{BLF-CRYPT}" else None
        if cost is not None and int(cost[1]) < MIN_BCRYPT_COST:
            p.problems.append(
                f"{key}: the bcrypt hash for {address} (secret, not shown) has cost {cost[1]}, which a "
                f"stolen file gives up quickly; accepted: cost {MIN_BCRYPT_COST} or more "
                f"(make one with: doveadm pw -s BLF-CRYPT -r {MIN_BCRYPT_COST})"
            )
            continue
        hashes[address] = Secret(value)
    return hashes


def _parse_mailboxes(p: _Parser, domain: str, hashes: Mapping[str, Secret]) -> tuple[Mailbox, ...]:
    lines = p.strings("mailboxes")
    if "mailboxes" in p.raw and not lines:
        p.problem("mailboxes", lines, "empty; accepted: at least one mailbox, e.g. 'alice@example.org'")
    mailboxes: list[Mailbox] = []
    for i, line in enumerate(lines):
        key = f"mailboxes[{i}]"
        address, *options = line.split()
        address = p.address(key, address, in_domain=domain)
        quota = DEFAULT_QUOTA_MB
        aliases: tuple[str, ...] = ()
        for option in options:
            name, _, value = option.partition("=")
            if name == "quota" and _parse_quota(value) is not None:
                quota = _parse_quota(value) or 0
                if quota == 0:
                    p.problem(key, option, "a zero quota; accepted: a size such as 500M or 2G")
            elif name == "aliases" and value:
                aliases = tuple(p.address(key, a, in_domain=domain) for a in value.split(","))
            else:
                p.problem(key, option, "not a mailbox option; accepted: quota=SIZE (e.g. 2G, 500M), aliases=A,B")
        if address not in hashes and not [q for q in p.problems if q.startswith("passwordHashes")]:
            p.problems.append(
                f"{key}: {address} has no password hash; set one with: pulumi config set --secret "
                f"--path 'passwordHashes[{i}]' '{address} {{BLF-CRYPT}}...'"
            )
        mailboxes.append(Mailbox(address, hashes.get(address, Secret("")), quota, aliases))
    seen: set[str] = set()
    for box in mailboxes:
        if box.address in seen:
            p.problem("mailboxes", box.address, "listed twice; accepted: each address once")
        seen.add(box.address)
    for address in set(hashes) - seen:
        p.problems.append(f"passwordHashes: {address} is not a mailbox; accepted: addresses listed in mailboxes")
    return tuple(mailboxes)


# Why an alias cannot point outside the domain: a forwarded message keeps its sender's From, which
# no relay carries honestly (SES and SMTP2GO refuse a From not of this domain; sent directly it
# fails the sender's SPF), and each refusal would bounce to a sender who, for spam, is forged.
FORWARDING_REFUSED = (
    "outside the mail domain: forwarded mail keeps its sender's From, which the relay refuses (SES, SMTP2GO) "
    "or the receiver's SPF check fails (direct), and each refusal would bounce to a sender who is often forged; "
    "to read this mail elsewhere, have that provider fetch it over IMAP"
)


def _parse_aliases(p: _Parser, domain: str, mailboxes: tuple[Mailbox, ...]) -> tuple[Alias, ...]:
    aliases: list[Alias] = []
    for i, line in enumerate(p.strings("aliases")):
        key = f"aliases[{i}]"
        source, sep, targets = line.partition(":")
        if not sep or not targets.strip():
            p.problem(
                key, line, "not 'SOURCE: TARGET[, TARGET]'; accepted: e.g. 'sales@example.org: alice@example.org'"
            )
            continue
        aliases.append(
            Alias(
                p.address(key, source.strip(), in_domain=domain),
                tuple(
                    p.address(key, t.strip(), in_domain=domain, outside=FORWARDING_REFUSED) for t in targets.split(",")
                ),
            )
        )
    for box in mailboxes:
        aliases.extend(Alias(a, (box.address,)) for a in box.aliases)
    boxes = {b.address for b in mailboxes}
    sources: set[str] = set()
    for alias in aliases:
        if alias.source in boxes:
            p.problem("aliases", alias.source, "both a mailbox and an alias; accepted: one or the other")
        if alias.source in sources:
            p.problem(
                "aliases", alias.source, "an alias defined twice; accepted: one line per alias, with several targets"
            )
        sources.add(alias.source)
    return tuple(aliases)


def _default_aliases(
    settings_aliases: tuple[Alias, ...], boxes: tuple[Mailbox, ...], extra: Iterable[str]
) -> tuple[Alias, ...]:
    """postmaster@, abuse@ (RFC 2142) and the report addresses, pointing at the first mailbox."""
    if not boxes:
        return settings_aliases
    taken = {a.source for a in settings_aliases} | {b.address for b in boxes}
    domain = boxes[0].address.rpartition("@")[2]
    wanted = [f"postmaster@{domain}", f"abuse@{domain}", *extra]
    added = tuple(
        Alias(a, (boxes[0].address,)) for a in dict.fromkeys(wanted) if a not in taken and a.endswith("@" + domain)
    )
    return settings_aliases + added


ACME_SERVERS = {
    "letsencrypt": "https://acme-v02.api.letsencrypt.org/directory",
    "letsencrypt-staging": "https://acme-staging-v02.api.letsencrypt.org/directory",
}
# An https URL with nothing a shell would read (it is a certbot argument in a script).
ACME_URL_RE = re.compile(r"^https://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?$")


def _parse_acme_server(p: _Parser) -> str:
    value = p.string("acmeServer")
    if value in ACME_SERVERS:
        return ACME_SERVERS[value]
    host = value.removeprefix("https://").split("/")[0].split(":")[0]
    if not (ACME_URL_RE.match(value) and is_domain_name(host)):
        accepted = ", ".join(ACME_SERVERS)
        p.problem("acmeServer", value, f"not accepted; accepted: {accepted} or an https:// ACME directory URL")
    return value


def _parse_caa_issuer(p: _Parser, acme_server: str) -> str:
    value = p.string("caaIssuer").lower()
    if not value:
        if acme_server not in ACME_SERVERS.values():
            p.problems.append(
                "caaIssuer: missing; acmeServer names a CA other than Let's Encrypt, whose CAA record would refuse "
                "it: set caaIssuer to that CA's CAA domain (e.g. sectigo.com)"
            )
        return "letsencrypt.org"
    if not is_domain_name(value):
        p.problem("caaIssuer", value, "not a domain name; accepted: the CA's CAA domain, e.g. letsencrypt.org")
    return value


def _check_keys(p: _Parser, encrypted: Iterable[str] | None) -> None:
    """Every key is a mailroom setting, and (when the engine says which are) every secret is encrypted."""
    for key in p.raw:
        if key not in p.schema:
            p.problems.append(
                f"{key}: not a mailroom setting{_closest(key, p.schema)} (see Pulumi.yaml for every setting)"
            )
        elif encrypted is not None and p.schema[key].secret and p.raw[key] and key not in set(encrypted):
            p.problems.append(
                f"{key}: stored in plain text in the stack file; set it again with pulumi config set --secret {key}"
            )


@dataclass(frozen=True)
class _HostNames:
    domain: str
    host_name: str


def _host_names(p: _Parser) -> _HostNames:
    domain = p.string("domain").lower().rstrip(".")
    if domain and not is_domain_name(domain):
        p.problem("domain", domain, "not a domain name; accepted: e.g. example.org")
    host = p.string("hostName").lower().rstrip(".")
    if host and not is_domain_name(host):
        p.problem("hostName", host, "not a host name; accepted: e.g. mail.example.org")
    elif host and domain and not host.endswith("." + domain):
        p.problem("hostName", host, f"outside the domain {domain}; accepted: a name under it, e.g. mail.{domain}")
    return _HostNames(domain, host)


@dataclass(frozen=True)
class _Droplet:
    region: str
    size: str
    image: Image


def _droplet(p: _Parser) -> _Droplet:
    region = p.one_of("region", REGIONS, "a DigitalOcean region with volumes")
    size = p.one_of("dropletSize", DROPLET_MEMORY_MB, "a known droplet size")
    if size in DROPLET_MEMORY_MB and DROPLET_MEMORY_MB[size] < MIN_MEMORY_MB:
        p.problem("dropletSize", size, "too small for the mail stack; accepted: 1 GB or more, e.g. s-1vcpu-1gb")
    return _Droplet(region, size, p.choice("image", Image))


@dataclass(frozen=True)
class _Access:
    admin_user: str
    ssh_public_keys: tuple[str, ...]
    admin_cidrs: tuple[str, ...]


def _access(p: _Parser) -> _Access:
    """Who logs in to the server (the admin user and its SSH keys) and from where (the firewall's CIDRs)."""
    admin_user = p.string("adminUser")
    if admin_user and (not ADMIN_USER_RE.match(admin_user) or admin_user == "root"):
        p.problem(
            "adminUser", admin_user, "not a usable login; accepted: lower case letters, digits, - and _, not root"
        )
    ssh_keys = p.strings("sshPublicKeys")
    if "sshPublicKeys" in p.raw and not ssh_keys:
        p.problem("sshPublicKeys", ssh_keys, "empty; the server would be unreachable. Add your OpenSSH public key")
    _check_items(p, "sshPublicKeys", ssh_keys, _ssh_key_problem)
    return _Access(admin_user, tuple(ssh_keys), _parse_cidrs(p))


@dataclass(frozen=True)
class _RelayChoice:
    relay: Relay
    ses_region: str
    smtp2go_username: str
    smtp2go_password: Secret


def _relay(p: _Parser) -> _RelayChoice:
    """How outbound mail leaves, with what the chosen relay needs (its SES region, or SMTP2GO's login)."""
    relay = p.choice("relay", Relay)
    ses_region = p.string("sesRegion")
    if relay is Relay.SES and ses_region not in SES_REGIONS:
        p.problem("sesRegion", ses_region, f"not a region where SES exists; accepted: {', '.join(sorted(SES_REGIONS))}")
    smtp2go_user = p.string("smtp2goUsername")
    smtp2go_password = Secret(p.string("smtp2goPassword"))
    if relay is Relay.SMTP2GO:
        if not smtp2go_user:
            p.problems.append("smtp2goUsername: missing; relay smtp2go needs the SMTP2GO SMTP user name")
        if not smtp2go_password:
            p.problems.append(
                "smtp2goPassword: missing; relay smtp2go needs it: pulumi config set --secret smtp2goPassword"
            )
    return _RelayChoice(relay, ses_region, smtp2go_user, smtp2go_password)


def default_backup_bucket(host_name: str) -> str:
    """<host name, dots as dashes>-mail-backup; a long host name is cut, with a hash, to fit 63."""
    name = host_name.replace(".", "-") + BUCKET_SUFFIX
    if len(name) <= BUCKET_NAME_LIMIT:
        return name
    digest = hashlib.sha256(host_name.encode()).hexdigest()[:8]
    room = BUCKET_NAME_LIMIT - len(BUCKET_SUFFIX) - len(digest) - 1
    return host_name.replace(".", "-")[:room].rstrip("-") + "-" + digest + BUCKET_SUFFIX


def bucket_name_problem(name: str) -> str | None:
    """Why S3 (or Spaces) would refuse NAME as a bucket name, or None."""
    if not BUCKET_RE.match(name):
        return (
            "not a bucket name; accepted: 3 to 63 lower case letters, digits and hyphens, "
            "starting and ending with a letter or digit (no dots)"
        )
    if name.startswith(BUCKET_RESERVED_PREFIXES) or name.endswith(BUCKET_RESERVED_SUFFIXES):
        reserved = ", ".join(
            [*(f"{p}..." for p in BUCKET_RESERVED_PREFIXES), *(f"...{s}" for s in BUCKET_RESERVED_SUFFIXES)]
        )
        return f"a bucket name S3 reserves; accepted: a name without {reserved}"
    return None


@dataclass(frozen=True)
class _Backup:
    target: BackupTarget
    bucket: str
    region: str


def _backup_region(p: _Parser, target: BackupTarget, droplet_region: str, ses_region: str) -> str:
    given = p.string("backupRegion")
    if target is BackupTarget.S3:
        region = given or ses_region
        accepted = "accepted: an AWS region such as us-east-1 or eu-central-1"
        if given and not AWS_REGION_RE.match(given):
            p.problem("backupRegion", given, f"not an AWS region name; {accepted}")
        elif not AWS_REGION_RE.match(region) and not any(q.startswith("sesRegion:") for q in p.problems):
            p.problems.append(
                f"backupRegion: empty means sesRegion, {region!r}, which is not an AWS region name; "
                f"{accepted}, in backupRegion or sesRegion"
            )
        return region
    if target is BackupTarget.SPACES:
        region = given or droplet_region
        if region and region not in SPACES_REGIONS:
            accepted = ", ".join(sorted(SPACES_REGIONS))
            if given:
                p.problem("backupRegion", region, f"not a DigitalOcean region with Spaces; accepted: {accepted}")
            else:
                p.problems.append(
                    f"backupRegion: empty means the droplet's region, {region!r}, which has no Spaces; "
                    f"accepted: set backupRegion to one of {accepted}"
                )
        return region
    return given


def _backup(p: _Parser, host_name: str, droplet_region: str, ses_region: str) -> _Backup:
    """Where the mail's off-site backup goes: the target, its bucket and the bucket's region."""
    target = p.choice("backupTarget", BackupTarget)
    given = p.string("backupBucket")
    bucket = given or (default_backup_bucket(host_name) if host_name else "")
    if target is not BackupTarget.NONE and bucket:
        reason = bucket_name_problem(bucket)
        if reason and given:
            p.problem("backupBucket", bucket, reason)
        elif reason:
            p.problems.append(
                f"backupBucket: empty means {bucket!r} (from hostName), which is {reason.split('; ')[0]}; "
                "accepted: set backupBucket to a name of 3 to 63 lower case letters, digits and hyphens"
            )
    return _Backup(target, bucket, _backup_region(p, target, droplet_region, ses_region))


def _dkim_selector(p: _Parser) -> str:
    selector = p.string("dkimSelector").lower()
    if not LABEL_RE.match(selector):
        p.problem(
            "dkimSelector",
            selector,
            "not a DNS label; accepted: letters, digits and inner hyphens, up to 63, e.g. mail or s2026",
        )
    return selector


@dataclass(frozen=True)
class _ReportAddresses:
    alert_email: str
    do_alert_email: str
    dmarc_report_address: str
    tls_rpt_address: str


def _report_addresses(p: _Parser, domain: str) -> _ReportAddresses:
    """Where alerts and notices go, and the DMARC and TLS report addresses (by default in the domain)."""
    alert = p.address("alertEmail", p.string("alertEmail")) if "alertEmail" in p.raw else p.string("alertEmail")
    dmarc_report = p.address("dmarcReportAddress", p.string("dmarcReportAddress") or f"dmarc-reports@{domain}")
    tls_rpt = p.address("tlsRptAddress", p.string("tlsRptAddress") or f"tls-reports@{domain}")
    do_alert = p.string("doAlertEmail") and p.address("doAlertEmail", p.string("doAlertEmail"))
    return _ReportAddresses(alert, do_alert, dmarc_report, tls_rpt)


def _mailboxes_and_aliases(
    p: _Parser, domain: str, reports: _ReportAddresses
) -> tuple[tuple[Mailbox, ...], tuple[Alias, ...]]:
    """The mailboxes with their password hashes, and every alias: the listed ones, then the defaults."""
    mailboxes = _parse_mailboxes(p, domain, _parse_password_hashes(p))
    aliases = _parse_aliases(p, domain, mailboxes)
    report_aliases = (reports.dmarc_report_address, reports.tls_rpt_address)
    return mailboxes, _default_aliases(aliases, mailboxes, report_aliases)


def parse_settings(
    raw: Mapping[str, Any],
    schema: Mapping[str, SettingSpec] | None = None,
    encrypted: Iterable[str] | None = None,
) -> Settings:
    """Read stack settings (bare keys, e.g. "domain") into `Settings`, or raise `SettingsError`.

    `encrypted` names the keys the stack holds encrypted; when given, a secret setting stored in
    plain text is refused.

    The steps run in a fixed order, and the problems are listed in the order the steps find them;
    the settings that need no check beyond their type are read last, in `Settings`' field order.
    """
    p = _Parser(raw, load_schema() if schema is None else schema)
    _check_keys(p, encrypted)
    names = _host_names(p)
    droplet = _droplet(p)
    access = _access(p)
    relay = _relay(p)
    backup = _backup(p, names.host_name, droplet.region, relay.ses_region)
    dkim_selector = _dkim_selector(p)
    reports = _report_addresses(p, names.domain)
    mailboxes, aliases = _mailboxes_and_aliases(p, names.domain, reports)
    acme_server = _parse_acme_server(p)
    settings = Settings(
        domain=names.domain,
        host_name=names.host_name,
        region=droplet.region,
        droplet_size=droplet.size,
        image=droplet.image,
        admin_user=access.admin_user,
        ssh_public_keys=access.ssh_public_keys,
        admin_cidrs=access.admin_cidrs,
        allow_ssh_from_anywhere=p.boolean("allowSshFromAnywhere"),
        volume_size_gb=p.integer("volumeSizeGb", *VOLUME_GB_RANGE),
        backups=p.boolean("backups"),
        backup_plan=p.choice("backupPlan", BackupPlan),
        backup_target=backup.target,
        backup_bucket=backup.bucket,
        backup_region=backup.region,
        backup_hour=p.integer("backupHour", *BACKUP_HOUR_RANGE),
        backup_keep_daily=p.integer("backupKeepDaily", *BACKUP_KEEP_RANGE),
        backup_keep_weekly=p.integer("backupKeepWeekly", *BACKUP_KEEP_RANGE),
        backup_keep_monthly=p.integer("backupKeepMonthly", *BACKUP_KEEP_RANGE),
        relay=relay.relay,
        ses_region=relay.ses_region,
        smtp2go_username=relay.smtp2go_username,
        smtp2go_password=relay.smtp2go_password,
        spam_filter=p.choice("spamFilter", SpamFilter),
        webmail=p.boolean("webmail"),
        dkim_selector=dkim_selector,
        dmarc_policy=p.choice("dmarcPolicy", DmarcPolicy),
        dmarc_report_address=reports.dmarc_report_address,
        mta_sts_mode=p.choice("mtaStsMode", MtaStsMode),
        tls_rpt_address=reports.tls_rpt_address,
        acme_server=acme_server,
        caa_issuer=_parse_caa_issuer(p, acme_server),
        alert_email=reports.alert_email,
        do_alert_email=reports.do_alert_email,
        mailboxes=mailboxes,
        aliases=aliases,
        message_size_limit_mb=p.integer("messageSizeLimitMb", *MESSAGE_MB_RANGE),
        spamhaus_dqs_key=Secret(p.string("spamhausDqsKey")),
    )
    if p.problems:
        raise SettingsError(p.problems)
    return settings


def decode_config_value(spec: SettingSpec, text: Any) -> Any:
    """A value as Pulumi hands it to a program (a string; JSON for non-strings) to its YAML type."""
    import json

    if spec.type == "string" or not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # left as a string: parse_settings names the key and the expected type
