"""The server bundle, for every spam filter x relay x webmail, checked by the daemons' own tools.

Each bundle is written under a scratch root; paths inside the files that point at bundle files
are moved under that root too, so `postfix check`, `doveconf`, `opendkim`, `spamassassin
--lint`, `rspamadm configtest`, `nginx -t`, `unbound-checkconf`, `fail2ban-client -t`,
`sievec`, `shellcheck`, `php -l` and `logrotate -d` read exactly what the server would, from the
scratch root. Each checker runs on every combination whose files it reads.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
from itertools import product
from pathlib import Path, PurePath

import pytest

from infra.core.bundle import Bundle
from infra.core.dns import Facts
from infra.core.render import render_bundle
from infra.core.settings import Settings, parse_settings
from infra.core.stack import stack_config
from infra.core.user_data import render_user_data
from infra.tools.stand_ins import generated_secrets

COMBINATIONS = [
    pytest.param(spam, relay, webmail, id=f"{spam}-{relay}-{'webmail' if webmail else 'nowebmail'}")
    for spam, relay, webmail in product(("spamassassin", "rspamd"), ("ses", "smtp2go", "direct"), (False, True))
]
# The combinations a mode-specific checker reads: its spam filter's six, or webmail's six.
SPAMASSASSIN = [c for c in COMBINATIONS if c.values[0] == "spamassassin"]
RSPAMD = [c for c in COMBINATIONS if c.values[0] == "rspamd"]
WEBMAIL = [c for c in COMBINATIONS if c.values[2]]
# Directories whose paths are moved under the scratch root inside the rendered files.
MOVED = ("/etc/postfix/", "/etc/dovecot/", "/etc/mailroom/", "/etc/opendkim", "/etc/rspamd/", "/etc/nginx/",
         "/var/www/mailroom/", "/etc/unbound/", "/etc/fail2ban/", "/etc/letsencrypt/", "/etc/spamassassin/")  # fmt: skip
SECRETS = generated_secrets()
# Deploy-time facts for the status check's expected records (documentation addresses).
FACTS = Facts("198.51.100.10", "2001:db8::10", "AAAA", ("token0", "token1", "token2"))
DQS_KEY = "dqskey0123456789abcdefghij"


def settings_for(spam: str, relay: str, webmail: bool, **more: object) -> Settings:
    extra = {"smtp2goUsername": "mailroom"} if relay == "smtp2go" else {}
    return parse_settings(
        stack_config("dev", {"spamFilter": spam, "relay": relay, "webmail": webmail, **extra, **more})
    )


def run(*argv: str, cwd: Path | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120, cwd=cwd, input=stdin)


def accepted(*argv: str) -> subprocess.CompletedProcess[str]:
    """ARGV run, and asserted to exit 0 (the failure message: all it printed)."""
    result = run(*argv)
    assert result.returncode == 0, f"{' '.join(argv[:2])}... exit {result.returncode}:\n{result.stdout}{result.stderr}"
    return result


def over_debians(root: Path, name: str, tmp_path: Path) -> Path:
    """A copy of Debian's /etc/NAME with the rendered files laid over it, as the server has it."""
    merged = tmp_path / name
    shutil.copytree(Path("/etc") / name, merged)
    shutil.copytree(root / "etc" / name, merged, dirs_exist_ok=True)
    return merged


def materialize(bundle: Bundle, root: Path) -> Path:
    """Write the bundle under ROOT, with a self-signed certificate as the server makes one."""
    pattern = re.compile("|".join(re.escape(p) for p in MOVED))
    for f in bundle.files:
        target = root / f.path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(pattern.sub(lambda m: str(root) + m.group(0), f.content))
        target.chmod(f.mode)
        # The admin's files belong to the user cloud-init creates on the droplet, not one of this machine's.
        admins = f.path.startswith("/home/")
        shutil.chown(target, "root" if admins else f.owner, "root" if admins else f.group)
    tls = root / "etc/mailroom/tls"
    tls.mkdir(parents=True, exist_ok=True)
    made = run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=mail.example.net",
               "-keyout", str(tls / "privkey.pem"), "-out", str(tls / "fullchain.pem"))  # fmt: skip
    assert made.returncode == 0, made.stderr
    return root


needs = {tool: shutil.which(tool) is not None for tool in ("postfix", "doveconf", "sievec", "opendkim", "opendmarc", "spamassassin",
         "rspamadm", "nginx", "unbound-checkconf", "fail2ban-client", "shellcheck", "php", "logrotate")}  # fmt: skip


def skip_without(tool: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not needs[tool], reason=f"{tool} is not installed (make setup installs it from requirements-debian.txt)"
    )


Rendered = dict[tuple[str, str, bool], tuple[Settings, Bundle, Path]]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    out = {}
    for spam, relay, webmail in product(("spamassassin", "rspamd"), ("ses", "smtp2go", "direct"), (False, True)):
        settings = settings_for(spam, relay, webmail)
        bundle = render_bundle(settings, SECRETS, FACTS)
        root = tmp_path_factory.mktemp(f"{spam}-{relay}-{webmail}")
        root.chmod(0o755)
        out[(spam, relay, webmail)] = (settings, bundle, materialize(bundle, root))
    return out


def postconf(root: Path) -> dict[str, str]:
    result = accepted("postconf", "-c", str(root / "etc/postfix"), "-n")
    return dict(line.split(" = ", 1) for line in result.stdout.splitlines())


