"""One record per mode: what a spam filter, a relay, webmail or a distribution brings to the server.

A record names its template layers (cloud_init/files/<layer>/), the daemons it adds (each with
its checker and reload), its distribution packages and its secret files. The render
(infra.core.render) composes the chosen records over the common layer; nothing else asks which
mode is chosen. Adding a mode is one record here and one template folder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from infra.core.backup import BACKUP_CONFIG, BACKUP_ENV, BACKUP_PATH
from infra.core.bundle import Service
from infra.core.facts import QUEUE_DIR, SMTP2GO_HOST, ses_smtp_endpoint
from infra.core.settings import BackupTarget, Image, Relay, Settings, SpamFilter

# A script that parses and its settings that are JSON (a bundle's check before anything is installed).
JSON_PROBE = "'import ast, json, sys; ast.parse(open(sys.argv[1]).read()); json.load(open(sys.argv[2]))'"

# Who may read a secret file: (mode, owner, group).
Owner = tuple[int, str, str]


@dataclass(frozen=True)
class Mode:
    """What one choice adds to the common layer."""

    layers: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()
    # Daemons of this mode; a spam filter's reload before Postfix (it is Postfix's milter), the
    # others' after the common ones.
    services: tuple[Service, ...] = ()
    # Destination path -> who may read it, for the files of this mode that hold a secret.
    secret_files: Mapping[str, Owner] = field(default_factory=dict)
    # Answers to its packages' install questions (debconf-set-selections lines), given before
    # any package is installed: a noninteractive install otherwise takes each default.
    debconf: tuple[str, ...] = ()


@dataclass(frozen=True)
class SpamFilterMode(Mode):
    # The server's DKIM private key, where the signer reads it ({selector} filled in).
    dkim_key: str = ""
    # Postfix's milter settings: inbound mail is verified and scanned, submitted mail only signed.
    milters: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RelayMode(Mode):
    # The relay's SMTP host for these settings; empty for direct delivery.
    host: Callable[[Settings], str] = lambda _settings: ""
    # Postfix lookup tables of this mode, built with postmap.
    postfix_maps: tuple[str, ...] = ()


@dataclass(frozen=True)
class Distribution:
    # Where a package's name differs from the one mailroom lists.
    renamed: Mapping[str, str] = field(default_factory=dict)


# Every mode's packages go on top of these.
BASE = (
    "postfix",
    # SASL mechanisms for Postfix's client (AUTH PLAIN/LOGIN to the relay); only recommended by the package.
    "libsasl2-modules",
    "dovecot-core",
    "dovecot-imapd",
    "dovecot-lmtpd",
    "dovecot-sieve",
    "dovecot-managesieved",
    "unbound",
    "nginx",
    "certbot",
    "python3-certbot-dns-cloudflare",
    "fail2ban",
    # fail2ban reads the journal (backend systemd) through it.
    "python3-systemd",
    "nftables",
    "unattended-upgrades",
    # Rotates the mail logs under mailroom's size cap (/etc/logrotate.d/00-mailroom); Ubuntu's
    # images have it, Debian's minimal ones may not.
    "logrotate",
    "ca-certificates",
    "python3",
    # The daily status check's DNS queries and its DKIM probe (/usr/local/lib/mailroom/status.py).
    "python3-dnspython",
    "python3-dkim",
)

# Files of the common layer that hold a secret.
COMMON_SECRET_FILES: Mapping[str, Owner] = {
    # The Spamhaus DQS key, if any: smtpd opens it as root, before it drops privileges.
    "/etc/postfix/dqs_clients": (0o640, "root", "postfix"),
    "/etc/dovecot/users": (0o640, "root", "dovecot"),
    "/etc/letsencrypt/mailroom-cloudflare.ini": (0o600, "root", "root"),
}

SPAMD_USER = "debian-spamd"
# Relative to Postfix's queue directory; each in a directory of its own that only its daemon and
# Postfix's group may enter.
RSPAMD_MILTER = "rspamd/milter.sock"
OPENDKIM_MILTER = "opendkim/opendkim.sock"
OPENDMARC_MILTER = "opendmarc/opendmarc.sock"
SPAMASS_MILTER = "spamass/spamass.sock"


def milter_dir(milter: str) -> str:
    """The directory in Postfix's queue that holds a milter's socket (MILTER: relative to it)."""
    return f"{QUEUE_DIR}/{milter.split('/')[0]}"


def milter_service(
    name: str,
    paths: tuple[str, ...],
    socket: str,
    *,
    owner: str,
    mode: str,
    check: str,
    restart: str,
    units: tuple[str, ...],
) -> Service:
    """A milter's daemon: the directory of its socket (SOCKET: relative to Postfix's queue) made
    first, Postfix's group allowed in; its reload returns only once it answers there."""
    return Service(
        name,
        paths,
        prepare=(f"install -d -o {owner} -g postfix -m {mode} {milter_dir(socket)}",),
        check=(check,),
        reload=f"{restart} && {until_listening(socket)}",
        units=units,
    )


