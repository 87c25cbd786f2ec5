"""The program: settings in, every resource declared. The one place that knows the order."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import pulumi
import pulumi_random as random
import pulumi_tls as tls
from pulumi.runtime import config as runtime_config

from infra.cloud.backup import BackupArgs, MailBackup
from infra.cloud.host import HostArgs, MailHost
from infra.cloud.provisioning import Provisioning
from infra.cloud.relay import RelayArgs, SesRelay
from infra.core import backup as backups
from infra.core.bundle import ServerSecrets
from infra.core.dns import Facts, dkim_public_key_body
from infra.core.facts import SMTP2GO_HOST
from infra.core.render import certificate_names, render_bundle
from infra.core.settings import BackupTarget, Relay, Settings, decode_config_value, load_schema, parse_settings
from infra.core.stack import PROJECT
from infra.core.user_data import render_user_data

WEBMAIL_KEY_LENGTH = 24


def settings_from_config() -> Settings:
    """The stack's settings as the Pulumi engine hands them over, parsed and validated."""
    schema = load_schema()
    given: Mapping[str, Any] = {**runtime_config.get_config_env(), **runtime_config.CONFIG.get()}
    raw: dict[str, Any] = {}
    for full_key, text in given.items():
        namespace, _, key = full_key.partition(":")
        if namespace == PROJECT:
            raw[key] = decode_config_value(schema[key], text) if key in schema else text
    encrypted = [key for key in raw if runtime_config.is_config_secret(f"{PROJECT}:{key}")]
    return parse_settings(raw, schema, encrypted)


def build(settings: Settings) -> dict[str, Any]:
    """Declare every resource for these settings; returns the stack outputs."""
    # The server's own DKIM key: generated once, kept in state as a secret, published in DNS.
    dkim_key = tls.PrivateKey("dkim-key", algorithm="RSA", rsa_bits=2048)
    # mailroom's own SSH key for the remote commands, so a deploy needs no one's personal key.
    deploy_key = tls.PrivateKey("deploy-key", algorithm="ED25519")
    deploy_public = deploy_key.public_key_openssh.apply(str.strip)

    # The deploy key joins the admin's keys in the user-data and in the bundle's authorized_keys
    # (a public key: not a secret).
    with_deploy_key = deploy_public.apply(
        lambda key: dataclasses.replace(settings, ssh_public_keys=(*settings.ssh_public_keys, key))
    )
    user_data = with_deploy_key.apply(render_user_data)
    host = MailHost("mail", HostArgs.of(settings), user_data, deploy_public)

    relay = SesRelay("ses", RelayArgs.of(settings)) if settings.relay is Relay.SES else None
    tokens = relay.dkim_tokens if relay else pulumi.Output.from_input([])
    facts = pulumi.Output.all(host.ipv4, host.ipv6, dkim_key.public_key_pem, tokens).apply(
        lambda v: Facts(v[0], v[1], dkim_public_key_body(v[2]), tuple(v[3]))
    )

    from infra.cloud.zone import MailZone  # imported here: pulumi_cloudflare takes seconds to import

    zone = MailZone("zone", settings, facts)

    if settings.relay is Relay.SES and relay is not None:
        relay_user, relay_password = relay.smtp_username, relay.smtp_password
        endpoint = relay.endpoint
    elif settings.relay is Relay.SMTP2GO:
        relay_user = pulumi.Output.from_input(settings.smtp2go_username)
        relay_password = pulumi.Output.secret(settings.smtp2go_password.reveal())
        endpoint = SMTP2GO_HOST
    else:
        relay_user = relay_password = pulumi.Output.from_input("")
        endpoint = ""

    webmail_key = (
        random.RandomPassword("webmail-des-key", length=WEBMAIL_KEY_LENGTH, special=False).result
        if settings.webmail
        else pulumi.Output.from_input("")
    )
    # The off-site backup's bucket and key (declared after the relay: the lab's SES stand-in
    # reads the first IAM policy and access key, the relay's).
    backup = MailBackup("backup", BackupArgs.of(settings)) if settings.backup_target is not BackupTarget.NONE else None
    no_backup = pulumi.Output.from_input("")
    secrets = pulumi.Output.all(
        dkim_private_key_pem=dkim_key.private_key_pem,
        relay_username=relay_user,
        relay_password=relay_password,
        certbot_token=zone.certbot_token,
        webmail_des_key=webmail_key,
        backup_access_key_id=backup.access_key_id if backup else no_backup,
        backup_secret_access_key=backup.secret_access_key if backup else no_backup,
        backup_password=backup.password if backup else no_backup,
    ).apply(lambda v: ServerSecrets(**v))
    Provisioning(
        "server",
        host=host.ipv4,
        user=settings.admin_user,
        private_key=pulumi.Output.secret(deploy_key.private_key_openssh),
        server_id=host.droplet.id,
        volume_attachment_id=host.attachment.id,
        bundle=pulumi.Output.all(with_deploy_key, secrets, facts).apply(lambda v: render_bundle(v[0], v[1], v[2])),
        certificate_names=certificate_names(settings),
        depends_on=[host],
    )

    outputs: dict[str, Any] = {
        "mailHost": settings.host_name,
        "ipv4": host.ipv4,
        "ipv6": host.ipv6,
        "nameServers": zone.name_servers,
        "smtpRelayEndpoint": endpoint,
    }
    # The SMTP password and certbot's token reach the server in the bundle and nothing outside
    # needs them: they stay in the state (secret), never in the outputs.
    if relay is not None:
        outputs["sesSmtpUsername"] = relay.smtp_username
        # What `python -m infra check` expects at SES's DKIM names (public: they are in DNS).
        outputs["sesDkimTokens"] = relay.dkim_tokens
    if backup is not None:
        # Where the backup is, as restic names it (not a secret; the key and password are).
        outputs["backupRepository"] = backup.bucket.apply(lambda _: backups.repository(settings))
    return outputs


def main() -> None:
    """Entry point for `pulumi up`: read settings (refusing bad ones first), then declare."""
    for name, value in build(settings_from_config()).items():
        pulumi.export(name, value)