@pytest.mark.daemons
@skip_without("postfix")
@pytest.mark.parametrize(("spam", "relay", "webmail"), COMBINATIONS)
def test_postfix_accepts_the_configuration(rendered: Rendered, spam: str, relay: str, webmail: bool) -> None:
    settings, _, root = rendered[(spam, relay, webmail)]
    for name in ("virtual_mailboxes", "virtual_aliases", "sender_logins", "sasl_passwd"):
        if (root / "etc/postfix" / name).exists():
            made = run("postmap", str(root / "etc/postfix" / name))
            assert made.returncode == 0, made.stderr
    checked = run("postfix", "-c", str(root / "etc/postfix"), "check")
    assert checked.returncode == 0 and "fatal" not in checked.stderr, checked.stderr
    assert "unknown" not in checked.stderr and "unused parameter" not in checked.stderr, checked.stderr
    conf = postconf(root)
    assert conf["myhostname"] == settings.host_name
    assert conf["smtpd_relay_restrictions"].endswith("reject_unauth_destination")
    assert conf["virtual_transport"] == "lmtp:unix:private/dovecot-lmtp"
    assert conf["message_size_limit"] == str(settings.message_size_limit_mb * 1024 * 1024)
    # local(8) starts only with a mailbox limit of 0 or at least the message limit.
    assert conf["mailbox_size_limit"] == "0" or int(conf["mailbox_size_limit"]) >= int(conf["message_size_limit"])
    assert conf["smtputf8_enable"] == "yes"
    assert "aNULL" in conf["smtpd_tls_exclude_ciphers"] and "EXPORT" in conf["smtpd_tls_exclude_ciphers"]
    assert conf["milter_default_action"] == "tempfail"
    if relay == "direct":
        assert "relayhost" not in conf and conf["smtp_tls_security_level"] == "dane"
        assert conf["smtp_tls_policy_maps"] == "socketmap:inet:127.0.0.1:8461:postfix"  # MTA-STS
    else:
        assert conf["relayhost"].startswith("[") and conf["relayhost"].endswith("]:587")
        assert conf["smtp_tls_security_level"] == "secure"


@pytest.mark.daemons
@skip_without("postfix")
@pytest.mark.parametrize(("spam", "relay", "webmail"), COMBINATIONS)
def test_submission_ports_require_tls_12_and_authentication(
    rendered: Rendered, spam: str, relay: str, webmail: bool
) -> None:
    _, _, root = rendered[(spam, relay, webmail)]
    result = accepted("postconf", "-c", str(root / "etc/postfix"), "-P")
    services = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition(" = ")
        services[key] = value
    for port in ("submission/inet", "submissions/inet"):
        assert services[f"{port}/smtpd_tls_security_level"] == "encrypt"
        assert services[f"{port}/smtpd_tls_protocols"] == ">=TLSv1.2"
        assert services[f"{port}/smtpd_sasl_auth_enable"] == "yes"
        assert services[f"{port}/smtpd_sender_restrictions"] == "$mailroom_submission_senders"
        assert services[f"{port}/smtpd_relay_restrictions"] == "permit_sasl_authenticated,reject"
    assert services["submissions/inet/smtpd_tls_wrappermode"] == "yes"
    # Each logged-in user sends as their own addresses, never with the null sender (bounces' own).
    senders = postconf(root)["mailroom_submission_senders"]
    assert senders.endswith(", reject_sender_login_mismatch") and "{ <> = 553 5.7.1 " in senders
    # Mail from users is signed (OpenDKIM, or rspamd that only signs it) and never passed to the spam milter.
    signer = "unix:opendkim/opendkim.sock" if spam == "spamassassin" else "unix:rspamd/milter.sock"
    for port in ("submission/inet", "submissions/inet"):
        assert services[f"{port}/smtpd_milters"] == signer
    master = (root / "etc/postfix/master.cf").read_text()
    assert re.search(r"^smtp\s+inet\s.*postscreen$", master, re.M)


SUBMITTED = """Received: from [10.0.0.5] (home-router.isp.example [198.51.100.77])
\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)
\t key-exchange X25519 server-signature RSA-PSS (2048 bits) server-digest SHA256)
\t(No client certificate requested)
\tby mail.example.net (Postfix) with ESMTPSA id 4Qx1Yz2abc
\tfor <dana@example.com>; Thu,  3 Dec 2026 22:15:00 +0000 (UTC)
Received: from mx.example.com (mx.example.com [203.0.113.50])
\tby mail.example.net (Postfix) with ESMTPS id 4Qx1Yz2abd
\tfor <alice@example.net>; Thu,  3 Dec 2026 22:15:01 +0000 (UTC)
From: alice@example.net

"""


@pytest.mark.daemons
@skip_without("postfix")
def test_a_users_home_address_leaves_no_trace_in_the_mail_they_send(tmp_path: Path) -> None:
    """Postfix's own header-check tool on the rendered map, with Received lines as smtpd writes
    them: the submission line loses the user's machine and address, keeps this server's name and
    queue id; a line of mail from outside is not the map's business."""
    bundle = render_bundle(settings_for("spamassassin", "ses", False), SECRETS, FACTS)
    table = tmp_path / "submission_received"
    table.write_text(bundle.file("/etc/postfix/submission_received").content)
    done = run("postmap", "-h", "-q", "-", f"regexp:{table}", stdin=SUBMITTED)
    assert done.returncode == 0, done.stderr
    replaced = done.stdout.split("\tREPLACE ", 1)[1]
    assert replaced == (
        "Received: by mail.example.net (Postfix) with ESMTPSA id 4Qx1Yz2abc\n"
        "\tfor <dana@example.com>; Thu,  3 Dec 2026 22:15:00 +0000 (UTC)\n"
    )
    assert "ESMTPS id 4Qx1Yz2abd" not in done.stdout  # the inbound line matched nothing
    master = bundle.file("/etc/postfix/master.cf").content
    assert master.count("-o cleanup_service_name=submission-cleanup") == 2  # 587 and 465
    assert "submission-cleanup unix n -     y       -       0       cleanup\n" in master
    assert "  -o header_checks=regexp:/etc/postfix/submission_received\n" in master


