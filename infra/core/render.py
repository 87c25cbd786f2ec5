"""The server bundle: every file the server gets, rendered from settings and secrets (pure).

Templates live under cloud_init/files/<layer>/<destination path>.j2. The `common` layer is
always rendered; each chosen mode (infra.core.modes: spam filter, relay, webmail) adds its
layers. A template whose name starts with `_` is a part another template includes (a relay's
lines of main.cf), never a file of its own. Choices pick files; templates only fill in values.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from infra.core import backup as backups
from infra.core.backup import BACKUP_CONFIG, BACKUP_MAX_AGE_HOURS, BACKUP_PATH, BACKUP_RESULT, BACKUP_SCRIPT
from infra.core.bundle import Bundle, BundleFile, ServerSecrets, Service
from infra.core.dns import Facts, mta_sts_policy, records
from infra.core.facts import (
    MAIL_DIR,
    QUEUE_DIR,
    RELAY_PORT,
    SERVER_FILES,
    STATUS_CONFIG,
    STATUS_PATH,
    STATUS_SCRIPT,
)
from infra.core.modes import (
    COMMON_SECRET_FILES,
    JSON_PROBE,
    OPENDKIM_MILTER,
    OPENDMARC_MILTER,
    RSPAMD_MILTER,
    SPAMD_USER,
    Owner,
    absent_packages,
    chosen,
    debconf_selections,
    packages,
)
from infra.core.settings import MESSAGE_MB_RANGE, Settings
from infra.core.user_data import template_environment

# spamd children: each holds ≈ 50 MB; two keep SpamAssassin within a 1 GB droplet.
SPAMD_CHILDREN = 2
REDIS_MAX_MEMORY = "64mb"
# A global logrotate option (a size cap), read before rsyslog's rule for the mail logs: see the file.
LOGROTATE_CAP = "/etc/logrotate.d/00-mailroom"
# Blocklists postscreen scores clients against (weights: a listing of weight 3 is enough).
DNSBL_SITES = ("zen.spamhaus.org=127.0.0.[2..11]*3", "bl.spamcop.net*2", "b.barracudacentral.org=127.0.0.2*2")
# With a Spamhaus DQS key, ZEN is asked at its DQS zone by smtpd, not by postscreen: the key stays
# in a root-only map (/etc/postfix/dqs_clients) that smtpd opens as root. main.cf must stay readable by every
# local user who runs sendmail: vmail does, for Sieve's redirects and vacation replies.
DQS_ZONE = "{key}.zen.dq.spamhaus.net=127.0.0.[2..11]"

POSTFIX_MAPS = ("virtual_mailboxes", "virtual_aliases", "sender_logins")
# The jails of fail2ban/jail.d/mailroom.conf (the status check expects each running).
FAIL2BAN_JAILS = ("sshd", "postfix-sasl", "dovecot")
# The part of main.cf each relay brings, in its own layer.
RELAY_PART = "_relay.cf.j2"


def layers(settings: Settings) -> tuple[str, ...]:
    spam, relay, webmail, backup = chosen(settings)
    return ("common", *spam.layers, *webmail.layers, *relay.layers, *backup.layers)


def relay_host(settings: Settings) -> str:
    return chosen(settings)[1].host(settings)


def sender_logins(settings: Settings) -> list[tuple[str, list[str]]]:
    """A mailbox sends as itself; an alias may be used by the mailboxes it reaches."""
    boxes = {b.address for b in settings.mailboxes}
    logins: dict[str, list[str]] = {b: [b] for b in sorted(boxes)}
    for alias in settings.aliases:
        owners = [t for t in alias.targets if t in boxes]
        if owners:
            logins[alias.source] = owners
    return sorted(logins.items())


def milters(settings: Settings) -> dict[str, str]:
    """Inbound mail is verified and scanned; submitted mail is only signed, never scanned."""
    return dict(chosen(settings)[0].milters)


def certificate_names(settings: Settings) -> list[str]:
    return [settings.host_name, f"mta-sts.{settings.domain}", f"autoconfig.{settings.domain}"]


def dnsbl(settings: Settings) -> tuple[list[str], str]:
    """postscreen's blocklists, and the DQS zone smtpd asks (empty without a DQS key)."""
    if not settings.spamhaus_dqs_key:
        return list(DNSBL_SITES), ""
    # ZEN alone (weight 3) was enough to refuse; the lesser lists keep needing each other.
    return list(DNSBL_SITES[1:]), DQS_ZONE.format(key=settings.spamhaus_dqs_key.reveal())