def own_user_milter(name: str, paths: tuple[str, ...], socket: str, check_flags: str) -> Service:
    """A milter packaged as OpenDKIM and OpenDMARC are: its daemon, unit and user all NAME, its
    configuration /etc/NAME.conf (checked by `NAME CHECK_FLAGS` on it), its socket made with
    UMask 007 in a directory setgid postfix, so Postfix's group opens it."""
    return milter_service(
        name,
        paths,
        socket,
        owner=name,
        mode="2750",
        check=f"{name} {check_flags} /etc/{name}.conf",
        restart=f"systemctl restart {name}",
        units=(name,),
    )


def until_listening(milter: str, seconds: int = 30) -> str:
    """A shell command that returns once a milter answers on its socket (MILTER: relative to
    Postfix's queue; a unit's restart returns before its daemon listens): the filter is up before
    Postfix is pointed at it."""
    probe = f"import socket; socket.socket(socket.AF_UNIX).connect('{QUEUE_DIR}/{milter}')"
    return f'timeout {seconds} sh -c "until python3 -c \\"{probe}\\" 2>/dev/null; do sleep 0.2; done"'


# Unix sockets in Postfix's queue directory (reachable from its chroot), not TCP on loopback:
# over TCP, milter commands and delayed ACKs cost ≈ 40 ms per message (bench/README.md).
SPAM_FILTERS: Mapping[SpamFilter, SpamFilterMode] = {
    SpamFilter.SPAMASSASSIN: SpamFilterMode(
        layers=("spamassassin",),
        # SpamAssassin's SPF and DMARC plugins (loaded by default) stay silent without these modules.
        # OpenDMARC applies the sender domain's DMARC policy at SMTP time (SpamAssassin only scores).
        packages=(
            "opendkim",
            "opendkim-tools",
            "opendmarc",
            "spamassassin",
            "spamd",
            "spamass-milter",
            "libmail-spf-perl",
            "libmail-dmarc-perl",
        ),
        services=(
            # A restart on a change: OpenDKIM re-reads its keys on reload and OpenDMARC its
            # configuration on USR1, but neither re-opens its socket.
            own_user_milter("opendkim", ("/etc/opendkim.conf", "/etc/opendkim/"), OPENDKIM_MILTER, "-n -x"),
            own_user_milter("opendmarc", ("/etc/opendmarc.conf",), OPENDMARC_MILTER, "-n -c"),
            Service(
                "spamassassin",
                ("/etc/spamassassin/", "/etc/default/spamd", "/etc/default/spamass-milter"),
                prepare=(f"install -d -o {SPAMD_USER} -g {SPAMD_USER} -m 0770 /var/lib/spamassassin/bayes",),
                check=("spamassassin --lint",),
                # A restart: spamd reads its options (children, --allow-tell) only when it starts.
                reload="systemctl restart spamd spamass-milter && " + until_listening(SPAMASS_MILTER),
                units=("spamd", "spamass-milter"),
            ),
        ),
        secret_files={"/etc/opendkim/keys/{selector}.private": (0o600, "opendkim", "opendkim")},
        dkim_key="/etc/opendkim/keys/{selector}.private",
        milters={
            # OpenDMARC after OpenDKIM, whose Authentication-Results (the DKIM verdict) it reads.
            "smtpd_milters": f"unix:{OPENDKIM_MILTER}, unix:{OPENDMARC_MILTER}, unix:{SPAMASS_MILTER}",
            "non_smtpd_milters": f"unix:{OPENDKIM_MILTER}",
            "submission_milters": f"unix:{OPENDKIM_MILTER}",
        },
    ),
    SpamFilter.RSPAMD: SpamFilterMode(
        layers=("rspamd",),
        packages=("rspamd", "redis-server"),  # rspamd checks SPF, DKIM and DMARC itself
        services=(
            Service(
                "redis",
                ("/etc/systemd/system/redis-server.service.d/",),
                prepare=("systemctl daemon-reload",),
                reload="systemctl restart redis-server",
                units=("redis-server",),
            ),
            milter_service(
                "rspamd",
                ("/etc/rspamd/",),
                RSPAMD_MILTER,
                owner="_rspamd",
                mode="0750",
                check="rspamadm configtest",
                restart="systemctl reload-or-restart rspamd",
                units=("rspamd",),
            ),
        ),
        secret_files={"/etc/rspamd/dkim/{selector}.key": (0o640, "root", "_rspamd")},
        dkim_key="/etc/rspamd/dkim/{selector}.key",
        # rspamd tells authenticated mail apart itself: it signs it and skips the spam checks.
        milters={
            "smtpd_milters": f"unix:{RSPAMD_MILTER}",
            "non_smtpd_milters": f"unix:{RSPAMD_MILTER}",
            "submission_milters": f"unix:{RSPAMD_MILTER}",
        },
    ),
}