def test_sender_logins_let_users_send_as_their_aliases_only() -> None:
    bundle = render_bundle(settings_for("spamassassin", "ses", False), SECRETS, FACTS)
    logins = dict(line.split(" ", 1) for line in bundle.file("/etc/postfix/sender_logins").content.splitlines() if line and not line.startswith("#"))  # fmt: skip
    assert logins["alice@example.net"] == "alice@example.net"
    assert logins["info@example.net"] == "alice@example.net"
    assert logins["team@example.net"] == "alice@example.net, bob@example.net"
    assert "bob@example.net" not in logins["alice@example.net"]


@pytest.mark.daemons
@skip_without("doveconf")
@pytest.mark.parametrize(("spam", "relay", "webmail"), COMBINATIONS)
def test_dovecot_accepts_the_configuration(rendered: Rendered, spam: str, relay: str, webmail: bool) -> None:
    settings, _, root = rendered[(spam, relay, webmail)]
    result = accepted("doveconf", "-c", str(root / "etc/dovecot/dovecot.conf"), "-n")
    conf = result.stdout
    assert "ssl = required" in conf
    minimum = run("doveconf", "-c", str(root / "etc/dovecot/dovecot.conf"), "-h", "ssl_min_protocol")
    assert minimum.stdout.strip() == "TLSv1.2"
    assert re.search(r"inet_listener imap \{\s+port = 0", conf)
    assert re.search(r"inet_listener imaps \{\s+port = 993", conf)
    assert re.search(r"inet_listener sieve \{\s+port = 4190", conf)
    for folder in ("Drafts", "Sent", "Junk", "Trash", "Archive"):
        assert re.search(rf"mailbox {folder} \{{\s+auto = subscribe\s+special_use = \\{folder}", conf), folder
    assert "imapsieve_mailbox1_name = Junk" in conf
    # A user's redirect bounces back to the user, never to the (often forged) original sender.
    assert "sieve_redirect_envelope_from = recipient" in conf and "sieve_max_redirects = 2" in conf
    # No socket any local account may open: LMTP (mail injection) and the userdb (user listing).
    full = run("doveconf", "-c", str(root / "etc/dovecot/dovecot.conf")).stdout
    for listener in ("lmtp", "auth-userdb"):
        block = re.search(rf"unix_listener {listener} \{{(.*?)\}}", full, re.S)
        assert block and "mode = 0600" in block[1], f"{listener}: {block[1] if block else 'no such socket'}"
    users = (root / "etc/dovecot/users").read_text().splitlines()
    for box, line in zip(settings.mailboxes, users, strict=True):
        assert line.startswith(f"{box.address}:{{BLF-CRYPT}}$2y$")
        assert line.endswith(f"userdb_quota_rule=*:storage={box.quota_mb}M")


@pytest.mark.daemons
@skip_without("sievec")
@pytest.mark.parametrize(("spam", "relay", "webmail"), COMBINATIONS)
def test_sieve_scripts_compile(rendered: Rendered, spam: str, relay: str, webmail: bool) -> None:
    _, _, root = rendered[(spam, relay, webmail)]
    for script in ("spam-to-junk", "learn-spam", "learn-ham"):
        path = root / "etc/dovecot/sieve" / f"{script}.sieve"
        result = run("sievec", "-c", str(root / "etc/dovecot/dovecot.conf"), str(path))
        assert result.returncode == 0, f"{script}: {result.stderr}"
        assert path.with_suffix(".svbin").exists()


@pytest.mark.daemons
@skip_without("opendkim")
@pytest.mark.parametrize(("spam", "relay", "webmail"), SPAMASSASSIN)
def test_opendkim_accepts_its_configuration_and_key(rendered: Rendered, spam: str, relay: str, webmail: bool) -> None:
    _, bundle, root = rendered[(spam, relay, webmail)]
    accepted("opendkim", "-n", "-x", str(root / "etc/opendkim.conf"))
    key = bundle.file("/etc/opendkim/keys/mail.private")
    assert (key.mode, key.owner, key.secret) == (0o600, "opendkim", True)


@pytest.mark.daemons
@skip_without("opendmarc")
@pytest.mark.parametrize(("spam", "relay", "webmail"), SPAMASSASSIN)
def test_opendmarc_accepts_its_configuration_and_rejects_as_the_policy_asks(
    rendered: Rendered, spam: str, relay: str, webmail: bool
) -> None:
    settings, bundle, root = rendered[(spam, relay, webmail)]
    accepted("opendmarc", "-n", "-c", str(root / "etc/opendmarc.conf"))
    conf = dict(
        line.split(None, 1) for line in bundle.file("/etc/opendmarc.conf").content.splitlines() if line[:1].isalpha()
    )
    assert conf["RejectFailures"] == "true" and conf["SPFSelfValidate"] == "true"
    assert conf["AuthservID"] == conf["TrustedAuthservIDs"] == settings.host_name
    # After OpenDKIM (whose verdict it reads), before the spam filter; never on submitted mail.
    milters = postconf(root)
    assert milters["smtpd_milters"].split(", ")[:2] == ["unix:opendkim/opendkim.sock", "unix:opendmarc/opendmarc.sock"]
    assert "opendmarc" not in milters["non_smtpd_milters"]


