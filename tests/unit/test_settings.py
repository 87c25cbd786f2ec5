"""Stack settings: good stacks parse; each wrong value is refused with key, value and remedy."""

from __future__ import annotations

from typing import Any

import pytest

from infra.core.settings import (
    DmarcPolicy,
    Image,
    MtaStsMode,
    Relay,
    SettingsError,
    SpamFilter,
    load_schema,
    parse_settings,
)
from infra.core.stack import stack_config, stack_names

PASSWORD_HASH = "{BLF-CRYPT}$2y$10$abcdefghijklmnopqrstuuNSDiJ1QtDvGv5vVSpJ9FhZ6Qx4bEh1W"


def good(**changes: Any) -> dict[str, Any]:
    """The dev stack's settings with some values changed (stand-in hashes follow the mailboxes)."""
    return stack_config("dev", changes)


def refusal(**changes: Any) -> str:
    with pytest.raises(SettingsError) as caught:
        parse_settings(good(**changes))
    return str(caught.value)


def test_every_stack_file_parses() -> None:
    assert {"dev", "prod"} <= set(stack_names())
    for stack in stack_names():
        settings = parse_settings(stack_config(stack))
        assert settings.host_name.endswith("." + settings.domain)


def test_defaults_come_from_pulumi_yaml() -> None:
    settings = parse_settings(stack_config("dev"))
    schema = load_schema()
    assert settings.droplet_size == schema["dropletSize"].default == "s-1vcpu-1gb"
    assert settings.image is Image.UBUNTU_24_04
    assert settings.relay is Relay.SES
    assert settings.spam_filter is SpamFilter.SPAMASSASSIN
    assert settings.webmail is False
    assert settings.message_size_limit_mb == 25


def test_environments_differ_where_they_should() -> None:
    dev, prod = (parse_settings(stack_config(s)) for s in ("dev", "prod"))
    assert dev.domain != prod.domain
    assert dev.droplet_size != prod.droplet_size
    assert (dev.backups, prod.backups) == (False, True)
    assert (dev.dmarc_policy, prod.dmarc_policy) == (DmarcPolicy.NONE, DmarcPolicy.REJECT)
    assert (dev.mta_sts_mode, prod.mta_sts_mode) == (MtaStsMode.TESTING, MtaStsMode.ENFORCE)


def test_default_aliases_exist_and_point_at_the_first_mailbox() -> None:
    settings = parse_settings(stack_config("dev"))
    sources = {a.source: a.targets for a in settings.aliases}
    for alias in ("postmaster", "abuse", "dmarc-reports", "tls-reports"):
        assert sources[f"{alias}@example.net"] == ("alice@example.net",)
    assert sources["info@example.net"] == ("alice@example.net",)  # a mailbox's own alias
    assert sources["team@example.net"] == ("alice@example.net", "bob@example.net")


def test_mailbox_line_sets_quota_and_aliases() -> None:
    settings = parse_settings(good(mailboxes=["alice@example.net quota=500M aliases=a@example.net,b@example.net"]))
    box = settings.mailboxes[0]
    assert (box.address, box.quota_mb, box.aliases) == ("alice@example.net", 500, ("a@example.net", "b@example.net"))


def test_crypt_hash_without_scheme_gets_dovecot_prefix() -> None:
    bare = PASSWORD_HASH.removeprefix("{BLF-CRYPT}")
    settings = parse_settings(good(mailboxes=["alice@example.net"], passwordHashes=[f"alice@example.net {bare}"]))
    assert settings.mailboxes[0].password_hash.reveal() == PASSWORD_HASH


def test_secret_values_never_show_in_reprs() -> None:
    settings = parse_settings(good(relay="smtp2go", smtp2goUsername="u", smtp2goPassword="hunter2-very-secret"))
    assert "hunter2" not in repr(settings)
    assert "$2y$" not in repr(settings)
    assert settings.smtp2go_password.reveal() == "hunter2-very-secret"


