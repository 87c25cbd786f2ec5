"""The server bundle: every file the server gets, rendered from settings and secrets (pure).

Templates live under cloud_init/files/<layer>/<destination path>.j2. The `common` layer is
always rendered; the spam filter picks the `spamassassin` or `rspamd` layer, webmail adds the
`webmail` layer, and the relay picks its snippet in cloud_init/files/relay/. Choices pick files;
templates only fill in values.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from infra.bootstrap import MAIL_DIR, template_environment
from infra.bundle import Bundle, BundleFile, ServerSecrets, Service
from infra.packages import DIRECT, SPAM, WEBMAIL, packages
from infra.records import mta_sts_policy
from infra.relay import smtp_endpoint
from infra.settings import MESSAGE_MB_RANGE, Relay, Settings, SpamFilter

FILES = Path(__file__).resolve().parent.parent / "cloud_init" / "files"
SMTP2GO_HOST = "mail.smtp2go.com"
SPAMD_USER = "debian-spamd"
# spamd children: each holds ≈ 50 MB; two keep SpamAssassin within a 1 GB droplet.
SPAMD_CHILDREN = 2
REDIS_MAX_MEMORY = "64mb"
# A global logrotate option (a size cap), read before rsyslog's rule for the mail logs: see the file.
LOGROTATE_CAP = "/etc/logrotate.d/00-mailroom"
# Blocklists postscreen scores clients against (weights: a listing of weight 3 is enough).
DNSBL_SITES = ("zen.spamhaus.org=127.0.0.[2..11]*3", "bl.spamcop.net*2", "b.barracudacentral.org=127.0.0.2*2")
DQS_ZONE = "{key}.zen.dq.spamhaus.net"
DQS_FILTER = "=127.0.0.[2..11]*3"
PUBLIC_ZEN = "zen.spamhaus.org"

# Which files are secret, and who may read them (mode, owner, group).
SECRET_FILES: dict[str, tuple[int, str, str]] = {
    "/etc/postfix/sasl_passwd": (0o600, "root", "root"),
    # postscreen opens it as root, before it drops privileges; the group is a safety margin.
    "/etc/postfix/dnsbl_reply_map": (0o640, "root", "postfix"),
    "/etc/dovecot/users": (0o640, "root", "dovecot"),
    "/etc/letsencrypt/mailroom-cloudflare.ini": (0o600, "root", "root"),
    "/etc/opendkim/keys/{selector}.private": (0o600, "opendkim", "opendkim"),
    "/etc/rspamd/dkim/{selector}.key": (0o640, "root", "_rspamd"),
    "/etc/roundcube/config.inc.php": (0o640, "root", "www-data"),
}
# main.cf holds the Spamhaus DQS key (postscreen_dnsbl_sites) when one is set. Postfix's daemons
# read it as root; only local users running sendmail themselves lose it, and they have no mail here.
MAIN_CF_WITH_KEY = ("/etc/postfix/main.cf", (0o640, "root", "postfix"))

POSTFIX_MAPS = ("virtual_mailboxes", "virtual_aliases", "sender_logins")


def layers(settings: Settings) -> tuple[str, ...]:
    chosen: tuple[str, ...] = ("common", settings.spam_filter.value)
    chosen += ("webmail",) if settings.webmail else ()
    return (*chosen, "direct") if settings.relay is Relay.DIRECT else chosen


def relay_host(settings: Settings) -> str:
    hosts = {Relay.SES: smtp_endpoint(settings.ses_region), Relay.SMTP2GO: SMTP2GO_HOST, Relay.DIRECT: ""}
    return hosts[settings.relay]


def sender_logins(settings: Settings) -> list[tuple[str, list[str]]]:
    """A mailbox sends as itself; an alias may be used by the mailboxes it reaches."""
    boxes = {b.address for b in settings.mailboxes}
    logins: dict[str, list[str]] = {b: [b] for b in sorted(boxes)}
    for alias in settings.aliases:
        owners = [t for t in alias.targets if t in boxes]
        if owners:
            logins[alias.source] = owners
    return sorted(logins.items())


# Relative to Postfix's queue directory, /var/spool/postfix; each in a directory of its own that
# only its daemon and Postfix's group may enter.
RSPAMD_MILTER = "rspamd/milter.sock"
OPENDKIM_MILTER = "opendkim/opendkim.sock"
SPAMASS_MILTER = "spamass/spamass.sock"
QUEUE_DIR = "/var/spool/postfix"


def milters(settings: Settings) -> dict[str, str]:
    """Inbound mail is verified and scanned; submitted mail is only signed, never scanned."""
    # Unix sockets in Postfix's queue directory (reachable from its chroot), not TCP on loopback:
    # over TCP, milter commands and delayed ACKs cost ≈ 40 ms per message (bench/README.md).
    if settings.spam_filter is SpamFilter.RSPAMD:
        # rspamd tells authenticated mail apart itself: it signs it and skips the spam checks.
        both = f"unix:{RSPAMD_MILTER}"
        return {"smtpd_milters": both, "non_smtpd_milters": both, "submission_milters": both}
    dkim = f"unix:{OPENDKIM_MILTER}"
    return {
        "smtpd_milters": f"{dkim}, unix:{SPAMASS_MILTER}",
        "non_smtpd_milters": dkim,
        "submission_milters": dkim,
    }


def certificate_names(settings: Settings) -> list[str]:
    return [settings.host_name, f"mta-sts.{settings.domain}", f"autoconfig.{settings.domain}"]


def dnsbl(settings: Settings) -> tuple[list[str], list[tuple[str, str]]]:
    """postscreen's blocklists, and the names it shows instead of those that hold a key."""
    sites = list(DNSBL_SITES)
    shown: list[tuple[str, str]] = []
    if settings.spamhaus_dqs_key:
        # Spamhaus answers DQS queries from any resolver; the public zone is then dropped.
        queried = DQS_ZONE.format(key=settings.spamhaus_dqs_key.reveal())
        sites[0] = queried + DQS_FILTER
        shown.append((queried, PUBLIC_ZEN))
    return sites, shown