@pytest.mark.daemons
@skip_without("spamassassin")
@pytest.mark.parametrize(("spam", "relay", "webmail"), SPAMASSASSIN)
def test_spamassassin_lints_clean(rendered: Rendered, tmp_path: Path, spam: str, relay: str, webmail: bool) -> None:
    _, _, root = rendered[(spam, relay, webmail)]
    # SpamAssassin reads its whole site directory: Debian's plugin loaders plus our local.cf.
    siteconfig = over_debians(root, "spamassassin", tmp_path)
    accepted("spamassassin", "-L", "--lint", f"--siteconfigpath={siteconfig}")
    spamd = (root / "etc/default/spamd").read_text()
    assert "--max-children 2" in spamd and "--allow-tell" in spamd and "--listen 127.0.0.1" in spamd


@pytest.mark.daemons
@skip_without("rspamadm")
@pytest.mark.parametrize(("spam", "relay", "webmail"), RSPAMD)
def test_rspamd_accepts_its_configuration(
    rendered: Rendered, tmp_path: Path, spam: str, relay: str, webmail: bool
) -> None:
    _, bundle, root = rendered[(spam, relay, webmail)]
    confdir = over_debians(root, "rspamd", tmp_path)
    result = run(
        "rspamadm",
        f"--var=CONFDIR={confdir}",
        f"--var=LOCAL_CONFDIR={confdir}",
        "configtest",
        "-c",
        str(confdir / "rspamd.conf"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "syntax OK" in result.stdout
    assert not [f for f in bundle.files if "opendkim" in f.path or "spamassassin" in f.path]
    assert {"opendkim", "spamassassin", "spamd"} <= set(bundle.absent_packages)
    assert "--maxmemory 64mb" in bundle.file("/etc/systemd/system/redis-server.service.d/mailroom.conf").content


@pytest.mark.daemons
@skip_without("nginx")
@pytest.mark.parametrize(("spam", "relay", "webmail"), COMBINATIONS)
def test_nginx_accepts_the_sites(rendered: Rendered, spam: str, relay: str, webmail: bool) -> None:
    _, _, root = rendered[(spam, relay, webmail)]
    nginx = root / "etc/nginx"
    for shared in ("snippets", "fastcgi.conf", "mime.types"):
        source = Path("/etc/nginx") / shared
        if source.is_dir():
            shutil.copytree(source, nginx / shared, dirs_exist_ok=True)
        else:
            shutil.copy(source, nginx / shared)
    (nginx / "nginx.conf").write_text(
        f"pid {root}/nginx.pid;\nerror_log stderr;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  include {nginx}/sites-enabled/*;\n}}\n"
    )
    accepted("nginx", "-t", "-c", str(nginx / "nginx.conf"), "-p", str(root), "-e", "stderr")
    sites = (nginx / "sites-enabled/mailroom.conf").read_text()
    assert "server_name mta-sts.example.net;" in sites and "ssl_protocols TLSv1.2 TLSv1.3;" in sites
    assert (nginx / "sites-enabled/mailroom-webmail.conf").exists() is webmail
    # Debian's default site (a welcome page for any name) is replaced: unknown names get no answer.
    default = (nginx / "sites-enabled/default").read_text()
    assert default.count("default_server;") == 4 and default.count("return 444;") == 2
    for site in nginx.glob("sites-enabled/mailroom*.conf"):
        text = site.read_text()
        assert text.count("include snippets/mailroom-headers.conf;") == text.count("listen 443 ssl;")
    headers = (nginx / "snippets/mailroom-headers.conf").read_text()
    assert 'add_header Strict-Transport-Security "max-age=31536000" always;' in headers


def test_mta_sts_policy_served_is_the_one_published() -> None:
    from infra.core.dns import mta_sts_policy

    settings = settings_for("rspamd", "ses", False, mtaStsMode="enforce")
    served = render_bundle(settings, SECRETS, FACTS).file("/var/www/mailroom/mta-sts/.well-known/mta-sts.txt").content
    assert served == mta_sts_policy(settings)
    assert "mode: enforce\nmx: mail.example.net\n" in served


def test_autoconfig_names_the_host_and_ports() -> None:
    import xml.etree.ElementTree as ET

    bundle = render_bundle(settings_for("rspamd", "ses", False), SECRETS, FACTS)
    xml = ET.fromstring(bundle.file("/var/www/mailroom/autoconfig/mail/config-v1.1.xml").content)  # noqa: S314
    servers = [(s.get("type"), s.findtext("hostname"), s.findtext("port"), s.findtext("socketType")) for s in xml.iter() if s.tag.endswith("Server")]  # fmt: skip
    assert servers == [
        ("imap", "mail.example.net", "993", "SSL"),
        ("smtp", "mail.example.net", "465", "SSL"),
        ("smtp", "mail.example.net", "587", "STARTTLS"),
    ]


@pytest.mark.daemons
@skip_without("unbound-checkconf")
@pytest.mark.parametrize(("spam", "relay", "webmail"), COMBINATIONS)
def test_unbound_accepts_the_resolver(rendered: Rendered, spam: str, relay: str, webmail: bool) -> None:
    _, _, root = rendered[(spam, relay, webmail)]
    wrapper = root / "unbound.conf"
    wrapper.write_text(f"include: {root}/etc/unbound/unbound.conf.d/mailroom.conf\n")
    accepted("unbound-checkconf", str(wrapper))


@pytest.mark.daemons
@skip_without("fail2ban-client")
@pytest.mark.parametrize(("spam", "relay", "webmail"), COMBINATIONS)
def test_fail2ban_accepts_the_jails(rendered: Rendered, tmp_path: Path, spam: str, relay: str, webmail: bool) -> None:
    _, _, root = rendered[(spam, relay, webmail)]
    confdir = over_debians(root, "fail2ban", tmp_path)
    result = accepted("fail2ban-client", "-c", str(confdir), "-d")
    for jail in ("sshd", "postfix-sasl", "dovecot"):
        assert f"['add', '{jail}', 'systemd']" in result.stdout, jail
    # Debian and Ubuntu log Postfix's daemons under postfix@-.service: the jail must read those.
    assert "['set', 'postfix-sasl', 'addjournalmatch', '_SYSTEMD_UNIT=postfix@-.service']" in result.stdout


@pytest.mark.daemons
@skip_without("shellcheck")
@pytest.mark.parametrize(("spam", "relay", "webmail"), COMBINATIONS)
def test_every_shell_script_passes_shellcheck(rendered: Rendered, spam: str, relay: str, webmail: bool) -> None:
    _, bundle, root = rendered[(spam, relay, webmail)]
    scripts = [root / f.path.lstrip("/") for f in bundle.files if f.content.startswith("#!/bin/sh")]
    assert len(scripts) >= 4
    accepted("shellcheck", "--shell=sh", *map(str, scripts))


@pytest.mark.daemons
@skip_without("php")
@pytest.mark.parametrize(("spam", "relay", "webmail"), WEBMAIL)
def test_roundcube_configuration_is_valid_php(rendered: Rendered, spam: str, relay: str, webmail: bool) -> None:
    _, _, root = rendered[(spam, relay, webmail)]
    accepted("php", "-l", str(root / "etc/roundcube/config.inc.php"))


@pytest.mark.parametrize(("spam", "relay", "webmail"), COMBINATIONS)
def test_secrets_live_only_in_secret_root_only_files(spam: str, relay: str, webmail: bool) -> None:
    settings = settings_for(spam, relay, webmail, spamhausDqsKey=DQS_KEY)
    bundle = render_bundle(settings, SECRETS, FACTS)
    secrets = [SECRETS.relay_password, SECRETS.certbot_token, SECRETS.dkim_private_key_pem.splitlines()[1], DQS_KEY]
    secrets += [b.password_hash.reveal() for b in settings.mailboxes]
    secrets += [SECRETS.webmail_des_key] if webmail else []
    if relay == "direct":
        secrets.remove(SECRETS.relay_password)
    for secret in secrets:
        holders = [f for f in bundle.files if secret in f.content]
        assert holders, "each secret reaches the server"
        for f in holders:
            assert f.secret and not f.mode & 0o007, f"{f.path} holds a secret but is {oct(f.mode)}"
    assert not [s for s in secrets if s in render_user_data(settings)]


def test_ubuntu_and_debian_get_the_same_configuration() -> None:
    """No line differs by image, on purpose: every parameter used exists with the same meaning in
    Postfix 3.7 and 3.8 (smtpd_forbid_bare_newline was backported to both, 3.7.10 and 3.8.5),
    Dovecot 2.3.19 and 2.3.21, rspamd 3.4 and 3.8, and both images name their units, users and
    sockets alike (php-fpm.sock is the versionless alias on both). Where the hosts themselves
    differ, the bundle overrides the difference: Ubuntu's systemd-resolved stub in resolv.conf is
    replaced by the same unbound file as on Debian. Postfix 3.7's own checker (test above) rejects
    any unknown parameter; a parameter only 3.8 knew would fail there."""
    for spam, relay, webmail in product(("spamassassin", "rspamd"), ("ses", "smtp2go", "direct"), (False, True)):
        debian = render_bundle(settings_for(spam, relay, webmail, image="debian-12-x64"), SECRETS, FACTS)
        ubuntu = render_bundle(settings_for(spam, relay, webmail, image="ubuntu-24-04-x64"), SECRETS, FACTS)
        assert debian.to_json() == ubuntu.to_json(), f"{spam}-{relay}-{webmail}"


def test_changing_one_setting_changes_only_the_files_it_concerns() -> None:
    before = render_bundle(settings_for("rspamd", "ses", False), SECRETS, FACTS)
    after = render_bundle(settings_for("rspamd", "ses", False, messageSizeLimitMb=40), SECRETS, FACTS)
    changed = {f.path for f in after.files if f.content != before.file(f.path).content}
    assert changed == {"/etc/postfix/main.cf"}


def test_the_storage_policy_defers_mail_only_while_the_volume_is_full(tmp_path: Path) -> None:
    bundle = render_bundle(settings_for("spamassassin", "ses", False), SECRETS, FACTS)
    script = bundle.file("/usr/local/sbin/mailroom-storage-policy").content
    assert "RESERVE_BYTES = 104857600" in script  # one message of the largest size limit (100 MB)
    request = "request=smtpd_access_policy\nprotocol_state=RCPT\nrecipient=alice@example.net\n\n"

    def answers(mail_dir: str, reserve: int, requests: str) -> str:
        path = tmp_path / "policy"
        path.write_text(script.replace('MAIL_DIR = "/var/mail/vhosts"', f'MAIL_DIR = "{mail_dir}"')
                        .replace("RESERVE_BYTES = 104857600", f"RESERVE_BYTES = {reserve}"))  # fmt: skip
        done = run(sys.executable, str(path), stdin=requests)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert answers(str(tmp_path), 1, request * 2) == "action=DUNNO\n\n" * 2
    full = "action=452 4.3.1 Insufficient system storage for mail, please try again later\n\n"
    assert answers(str(tmp_path), 2**62, request) == full
    assert answers(str(tmp_path / "not-mounted"), 1, request) == full
    # Only recipients are deferred: other stages are not its to judge.
    assert answers(str(tmp_path), 2**62, request.replace("RCPT", "DATA")) == "action=DUNNO\n\n"


def test_the_acme_server_setting_reaches_certbot_and_only_the_certificate_script() -> None:
    before = render_bundle(settings_for("spamassassin", "ses", False), SECRETS, FACTS)
    after = render_bundle(settings_for("spamassassin", "ses", False, acmeServer="letsencrypt-staging"), SECRETS, FACTS)
    changed = {f.path for f in after.files if f.content != before.file(f.path).content}
    assert changed == {"/usr/local/sbin/mailroom-certificate"}
    script = after.file("/usr/local/sbin/mailroom-certificate").content
    assert "--server https://acme-staging-v02.api.letsencrypt.org/directory" in script
    assert "acme-v02.api.letsencrypt.org" in before.file("/usr/local/sbin/mailroom-certificate").content


def test_every_file_belongs_to_exactly_one_service() -> None:
    """A changed file must reach exactly one checker and one reload, or the change is never picked up."""
    for spam, relay, webmail in product(("spamassassin", "rspamd"), ("ses", "smtp2go", "direct"), (False, True)):
        bundle = render_bundle(settings_for(spam, relay, webmail), SECRETS, FACTS)
        for f in bundle.files:
            owners = [s.name for s in bundle.services if any(f.path.startswith(p) for p in s.paths)]
            assert len(owners) == 1, f"{spam}-{relay}-{webmail}: {f.path} is owned by {owners}"
        for service in bundle.services:
            assert not service.reload or service.reload.startswith("systemctl "), service


@pytest.mark.daemons
@skip_without("postfix")
def test_with_a_dqs_key_smtpd_asks_the_dqs_zone_from_a_root_only_map(tmp_path: Path) -> None:
    """The key is never in main.cf, which vmail reads to run sendmail (Sieve's redirects and
    vacation replies); smtpd asks ZEN's DQS zone through a map only root and Postfix read."""
    settings = settings_for("rspamd", "ses", False, spamhausDqsKey=DQS_KEY)
    bundle = render_bundle(settings, SECRETS, FACTS)
    root = materialize(bundle, tmp_path)
    conf = postconf(root)
    main_cf = bundle.file("/etc/postfix/main.cf")
    assert DQS_KEY not in main_cf.content and not main_cf.secret and main_cf.mode == 0o644
    # ZEN leaves postscreen; the lesser lists (weight 2 each) still need each other to refuse.
    assert conf["postscreen_dnsbl_sites"] == "bl.spamcop.net*2, b.barracudacentral.org=127.0.0.2*2"
    assert conf["postscreen_dnsbl_threshold"] == "3"
    clients = f"cidr:{root}/etc/postfix/dqs_clients"  # materialized: /etc is under ROOT here
    assert conf["smtpd_client_restrictions"] == f"permit_mynetworks, check_client_access {clients}"
    # Every client, IPv4 and IPv6, looked up by Postfix itself in the rendered map.
    for address in ("198.51.100.7", "2001:db8::7"):
        found = run("postmap", "-q", address, clients)
        assert found.stdout.strip() == f"reject_rbl_client {DQS_KEY}.zen.dq.spamhaus.net=127.0.0.[2..11]", found
    # The reply a refused client reads names the public list, never the zone holding the key.
    reply = conf["default_rbl_reply"]
    assert reply.startswith("$rbl_code Service unavailable; $rbl_class [$rbl_what] blocked using zen.spamhaus.org")
    assert "$rbl_domain" not in reply and "rbl_reason" not in reply
    f = bundle.file("/etc/postfix/dqs_clients")
    assert f.secret and f.mode == 0o640 and (f.owner, f.group) == ("root", "postfix"), f
    checked = run("postfix", "-c", str(root / "etc/postfix"), "check")
    assert checked.returncode == 0 and not checked.stderr, checked.stderr


def test_without_a_dqs_key_postscreen_asks_the_public_zone() -> None:
    bundle = render_bundle(settings_for("rspamd", "ses", False), SECRETS, FACTS)
    main_cf = bundle.file("/etc/postfix/main.cf")
    assert "postscreen_dnsbl_sites = zen.spamhaus.org=127.0.0.[2..11]*3" in main_cf.content
    assert "smtpd_client_restrictions" not in main_cf.content and "default_rbl_reply" not in main_cf.content
    assert not main_cf.secret and main_cf.mode == 0o644
    assert "reject_rbl_client" not in bundle.file("/etc/postfix/dqs_clients").content


@pytest.mark.daemons
@skip_without("unbound-checkconf")
def test_the_host_resolves_through_the_local_validating_resolver(rendered: Rendered, tmp_path: Path) -> None:
    _, bundle, root = rendered[("spamassassin", "direct", False)]
    resolv = bundle.file("/etc/resolv.conf").content.splitlines()
    nameservers = [line.split()[1] for line in resolv if line.startswith("nameserver")]
    assert nameservers == ["127.0.0.1", "::1"], "only unbound: no provider resolver to fall back to"
    assert "options edns0 trust-ad" in resolv, "without trust-ad glibc hides DNSSEC validation from Postfix's DANE"
    # Debian's own unbound.conf (with its root trust anchor) plus ours: unbound validates.
    wrapper = tmp_path / "unbound.conf"
    wrapper.write_text(
        f'include: "/etc/unbound/unbound.conf.d/*.conf"\ninclude: {root}/etc/unbound/unbound.conf.d/mailroom.conf\n'
    )
    modules = run("unbound-checkconf", "-o", "module-config", str(wrapper))
    assert modules.returncode == 0, modules.stderr
    assert "validator" in modules.stdout.split(), modules.stdout
    anchor = run("unbound-checkconf", "-o", "auto-trust-anchor-file", str(wrapper))
    assert anchor.stdout.strip().endswith("root.key"), "validation starts from the root's trust anchor"
    interfaces = run("unbound-checkconf", "-o", "interface", str(wrapper))
    assert interfaces.stdout.split() == ["127.0.0.1", "::1"], "the resolver answers this host only"
    assert [s.name for s in bundle.services if "/etc/resolv.conf" in s.paths] == ["unbound"]


def test_dovecot_waits_for_the_mail_volume() -> None:
    from infra.core.facts import MAIL_DIR

    bundle = render_bundle(settings_for("rspamd", "ses", False), SECRETS, FACTS)
    drop_in = bundle.file("/etc/systemd/system/dovecot.service.d/mailroom.conf").content
    assert f"RequiresMountsFor={MAIL_DIR}" in drop_in.splitlines()
    (dovecot,) = [s for s in bundle.services if s.name == "dovecot"]
    assert "systemctl daemon-reload" in dovecot.prepare


# The configuration files whose every setting carries its reason, and their comment marker; every
# file under a prefix ending in "/" too. Data files (maps, tables, /etc/mailname, the users file),
# scripts and Sieve programs are not configuration and are not read here.
REASONED = {
    "/etc/postfix/main.cf": "#",
    "/etc/postfix/master.cf": "#",
    "/etc/dovecot/dovecot.conf": "#",
    "/etc/opendkim.conf": "#",
    "/etc/unbound/unbound.conf.d/mailroom.conf": "#",
    "/etc/resolv.conf": "#",
    "/etc/nginx/sites-enabled/": "#",
    "/etc/rspamd/local.d/": "#",
    "/etc/spamassassin/local.cf": "#",
    "/etc/default/spamd": "#",
    "/etc/default/spamass-milter": "#",
    "/etc/fail2ban/jail.d/mailroom.conf": "#",
    "/etc/systemd/": "#",
    "/etc/logrotate.d/00-mailroom": "#",
    "/etc/cron.d/mailroom-certificate": "#",
    "/etc/mta-sts-daemon.yml": "#",
    "/etc/roundcube/config.inc.php": "//",
}
# Lines that only open a section ([Journal], unbound's "server:", YAML's "cache:", "<?php") and
# lines that only close a block ("}", "]];").
SECTION = re.compile(r"\[[^\]]+\]|[a-z][a-z_-]*:|<\?php")
CLOSER = re.compile(r"[\]}),;]+")


def unreasoned(text: str, marker: str) -> list[str]:
    """The lines of a configuration file that break the reason rule (DESIGN.md, rule 3).

    Blank lines, section lines and the end of a top-level block cut a file into paragraphs. A
    paragraph that sets anything opens with its reason, one or more comment lines; the settings
    below it, to the paragraph's end (inner blocks too), share that reason. A comment line never follows a setting or a
    closing line directly: a new reason opens a new paragraph. So deleting a reason never leaves
    its settings looking covered by the paragraph above: they are left with none, and flagged.
    """
    problems = []
    reason, previous = False, "start"
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or SECTION.fullmatch(line.rstrip()):
            reason, previous = False, "break"
        elif stripped.startswith(marker):
            if previous == "setting":
                problems.append(f"{number}: a reason must open its paragraph (a blank line above it): {stripped}")
            reason = reason or previous in ("start", "break")
            previous = "comment"
        elif CLOSER.fullmatch(stripped):
            # The end of a top-level block ends its paragraph too: what follows needs a reason.
            reason = reason and line[0].isspace()
            previous = "setting"
        else:
            if not reason:
                problems.append(f"{number}: no reason above this setting: {stripped}")
            previous = "setting"
    return problems


def reasoned_files(bundle: Bundle) -> dict[str, tuple[str, str]]:
    """Path -> (content, comment marker) of the bundle's files that the reason rule covers."""
    chosen = {}
    for f in bundle.files:
        markers = [m for p, m in REASONED.items() if f.path == p or (p.endswith("/") and f.path.startswith(p))]
        if markers:
            chosen[f.path] = (f.content, markers[0])
    return chosen


def test_the_rule_flags_what_has_no_reason() -> None:
    assert not unreasoned("# a reason\na = 1\nb {\n  c = 2\n}\n\n[x]\n# why\nd = 3\n", "#")
    # Lines after a closed block, with no reason of their own (dovecot.conf's mail_location was).
    assert unreasoned("# a reason\nb {\n  c = 2\n}\nd = 3\n", "#") == ["5: no reason above this setting: d = 3"]
    # A reason squeezed below another paragraph's setting, that could be deleted unnoticed.
    assert unreasoned("# a reason\na = 1\n# another\nb = 2\n", "#")[0].startswith("3: a reason must open")
    # A section line ends the file's opening comment: the settings below need their own.
    assert unreasoned("# mailroom: a file\n[Journal]\nSystemMaxUse=1G\n", "#")


@pytest.mark.parametrize(("spam", "relay", "webmail"), COMBINATIONS)
def test_every_setting_carries_its_reason(spam: str, relay: str, webmail: bool) -> None:
    files = reasoned_files(render_bundle(settings_for(spam, relay, webmail), SECRETS, FACTS))
    problems = [f"{path}:{p}" for path, (content, marker) in files.items() for p in unreasoned(content, marker)]
    assert not problems, "\n".join(problems)
    # The rule holds for real: deleting any one reason (a run of comment lines opening settings)
    # from any of these files is caught.
    for path, (content, marker) in files.items():
        lines = content.splitlines()
        for start, line in enumerate(lines):
            opens = start == 0 or not lines[start - 1].strip().startswith(marker)
            if not (line.strip().startswith(marker) and opens):
                continue
            end = start
            while end < len(lines) and lines[end].strip().startswith(marker):
                end += 1
            if end < len(lines) and lines[end].strip() and not SECTION.fullmatch(lines[end].rstrip()):
                without = "\n".join(lines[:start] + lines[end:])
                assert unreasoned(without, marker), f"{path}: deleting line {start + 1}'s reason goes unnoticed"
    # The rule reads every kind of configuration file the combination has, not a lucky few.
    expected = {"/etc/postfix/main.cf", "/etc/postfix/master.cf", "/etc/dovecot/dovecot.conf",
                "/etc/unbound/unbound.conf.d/mailroom.conf", "/etc/nginx/sites-enabled/mailroom.conf",
                "/etc/fail2ban/jail.d/mailroom.conf", "/etc/systemd/journald.conf.d/mailroom.conf",
                "/etc/logrotate.d/00-mailroom"}  # fmt: skip
    expected |= {"/etc/opendkim.conf", "/etc/spamassassin/local.cf"} if spam == "spamassassin" else set()
    expected |= (
        {"/etc/rspamd/local.d/actions.conf", "/etc/rspamd/local.d/worker-proxy.inc"} if spam == "rspamd" else set()
    )
    expected |= {"/etc/roundcube/config.inc.php"} if webmail else set()
    assert expected <= set(files), expected - set(files)


def test_journald_and_logrotate_cap_the_logs_for_a_25_gb_disk() -> None:
    bundle = render_bundle(settings_for("rspamd", "ses", False), SECRETS, FACTS)
    journald = bundle.file("/etc/systemd/journald.conf.d/mailroom.conf").content
    settings = [line for line in journald.splitlines() if line and not line.startswith("#")]
    assert settings == ["[Journal]", "SystemMaxUse=500M", "MaxRetentionSec=1month"]
    cap = bundle.file("/etc/logrotate.d/00-mailroom")
    directives = [line for line in cap.content.splitlines() if line and not line.startswith("#")]
    # A global option only: a rule naming /var/log/mail.log would be a duplicate of rsyslog's.
    assert directives == ["maxsize 100M"]
    assert sorted([PurePath(cap.path).name, "rsyslog", "apt", "dpkg", "nginx"])[0] == "00-mailroom"
    assert (cap.mode, cap.owner, cap.secret) == (0o644, "root", False), "logrotate ignores writable files"
    (service,) = [s for s in bundle.services if cap.path in s.paths]
    assert service.name == "logrotate" and "logrotate -d /etc/logrotate.d/00-mailroom" in service.check[0]


# Debian 12's /etc/logrotate.d/rsyslog (rsyslog 8.2302): the rule that already rotates the mail
# log, weekly, whatever its size.
RSYSLOG_RULE = """/var/log/syslog
/var/log/mail.log
/var/log/kern.log
/var/log/auth.log
/var/log/user.log
/var/log/cron.log
{
\trotate 4
\tweekly
\tmissingok
\tnotifempty
\tcompress
\tdelaycompress
\tsharedscripts
\tpostrotate
\t\t/usr/lib/rsyslog/rsyslog-rotate
\tendscript
}
"""


@pytest.mark.daemons
@skip_without("logrotate")
@pytest.mark.parametrize(("spam", "relay", "webmail"), COMBINATIONS)
def test_logrotate_accepts_the_cap_and_applies_it_to_rsyslogs_mail_log(
    rendered: Rendered, tmp_path: Path, spam: str, relay: str, webmail: bool
) -> None:
    _, _, root = rendered[(spam, relay, webmail)]
    cap = root / "etc/logrotate.d/00-mailroom"
    alone = run("logrotate", "-d", "-s", str(tmp_path / "status"), str(cap))
    assert alone.returncode == 0 and "error:" not in alone.stderr, alone.stderr

    # Debian's logrotate.conf with our file and rsyslog's rule in its include directory, over a
    # mail.log of 150 MB (sparse) that rsyslog's weekly rule alone would leave growing.
    logs, included = tmp_path / "log", tmp_path / "logrotate.d"
    logs.mkdir()
    included.mkdir()
    with (logs / "mail.log").open("wb") as log:
        log.truncate(150 * 1024 * 1024)
    (included / "rsyslog").write_text(RSYSLOG_RULE.replace("/var/log/", f"{logs}/"))
    conf = tmp_path / "logrotate.conf"
    conf.write_text(f"weekly\nrotate 4\ncreate\ninclude {included}\n")

    def mail_log_verdict() -> str:
        result = run("logrotate", "-d", "-s", str(tmp_path / "status"), str(conf))
        assert result.returncode == 0 and "error:" not in result.stderr, result.stderr
        verdict = result.stderr.split(f"considering log {logs}/mail.log", 1)[1].split("considering log", 1)[0]
        return verdict

    assert "does not need rotating" in mail_log_verdict(), "without the cap, a week must pass"
    shutil.copy(cap, included / cap.name)
    assert "log needs rotating" in mail_log_verdict(), "with it, rsyslog's rule rotates a log over 100 MB"


@pytest.mark.daemons
def test_a_setting_in_a_root_script_is_one_word_whatever_it_holds(tmp_path: Path) -> None:
    # The settings refuse such values; the scripts must not depend on it: a value from a future
    # setting, or a relaxed check, reaches certbot's command line as one word and runs nothing.
    hostile = "`touch ran-backticks`ops@example.org"
    acme = "https://acme.example.org/$(touch ran-dollar)/directory"
    settings = dataclasses.replace(parse_settings(stack_config("dev")), alert_email=hostile, acme_server=acme)
    script = render_bundle(settings, generated_secrets(), FACTS).file("/usr/local/sbin/mailroom-certificate").content
    start = script.index("certbot certonly")
    command = script[start : script.index(">/dev/null", start)]
    stub = 'certbot() { printf "%s\\n" "$@"; }\n'
    result = subprocess.run(["sh", "-c", stub + command], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    words = result.stdout.splitlines()
    assert words[words.index("--email") + 1] == hostile
    assert words[words.index("--server") + 1] == acme
    assert not list(tmp_path.iterdir()), "a setting's value ran as a command"
