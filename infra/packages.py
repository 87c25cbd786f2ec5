"""The distribution packages each image needs, in one place, by mode."""

from __future__ import annotations

from infra.settings import Image, Relay, Settings, SpamFilter

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
)
SPAM: dict[SpamFilter, tuple[str, ...]] = {
    # SpamAssassin's SPF and DMARC plugins (loaded by default) stay silent without these modules.
    SpamFilter.SPAMASSASSIN: (
        "opendkim",
        "opendkim-tools",
        "spamassassin",
        "spamd",
        "spamass-milter",
        "libmail-spf-perl",
        "libmail-dmarc-perl",
    ),
    SpamFilter.RSPAMD: ("rspamd", "redis-server"),  # rspamd checks SPF, DKIM and DMARC itself
}
WEBMAIL = ("roundcube-core", "roundcube-sqlite3", "php-fpm")
# Direct delivery enforces the receiving domains' MTA-STS policies through this daemon.
DIRECT = ("postfix-mta-sts-resolver",)

# Both images name these packages alike (Ubuntu 24.04 noble and Debian 12 bookworm); an entry
# here is where a name differs.
RENAMED: dict[Image, dict[str, str]] = {
    Image.UBUNTU_24_04: {},
    Image.DEBIAN_12: {},
}


def packages(settings: Settings) -> tuple[str, ...]:
    names = BASE + SPAM[settings.spam_filter] + (WEBMAIL if settings.webmail else ())
    names += DIRECT if settings.relay is Relay.DIRECT else ()
    renamed = RENAMED[settings.image]
    return tuple(renamed.get(n, n) for n in names)