def secret_files(settings: Settings) -> dict[str, Owner]:
    """Destination path -> (mode, owner, group) of every file that holds a secret."""
    tables = [COMMON_SECRET_FILES, *(mode.secret_files for mode in chosen(settings))]
    return {p.format(selector=settings.dkim_selector): v for table in tables for p, v in table.items()}


def context(settings: Settings, secrets: ServerSecrets) -> dict[str, Any]:
    names = certificate_names(settings)
    sites, dqs_zone = dnsbl(settings)
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
        "dqs_zone": dqs_zone,
        "spam_filter": settings.spam_filter.value,
        "relay_snippet": f"{chosen(settings)[1].layers[0]}/{RELAY_PART}",
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
        "status_path": STATUS_PATH,
        "acme_server": settings.acme_server,
        "webmail_des_key": secrets.webmail_des_key,
        "backup_path": BACKUP_PATH,
        "backup_hour": settings.backup_hour,
        "backup_repository": backups.repository(settings),
        "backup_password": secrets.backup_password,
        "backup_access_key_id": secrets.backup_access_key_id,
        "backup_secret_access_key": secrets.backup_secret_access_key,
        **milters(settings),
        "opendkim_socket": f"{QUEUE_DIR}/{OPENDKIM_MILTER}",
        "opendmarc_socket": f"{QUEUE_DIR}/{OPENDMARC_MILTER}",
        "rspamd_socket": f"{QUEUE_DIR}/{RSPAMD_MILTER}",
    }


def _templates(settings: Settings) -> Iterator[tuple[str, str]]:
    """(template name, destination path) of every file the settings call for."""
    for layer in layers(settings):
        for template in sorted((SERVER_FILES / layer).rglob("*.j2")):
            relative = template.relative_to(SERVER_FILES / layer)
            if not relative.name.startswith("_"):
                yield f"{layer}/{relative}", "/" + str(relative.with_suffix(""))


def _file(path: str, content: str, settings: Settings) -> BundleFile:
    secret = secret_files(settings)
    if path in secret:
        mode, owner, group = secret[path]
        return BundleFile(path, content, mode, owner, group, secret=True)
    mode = 0o755 if path.endswith(".sh") or path.startswith("/usr/local/sbin/") else 0o644
    return BundleFile(path, content, mode)


# Postfix's policy service deferring inbound mail while the mail volume is full.
STORAGE_POLICY = "/usr/local/sbin/mailroom-storage-policy"