def secret_files(settings: Settings) -> dict[str, tuple[int, str, str]]:
    """Destination path -> (mode, owner, group) of every file that holds a secret."""
    paths = {p.format(selector=settings.dkim_selector): v for p, v in SECRET_FILES.items()}
    if settings.spamhaus_dqs_key:
        paths[MAIN_CF_WITH_KEY[0]] = MAIN_CF_WITH_KEY[1]
    return paths


def context(settings: Settings, secrets: ServerSecrets) -> dict[str, Any]:
    names = certificate_names(settings)
    sites, shown = dnsbl(settings)
    return {
        "host_name": settings.host_name,
        "domain": settings.domain,
        "mail_dir": MAIL_DIR,
        "message_size_limit_mb": settings.message_size_limit_mb,
        "message_size_limit_bytes": settings.message_size_limit_mb * 1024 * 1024,
        # Room for one message of the largest size limit the settings allow, or the volume counts as
        # full (a constant: changing the size limit stays a change of main.cf alone).
        "storage_reserve_bytes": MESSAGE_MB_RANGE[1] * 1024 * 1024,
        "mailboxes": settings.mailboxes,
        "aliases": settings.aliases,
        "sender_logins": sender_logins(settings),
        "dnsbl_sites": ", ".join(sites),
        "dnsbl_reply_map": shown,
        "spam_filter": settings.spam_filter.value,
        "relay_snippet": f"relay/{settings.relay.value}.cf.j2",
        "relay_host": relay_host(settings),
        "relay_username": secrets.relay_username,
        "relay_password": secrets.relay_password,
        "dkim_selector": settings.dkim_selector,
        "spamd_user": SPAMD_USER,
        "spamd_children": SPAMD_CHILDREN,
        "redis_max_memory": REDIS_MAX_MEMORY,
        "mta_sts_policy": mta_sts_policy(settings),
        "certbot_token": secrets.certbot_token,
        "certificate_names": names,
        "certificate_san": ",".join(f"DNS:{n}" for n in names),
        "alert_email": settings.alert_email,
        "acme_server": settings.acme_server,
        "webmail_des_key": secrets.webmail_des_key,
        **milters(settings),
        "opendkim_socket": f"{QUEUE_DIR}/{OPENDKIM_MILTER}",
        "rspamd_socket": f"{QUEUE_DIR}/{RSPAMD_MILTER}",
    }