# A relay that takes mail with a password: the credentials map Postfix's client reads.
_RELAYED = Mode(layers=("relayed",), secret_files={"/etc/postfix/sasl_passwd": (0o600, "root", "root")})
RELAYS: Mapping[Relay, RelayMode] = {
    Relay.SES: RelayMode(
        layers=("ses", *_RELAYED.layers),
        secret_files=_RELAYED.secret_files,
        host=lambda settings: ses_smtp_endpoint(settings.ses_region),
        postfix_maps=("sasl_passwd",),
    ),
    Relay.SMTP2GO: RelayMode(
        layers=("smtp2go", *_RELAYED.layers),
        secret_files=_RELAYED.secret_files,
        host=lambda _settings: SMTP2GO_HOST,
        postfix_maps=("sasl_passwd",),
    ),
    Relay.DIRECT: RelayMode(
        layers=("direct",),
        # Direct delivery enforces the receiving domains' MTA-STS policies through this daemon.
        packages=("postfix-mta-sts-resolver",),
        services=(
            Service(
                "mta-sts-resolver",
                ("/etc/mta-sts-daemon.yml",),
                check=("python3 -c 'import sys, yaml; yaml.safe_load(open(sys.argv[1]))' /etc/mta-sts-daemon.yml",),
                reload="systemctl restart postfix-mta-sts-resolver",
                units=("postfix-mta-sts-resolver",),
            ),
        ),
    ),
}

WEBMAIL: Mapping[bool, Mode] = {
    True: Mode(
        layers=("webmail",),
        packages=("roundcube-core", "roundcube-sqlite3", "php-fpm"),
        # SQLite, as roundcube-sqlite3 provides: once another package has brought dbconfig-mysql
        # (OpenDMARC does), dbconfig-common's default would be MySQL, which is not installed.
        debconf=("roundcube-core roundcube/database-type select sqlite3",),
        services=(
            Service(
                "roundcube",
                ("/etc/roundcube/",),
                check=("php -l /etc/roundcube/config.inc.php >/dev/null",),
                reload="systemctl reload-or-restart 'php*-fpm.service'",
                # Named by the PHP version (php8.2-fpm on Debian 12): the status check expands it.
                units=("php*-fpm",),
            ),
        ),
        secret_files={"/etc/roundcube/config.inc.php": (0o640, "root", "www-data")},
    ),
    False: Mode(),
}

# The off-site backup, on unless backupTarget is none: restic, its nightly timer and its secrets.
BACKUPS: Mapping[bool, Mode] = {
    True: Mode(
        layers=("backup",),
        packages=("restic",),
        services=(
            Service(
                "backup",
                (BACKUP_PATH, "/etc/mailroom/backup.", "/etc/systemd/system/mailroom-backup."),
                prepare=("systemctl daemon-reload",),
                check=(f"python3 -c {JSON_PROBE} {BACKUP_PATH} {BACKUP_CONFIG}",),
                # A timer, not a daemon: the next run reads the new files.
                reload="systemctl enable --now mailroom-backup.timer",
            ),
        ),
        secret_files={BACKUP_ENV: (0o600, "root", "root")},
    ),
    False: Mode(),
}

# Both images name the packages alike (Ubuntu 24.04 noble and Debian 12 bookworm); an entry in
# `renamed` is where a name differs.
DISTRIBUTIONS: Mapping[Image, Distribution] = {
    Image.UBUNTU_24_04: Distribution(),
    Image.DEBIAN_12: Distribution(),
}


def chosen(settings: Settings) -> tuple[SpamFilterMode, RelayMode, Mode, Mode]:
    """The records the settings pick: spam filter, relay, webmail, backup."""
    backup = BACKUPS[settings.backup_target is not BackupTarget.NONE]
    return SPAM_FILTERS[settings.spam_filter], RELAYS[settings.relay], WEBMAIL[settings.webmail], backup


def packages(settings: Settings) -> tuple[str, ...]:
    spam, relay, webmail, backup = chosen(settings)
    renamed = DISTRIBUTIONS[settings.image].renamed
    picked = BASE + spam.packages + webmail.packages + relay.packages + backup.packages
    return tuple(renamed.get(n, n) for n in picked)


def absent_packages(settings: Settings) -> tuple[str, ...]:
    """The packages of the modes not chosen (SpamAssassin's under rspamd...), unless a chosen one needs them."""
    picked = chosen(settings)
    every: list[Mode] = [*SPAM_FILTERS.values(), *WEBMAIL.values(), *RELAYS.values(), *BACKUPS.values()]
    others = [mode for mode in every if all(mode is not p for p in picked)]
    wanted = packages(settings)
    return tuple(p for mode in others for p in mode.packages if p not in wanted)


def _every_mode() -> tuple[Mode, ...]:
    """Every mode that brings something (the lab's image holds them all: a mode switch finds them)."""
    return (*SPAM_FILTERS.values(), WEBMAIL[True], *RELAYS.values(), BACKUPS[True])


def debconf_selections(settings: Settings | None = None) -> tuple[str, ...]:
    """The install answers of the chosen modes (of every mode without SETTINGS)."""
    modes = chosen(settings) if settings else _every_mode()
    return tuple(line for mode in modes for line in mode.debconf)


def every_package() -> tuple[str, ...]:
    """What any mode may need."""
    return BASE + tuple(p for mode in _every_mode() for p in mode.packages)