# Each bad input: the changed settings, and the words the message must contain (key, value, remedy).
BAD_INPUTS: list[tuple[str, dict[str, Any], list[str]]] = [
    ("domain not a name", {"domain": "exa mple"}, ["domain", "'exa mple'", "not a domain name"]),
    ("domain single label", {"domain": "localhost"}, ["domain", "'localhost'", "e.g. example.org"]),
    ("host not a name", {"hostName": "mail_1.example.net"}, ["hostName", "'mail_1.example.net'", "not a host name"]),
    (
        "host outside the domain",
        {"hostName": "mail.example.com"},
        ["hostName", "outside the domain example.net", "mail.example.net"],
    ),
    ("unknown region", {"region": "mars1"}, ["region", "'mars1'", "accepted:", "fra1"]),
    ("unknown size", {"dropletSize": "s-64vcpu-1tb"}, ["dropletSize", "'s-64vcpu-1tb'", "s-1vcpu-1gb"]),
    ("size too small", {"dropletSize": "s-1vcpu-512mb-10gb"}, ["dropletSize", "too small", "1 GB or more"]),
    ("unknown image", {"image": "centos-7-x64"}, ["image", "'centos-7-x64'", "ubuntu-24-04-x64, debian-12-x64"]),
    ("unknown backup plan", {"backups": True, "backupPlan": "hourly"}, ["backupPlan", "'hourly'", "weekly, daily"]),
    ("unknown backup target", {"backupTarget": "tape"}, ["backupTarget", "'tape'", "s3, spaces, none"]),
    ("bucket not a name", {"backupBucket": "Mail_Backup"}, ["backupBucket", "'Mail_Backup'", "not a bucket name"]),
    ("backup hour past midnight", {"backupHour": 24}, ["backupHour", "24", "0 to 23"]),
    ("no daily snapshot kept", {"backupKeepDaily": 0}, ["backupKeepDaily", "1 to 1000"]),
    ("s3 region not aws", {"backupRegion": "nyc3"}, ["backupRegion", "'nyc3'", "not an AWS region"]),
    (
        "spaces where there are none",
        {"backupTarget": "spaces", "region": "nyc1"},
        ["backupRegion", "'nyc1'", "which has no Spaces", "nyc3"],
    ),
    ("alert address not one", {"doAlertEmail": "ops"}, ["doAlertEmail", "'ops'", "not an e-mail address"]),
    # What a shell would run: a setting reaches root's scripts (quoted there as well).
    ("alert address runs a command", {"alertEmail": "`reboot`@example.com"}, ["alertEmail", "not an e-mail address"]),
    ("alert address expands", {"alertEmail": "$(id)x@example.com"}, ["alertEmail", "not an e-mail address"]),
    ("mailbox with a quote", {"mailboxes": ["o'neil@example.net"]}, ["mailboxes[0]", "not an e-mail address"]),
    (
        "bcrypt cost too low",
        {
            "passwordHashes": [
                "alice@example.net {BLF-CRYPT}$2y$05$abcdefghijklmnopqrstuuNSDiJ1QtDvGv5vVSpJ9FhZ6Qx4bEh1W"
            ]
        },
        ["passwordHashes[0]", "cost 05", "cost 10 or more", "doveadm pw -s BLF-CRYPT -r 10"],
    ),
    ("cidr not a network", {"adminCidrs": ["198.51.100.300/24"]}, ["adminCidrs[0]", "not a network", "CIDR"]),
    (
        "cidr with host bits",
        {"adminCidrs": ["198.51.100.7/24"]},
        ["adminCidrs[0]", "'198.51.100.7/24'", "host address with a prefix"],
    ),
    (
        "ssh open to the world",
        {"adminCidrs": ["0.0.0.0/0"]},
        ["adminCidrs[0]", "whole internet", "allowSshFromAnywhere: true"],
    ),
    ("ssh open to the world v6", {"adminCidrs": ["::/0"]}, ["adminCidrs[0]", "'::/0'", "allowSshFromAnywhere"]),
    ("no admin cidrs", {"adminCidrs": []}, ["adminCidrs", "empty", "SSH would be unreachable"]),
    (
        "bad ssh key",
        {"sshPublicKeys": ["my laptop key"]},
        ["sshPublicKeys[0]", "not an OpenSSH public key", "ssh-ed25519"],
    ),
    (
        "mailbox outside the domain",
        {"mailboxes": ["eve@example.com"], "passwordHashes": [f"eve@example.com {PASSWORD_HASH}"]},
        ["mailboxes[0]", "'eve@example.com'", "outside the mail domain", "@example.net"],
    ),
    ("mailbox not an address", {"mailboxes": ["alice"]}, ["mailboxes[0]", "'alice'", "not an e-mail address"]),
    ("mailbox bad option", {"mailboxes": ["alice@example.net size=2G"]}, ["mailboxes[0]", "'size=2G'", "quota=SIZE"]),
    (
        "plaintext password",
        {"passwordHashes": ["alice@example.net correct-horse-battery", f"bob@example.net {PASSWORD_HASH}"]},
        ["passwordHashes[0]", "alice@example.net", "looks like plaintext", "doveadm pw"],
    ),
    (
        "mailbox without password",
        {"passwordHashes": [f"alice@example.net {PASSWORD_HASH}"]},
        ["mailboxes[1]", "bob@example.net has no password hash", "pulumi config set --secret"],
    ),
    ("unknown relay", {"relay": "sendgrid"}, ["relay", "'sendgrid'", "ses, smtp2go, direct"]),
    ("unknown spam filter", {"spamFilter": "spamd"}, ["spamFilter", "'spamd'", "spamassassin, rspamd"]),
    (
        "ses region without ses",
        {"sesRegion": "ap-east-1"},
        ["sesRegion", "'ap-east-1'", "not a region where SES exists", "us-east-1"],
    ),
    (
        "smtp2go without credentials",
        {"relay": "smtp2go", "smtp2goPassword": ""},
        ["smtp2goUsername: missing", "smtp2goPassword: missing", "pulumi config set --secret smtp2goPassword"],
    ),
    ("dkim selector not a label", {"dkimSelector": "mail.2026"}, ["dkimSelector", "'mail.2026'", "not a DNS label"]),
    ("dkim selector with underscore", {"dkimSelector": "_mail"}, ["dkimSelector", "'_mail'", "not a DNS label"]),
    ("unknown dmarc policy", {"dmarcPolicy": "block"}, ["dmarcPolicy", "'block'", "none, quarantine, reject"]),
    (
        "bad dmarc report address",
        {"dmarcReportAddress": "reports"},
        ["dmarcReportAddress", "'reports'", "not an e-mail address"],
    ),
    ("unknown mta-sts mode", {"mtaStsMode": "strict"}, ["mtaStsMode", "'strict'", "none, testing, enforce"]),
    (
        "acme server over plain http",
        {"acmeServer": "http://acme.example.org/directory"},
        ["acmeServer", "'http://acme.example.org/directory'", "letsencrypt, letsencrypt-staging or an https://"],
    ),
    ("caa issuer not a domain", {"caaIssuer": "lets encrypt"}, ["caaIssuer", "'lets encrypt'", "CAA domain"]),
    (
        "acme server a shell would read",
        {"acmeServer": "https://acme.example.org/$(id)"},
        ["acmeServer", "letsencrypt, letsencrypt-staging"],
    ),
    ("bad tls-rpt address", {"tlsRptAddress": "tls@"}, ["tlsRptAddress", "'tls@'", "not an e-mail address"]),
    (
        "bad alert address",
        {"alertEmail": "ops at example.org"},
        ["alertEmail", "'ops at example.org'", "not an e-mail address"],
    ),
    ("volume too large", {"volumeSizeGb": 20000}, ["volumeSizeGb", "20000", "1 to 16384"]),
    ("volume not a number", {"volumeSizeGb": "ten"}, ["volumeSizeGb", "'ten'", "not an integer"]),
    ("message limit out of range", {"messageSizeLimitMb": 0}, ["messageSizeLimitMb", "0", "1 to 100"]),
    ("backups not a boolean", {"backups": "weekly"}, ["backups", "'weekly'", "not a boolean"]),
    ("alias to nowhere", {"aliases": ["sales@example.net"]}, ["aliases[0]", "'sales@example.net'", "SOURCE: TARGET"]),
    (
        "alias outside the domain",
        {"aliases": ["sales@example.com: alice@example.net"]},
        ["aliases[0]", "'sales@example.com'", "outside the mail domain"],
    ),
    (
        "alias forwarding outside the domain",
        {"aliases": ["billing@example.net: alice@example.net, accounts@example.com"]},
        [
            "aliases[0]",
            "'accounts@example.com'",
            "forwarded mail keeps its sender's From",
            "accepted: addresses @example.net",
        ],
    ),
    (
        "alias shadows a mailbox",
        {"aliases": ["bob@example.net: alice@example.net"]},
        ["aliases", "'bob@example.net'", "both a mailbox and an alias"],
    ),
    (
        "duplicate mailbox",
        {
            "mailboxes": ["alice@example.net", "alice@example.net"],
            "passwordHashes": [f"alice@example.net {PASSWORD_HASH}"],
        },
        ["mailboxes", "listed twice"],
    ),
    ("root as admin", {"adminUser": "root"}, ["adminUser", "'root'", "not root"]),
    ("typo in a key", {"spamfilter": "rspamd"}, ["spamfilter", "not a mailroom setting", "did you mean 'spamFilter'?"]),
]