def services(settings: Settings) -> tuple[Service, ...]:
    """Each daemon with its files, its own checker and how it picks up a change."""
    spam, relay, webmail, backup = chosen(settings)
    postmaps = tuple(f"postmap /etc/postfix/{m}" for m in (*POSTFIX_MAPS, *relay.postfix_maps))
    common = [
        Service(
            "tls",
            ("/usr/local/sbin/mailroom-certificate", "/etc/letsencrypt/", "/etc/cron.d/mailroom-certificate"),
            prepare=("/usr/local/sbin/mailroom-certificate",),
        ),
        # The apply script reloads in this order: the spam filter (and its socket) is up on its
        # new files before Postfix's appear, so a switch of filter never leaves Postfix without it.
        *spam.services,
        Service(
            "postfix",
            ("/etc/postfix/", "/etc/aliases", "/etc/mailname", STORAGE_POLICY),
            prepare=(*postmaps, "newaliases"),
            check=("postfix check", f"python3 -m py_compile {STORAGE_POLICY}"),
            reload="systemctl reload-or-restart postfix",
            units=("postfix",),
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
            units=("dovecot",),
        ),
        Service(
            "unbound",
            # resolv.conf sends the host's queries (Postfix's among them) to unbound.
            ("/etc/unbound/", "/etc/resolv.conf"),
            check=("unbound-checkconf",),
            reload="systemctl reload-or-restart unbound",
            units=("unbound",),
        ),
        Service(
            "nginx",
            ("/etc/nginx/", "/var/www/mailroom/"),
            check=("nginx -t -q",),
            reload="systemctl reload-or-restart nginx",
            units=("nginx",),
        ),
        Service(
            "fail2ban",
            ("/etc/fail2ban/",),
            check=("fail2ban-client -t >/dev/null",),
            reload="systemctl reload-or-restart fail2ban",
            units=("fail2ban",),
        ),
        Service(
            "status",
            (STATUS_PATH, STATUS_CONFIG, "/etc/systemd/system/mailroom-status."),
            prepare=("systemctl daemon-reload",),
            check=(f"python3 -c {JSON_PROBE} {STATUS_PATH} {STATUS_CONFIG}",),
            reload="systemctl enable --now mailroom-status.timer",
        ),
        # sshd reads authorized_keys at each login: nothing to reload.
        Service("ssh-keys", (f"/home/{settings.admin_user}/.ssh/",)),
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
    return (*common, *relay.services, *webmail.services, *backup.services)


def status_config(settings: Settings, facts: Facts) -> dict[str, Any]:
    """What the server's status checks expect: its daemons and jails, its relay, the program's records."""
    host = relay_host(settings)
    return {
        "host": settings.host_name,
        "domain": settings.domain,
        "alert_email": settings.alert_email,
        "units": [unit for service in services(settings) for unit in service.units],
        "jails": list(FAIL2BAN_JAILS),
        "mail_dir": MAIL_DIR,
        "dkim_key": chosen(settings)[0].dkim_key.format(selector=settings.dkim_selector),
        "dkim_selector": settings.dkim_selector,
        "relay": {"host": host, "port": RELAY_PORT} if host else None,
        "records": [asdict(r) for r in records(settings, facts) if r.hosted],
        # The nightly backup's last result, or None when backupTarget is none (a warning).
        "backup": (
            {
                "result": BACKUP_RESULT,
                "max_age_hours": BACKUP_MAX_AGE_HOURS,
                "repository": backups.repository(settings),
                "history_protected": backups.HISTORY_PROTECTED[settings.backup_target],
            }
            if backups.enabled(settings)
            else None
        ),
    }


def authorized_keys(settings: Settings) -> BundleFile:
    """The admin's authorized_keys, exactly the settings' keys (the program adds its deploy key):
    cloud-init writes them once, at first boot; every apply converges them, so a key removed from
    sshPublicKeys can no longer log in (nor use the admin's passwordless sudo)."""
    admin = settings.admin_user
    lines = "".join(f"{key.strip()}\n" for key in settings.ssh_public_keys)
    header = "# Written by mailroom on every deploy from the sshPublicKeys setting: edits here are replaced.\n"
    return BundleFile(f"/home/{admin}/.ssh/authorized_keys", header + lines, 0o600, admin, admin)


def render_bundle(settings: Settings, secrets: ServerSecrets, facts: Facts) -> Bundle:
    environment = template_environment(SERVER_FILES)
    values = context(settings, secrets)
    files = [
        _file(path, environment.get_template(template).render(values), settings)
        for template, path in _templates(settings)
    ]
    key_path = chosen(settings)[0].dkim_key.format(selector=settings.dkim_selector)
    files.append(_file(key_path, secrets.dkim_private_key_pem, settings))
    files.append(authorized_keys(settings))
    files.append(BundleFile(STATUS_PATH, STATUS_SCRIPT.read_text(), 0o755))
    files.append(BundleFile(STATUS_CONFIG, json.dumps(status_config(settings, facts), indent=2, sort_keys=True) + "\n"))
    if backups.enabled(settings):
        files.append(BundleFile(BACKUP_PATH, BACKUP_SCRIPT.read_text(), 0o755))
        config = json.dumps(backups.backup_config(settings), indent=2, sort_keys=True) + "\n"
        files.append(BundleFile(BACKUP_CONFIG, config))
    return Bundle(
        files=tuple(sorted(files, key=lambda f: f.path)),
        services=services(settings),
        packages=packages(settings),
        absent_packages=absent_packages(settings),
        debconf=debconf_selections(settings),
    )