def _templates(settings: Settings) -> Iterator[tuple[str, str]]:
    """(template name, destination path) of every file the settings call for."""
    for layer in layers(settings):
        for template in sorted((FILES / layer).rglob("*.j2")):
            relative = template.relative_to(FILES / layer)
            yield f"{layer}/{relative}", "/" + str(relative.with_suffix(""))
    if settings.relay is not Relay.DIRECT:
        yield "relay/sasl_passwd.j2", "/etc/postfix/sasl_passwd"


def _file(path: str, content: str, settings: Settings) -> BundleFile:
    secret = secret_files(settings)
    if path in secret:
        mode, owner, group = secret[path]
        return BundleFile(path, content, mode, owner, group, secret=True)
    mode = 0o755 if path.endswith(".sh") or path.startswith("/usr/local/sbin/") else 0o644
    return BundleFile(path, content, mode)


# Postfix's policy service deferring inbound mail while the mail volume is full.
STORAGE_POLICY = "/usr/local/sbin/mailroom-storage-policy"


def milter_dir(milter: str) -> str:
    """The directory in Postfix's queue that holds a milter's socket (MILTER: relative to it)."""
    return f"{QUEUE_DIR}/{milter.split('/')[0]}"


def until_listening(milter: str, seconds: int = 30) -> str:
    """A shell command that returns once a milter answers on its socket (MILTER: relative to
    Postfix's queue; a unit's restart returns before its daemon listens): the filter is up before
    Postfix is pointed at it."""
    probe = f"import socket; socket.socket(socket.AF_UNIX).connect('{QUEUE_DIR}/{milter}')"
    return f'timeout {seconds} sh -c "until python3 -c \\"{probe}\\" 2>/dev/null; do sleep 0.2; done"'


def filter_services(settings: Settings) -> list[Service]:
    """The spam filter's daemons (and the DKIM signer beside SpamAssassin)."""
    if settings.spam_filter is SpamFilter.SPAMASSASSIN:
        return [
            Service(
                "opendkim",
                ("/etc/opendkim.conf", "/etc/opendkim/"),
                # setgid postfix: the socket OpenDKIM makes there (UMask 007) is Postfix's group's.
                prepare=(f"install -d -o opendkim -g postfix -m 2750 {milter_dir(OPENDKIM_MILTER)}",),
                check=("opendkim -n -x /etc/opendkim.conf",),
                # A restart: OpenDKIM re-reads keys on reload, but not its socket.
                reload="systemctl restart opendkim && " + until_listening(OPENDKIM_MILTER),
            ),
            Service(
                "spamassassin",
                ("/etc/spamassassin/", "/etc/default/spamd", "/etc/default/spamass-milter"),
                prepare=(f"install -d -o {SPAMD_USER} -g {SPAMD_USER} -m 0770 /var/lib/spamassassin/bayes",),
                check=("spamassassin --lint",),
                # A restart: spamd reads its options (children, --allow-tell) only when it starts.
                reload="systemctl restart spamd spamass-milter && " + until_listening(SPAMASS_MILTER),
            ),
        ]
    return [
        Service(
            "redis",
            ("/etc/systemd/system/redis-server.service.d/",),
            prepare=("systemctl daemon-reload",),
            reload="systemctl restart redis-server",
        ),
        Service(
            "rspamd",
            ("/etc/rspamd/",),
            prepare=(f"install -d -o _rspamd -g postfix -m 0750 {milter_dir(RSPAMD_MILTER)}",),
            check=("rspamadm configtest",),
            reload="systemctl reload-or-restart rspamd && " + until_listening(RSPAMD_MILTER),
        ),
    ]