@pytest.mark.parametrize(("changes", "expected"), [(c, e) for _, c, e in BAD_INPUTS], ids=[n for n, _, _ in BAD_INPUTS])
def test_bad_input_is_refused_with_key_value_and_remedy(changes: dict[str, Any], expected: list[str]) -> None:
    message = refusal(**changes)
    for words in expected:
        assert words in message, f"{words!r} missing from:\n{message}"


def test_there_are_at_least_twenty_bad_inputs() -> None:
    assert len(BAD_INPUTS) >= 20


def test_one_error_lists_every_problem() -> None:
    with pytest.raises(SettingsError) as caught:
        parse_settings(good(region="mars1", relay="pigeon", dkimSelector="a b", adminCidrs=["0.0.0.0/0"]))
    keys = [p.split(":")[0] for p in caught.value.problems]
    assert keys == ["region", "adminCidrs[0]", "relay", "dkimSelector"]
    assert str(caught.value).startswith("4 problems in the stack settings:")


def test_missing_required_setting_names_it_and_says_what_it_is() -> None:
    raw = good()
    del raw["domain"]
    with pytest.raises(SettingsError) as caught:
        parse_settings(raw)
    assert "domain: missing; The mail domain" in str(caught.value)


def test_ssh_from_anywhere_is_accepted_with_the_opt_in() -> None:
    settings = parse_settings(good(adminCidrs=["0.0.0.0/0", "::/0"], allowSshFromAnywhere=True))
    assert settings.admin_cidrs == ("0.0.0.0/0", "::/0")


def test_a_plaintext_password_is_never_echoed() -> None:
    message = refusal(passwordHashes=["alice@example.net correct-horse-battery", f"bob@example.net {PASSWORD_HASH}"])
    assert "correct-horse-battery" not in message


def test_secret_setting_stored_in_plain_text_is_refused_when_the_engine_says_so() -> None:
    raw = good(relay="smtp2go", smtp2goUsername="u", smtp2goPassword="pw-in-plain-text")
    with pytest.raises(SettingsError) as caught:
        parse_settings(raw, encrypted=["passwordHashes"])
    message = str(caught.value)
    assert "smtp2goPassword: stored in plain text" in message
    assert "pulumi config set --secret smtp2goPassword" in message
    assert "pw-in-plain-text" not in message
    assert parse_settings(raw, encrypted=["passwordHashes", "smtp2goPassword"]).relay is Relay.SMTP2GO


def test_acme_server_names_let_s_encrypt_by_default_and_takes_another_ca() -> None:
    assert parse_settings(good()).acme_server == "https://acme-v02.api.letsencrypt.org/directory"
    staging = parse_settings(good(acmeServer="letsencrypt-staging")).acme_server
    assert staging == "https://acme-staging-v02.api.letsencrypt.org/directory"
    other = "https://acme.example.com:14000/dir"
    settings = parse_settings(good(acmeServer=other, caaIssuer="Example.com"))
    assert (settings.acme_server, settings.caa_issuer) == (other, "example.com")
    assert parse_settings(good(acmeServer="letsencrypt-staging")).caa_issuer == "letsencrypt.org"


def test_another_ca_needs_its_caa_domain() -> None:
    message = refusal(acmeServer="https://acme.example.com/directory")
    assert "caaIssuer: missing" in message and "CAA domain" in message


def test_the_backup_bucket_and_region_are_derived_from_the_host_and_the_relay() -> None:
    settings = parse_settings(good())
    assert settings.backup_target.value == "s3"
    assert settings.backup_bucket == settings.host_name.replace(".", "-") + "-mail-backup"
    assert settings.backup_region == settings.ses_region
    spaces = parse_settings(good(backupTarget="spaces", region="fra1"))
    assert spaces.backup_region == "fra1"
    assert parse_settings(good(backupTarget="none", backupBucket="Not_Checked")).backup_target.value == "none"