def services(settings: Settings) -> tuple[Service, ...]:
    """Each daemon with its files, its own checker and how it picks up a change."""
    postmaps = tuple(f"postmap /etc/postfix/{m}" for m in POSTFIX_MAPS)
    if settings.relay is not Relay.DIRECT:
        postmaps += ("postmap /etc/postfix/sasl_passwd",)
    common = [
        Service(
            "tls",
            ("/usr/local/sbin/mailroom-certificate", "/etc/letsencrypt/", "/etc/cron.d/mailroom-certificate"),
            prepare=("/usr/local/sbin/mailroom-certificate",),
        ),
        # The apply script reloads in this order: the spam filter (and its socket) is up on its
        # new files before Postfix's appear, so a switch of filter never leaves Postfix without it.
        *filter_services(settings),
        Service(
            "postfix",
            ("/etc/postfix/", "/etc/aliases", "/etc/mailname", STORAGE_POLICY),
            prepare=(*postmaps, "newaliases"),
            check=("postfix check", f"python3 -m py_compile {STORAGE_POLICY}"),
            reload="systemctl reload-or-restart postfix",
        ),
        Service(
            "dovecot",
            ("/etc/dovecot/", "/etc/systemd/system/dovecot.service.d/"),
            prepare=(
                # The unit's drop-in (wait for the mail volume) counts from the next start.
                "systemctl daemon-reload",
                "getent passwd vmail >/dev/null || useradd --system --user-group --home-dir "
                f"{MAIL_DIR} --shell /usr/sbin/nologin vmail",
                f"install -d -o vmail -g vmail -m 0750 {MAIL_DIR}",
                "sievec -c /etc/dovecot/dovecot.conf /etc/dovecot/sieve/spam-to-junk.sieve",
                "sievec -c /etc/dovecot/dovecot.conf /etc/dovecot/sieve/learn-spam.sieve",
                "sievec -c /etc/dovecot/dovecot.conf /etc/dovecot/sieve/learn-ham.sieve",
            ),
            # -c: read the new file, not the running daemon's configuration socket.
            check=("doveconf -c /etc/dovecot/dovecot.conf -n >/dev/null",),
            reload="systemctl reload-or-restart dovecot",
        ),
        Service(
            "unbound",
            # resolv.conf sends the host's queries (Postfix's among them) to unbound.
            ("/etc/unbound/", "/etc/resolv.conf"),
            check=("unbound-checkconf",),
            reload="systemctl reload-or-restart unbound",
        ),
        Service(
            "nginx",
            ("/etc/nginx/", "/var/www/mailroom/"),
            check=("nginx -t -q",),
            reload="systemctl reload-or-restart nginx",
        ),
        Service(
            "fail2ban",
            ("/etc/fail2ban/",),
            check=("fail2ban-client -t >/dev/null",),
            reload="systemctl reload-or-restart fail2ban",
        ),
        Service(
            "journald",
            ("/etc/systemd/journald.conf.d/",),
            reload="systemctl restart systemd-journald",
        ),
        Service(
            "logrotate",
            (LOGROTATE_CAP,),
            # logrotate exits 0 on an unknown option, only printing "error:": its output is read too.
            check=(
                f"out=$(logrotate -d {LOGROTATE_CAP} 2>&1) || {{ printf '%s\\n' \"$out\" >&2; exit 1; }}; "
                "! printf '%s\\n' \"$out\" | grep '^error:' >&2",
            ),
            # No reload: logrotate reads its configuration afresh at every run (logrotate.timer).
        ),
    ]
    if settings.relay is Relay.DIRECT:
        common.append(
            Service(
                "mta-sts-resolver",
                ("/etc/mta-sts-daemon.yml",),
                check=("python3 -c 'import sys, yaml; yaml.safe_load(open(sys.argv[1]))' /etc/mta-sts-daemon.yml",),
                reload="systemctl restart postfix-mta-sts-resolver",
            )
        )
    if settings.webmail:
        common.append(
            Service(
                "roundcube",
                ("/etc/roundcube/",),
                check=("php -l /etc/roundcube/config.inc.php >/dev/null",),
                reload="systemctl reload-or-restart 'php*-fpm.service'",
            )
        )
    return tuple(common)


def render_bundle(settings: Settings, secrets: ServerSecrets) -> Bundle:
    environment = template_environment(FILES)
    values = context(settings, secrets)
    files = [
        _file(path, environment.get_template(template).render(values), settings)
        for template, path in _templates(settings)
    ]
    selector = settings.dkim_selector
    key_path = (
        f"/etc/opendkim/keys/{selector}.private"
        if settings.spam_filter is SpamFilter.SPAMASSASSIN
        else f"/etc/rspamd/dkim/{selector}.key"
    )
    files.append(_file(key_path, secrets.dkim_private_key_pem, settings))
    unwanted = [p for mode, names in SPAM.items() if mode is not settings.spam_filter for p in names]
    unwanted += [] if settings.webmail else list(WEBMAIL)
    unwanted += [] if settings.relay is Relay.DIRECT else list(DIRECT)
    return Bundle(
        files=tuple(sorted(files, key=lambda f: f.path)),
        services=services(settings),
        packages=packages(settings),
        absent_packages=tuple(p for p in unwanted if p not in packages(settings)),
    )
