"""The resource graph the program declares, evaluated under Pulumi mocks (no cloud is called)."""

from __future__ import annotations

import dataclasses
import json
from itertools import product
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.cloud.host import ANYWHERE
from infra.core.dns import Record, records
from infra.core.facts import APPLY_PATH, BOOTSTRAP_MARKER, PROJECT_DIR
from infra.core.facts import ses_smtp_endpoint as smtp_endpoint
from infra.core.settings import SettingsError
from infra.core.user_data import render_user_data
from infra.tools.rehearsal import DO_ACCOUNT_EMAIL, OfflineRun
from tests.conftest import offline_run

DROPLET = "digitalocean:index/droplet:Droplet"
FIREWALL = "digitalocean:index/firewall:Firewall"
VOLUME = "digitalocean:index/volume:Volume"
COMMAND = "command:remote:Command"
DNS_RECORD = "cloudflare:index/dnsRecord:DnsRecord"

COMBINATIONS = [
    pytest.param(stack, relay, spam, id=f"{stack}-{relay}-{spam}")
    for stack, relay, spam in product(("dev", "prod"), ("ses", "smtp2go", "direct"), ("spamassassin", "rspamd"))
]


def run_for(stack: str, relay: str, spam: str) -> OfflineRun:
    extra = {"smtp2goUsername": "mailroom-user"} if relay == "smtp2go" else {}
    return offline_run(stack, relay=relay, spamFilter=spam, **extra)


def secret_values(run: OfflineRun) -> list[str]:
    """Every secret the run produced or was given, as the server would receive them."""
    values = [b.password_hash.reveal() for b in run.settings.mailboxes]
    values.append(run.settings.smtp2go_password.reveal())
    for r in run.resources:
        for key, value in r.state.items():
            if key in (
                "privateKeyPem",
                "privateKeyOpenssh",
                "secret",
                "secretKey",
                "sesSmtpPasswordV4",
                "value",
                "result",
            ):
                values.append(value)
    return [v for v in values if isinstance(v, str) and len(v) >= 8]


@pytest.mark.parametrize(("stack", "relay", "spam"), COMBINATIONS)
def test_droplet_is_named_by_the_fqdn_and_never_replaced_for_bootstrap_changes(
    stack: str, relay: str, spam: str
) -> None:
    run = run_for(stack, relay, spam)
    droplet = run.one(DROPLET)
    assert droplet.inputs["name"] == run.settings.host_name
    assert droplet.inputs["ipv6"] is True and droplet.inputs["monitoring"] is True
    assert droplet.inputs["backups"] is run.settings.backups
    assert (droplet.inputs["region"], droplet.inputs["size"], droplet.inputs["image"]) == (
        run.settings.region,
        run.settings.droplet_size,
        run.settings.image.value,
    )
    assert {"userData", "image", "sshKeys"} <= set(droplet.ignore_changes)
    # Tags are account-wide: one per host, so another stack's destroy never untags this one.
    assert droplet.inputs["tags"] == [f"mailroom-{run.settings.host_name.replace('.', '-')}"]
    assert run.one("digitalocean:index/tag:Tag").inputs["name"] == droplet.inputs["tags"][0]


@pytest.mark.parametrize(("stack", "relay", "spam"), COMBINATIONS)
def test_firewall_opens_exactly_the_mail_ports_and_ssh_only_to_admins(stack: str, relay: str, spam: str) -> None:
    run = run_for(stack, relay, spam)
    rules = run.one(FIREWALL).inputs["inboundRules"]
    opened = {(r["protocol"], r.get("portRange", ""), tuple(r["sourceAddresses"])) for r in rules}
    # Written out, not read from the code under test: SMTP, submission (STARTTLS and TLS), IMAPS,
    # ManageSieve, and HTTP/HTTPS (ACME, MTA-STS, autoconfig, webmail); no plain IMAP or POP3.
    mail_ports = {25, 465, 587, 993, 4190, 80, 443}
    expected: set[tuple[str, str, tuple[str, ...]]] = {("tcp", str(p), ANYWHERE) for p in mail_ports}
    expected |= {("tcp", "22", run.settings.admin_cidrs), ("icmp", "", ANYWHERE)}
    assert opened == expected
    ssh_sources = [s for r in rules if r.get("portRange") == "22" for s in r["sourceAddresses"]]
    assert not set(ssh_sources) & set(ANYWHERE)
    outbound = {(r["protocol"], tuple(r["destinationAddresses"])) for r in run.one(FIREWALL).inputs["outboundRules"]}
    assert outbound == {("tcp", ANYWHERE), ("udp", ANYWHERE), ("icmp", ANYWHERE)}
    assert run.one(FIREWALL).inputs["dropletIds"] == [float(run.one(DROPLET).id)]


def test_ssh_from_anywhere_only_with_the_opt_in() -> None:
    run = offline_run("dev", adminCidrs=["0.0.0.0/0", "::/0"], allowSshFromAnywhere=True)
    ssh = next(r for r in run.one(FIREWALL).inputs["inboundRules"] if r.get("portRange") == "22")
    assert ssh["sourceAddresses"] == ["0.0.0.0/0", "::/0"]
    with pytest.raises(SettingsError, match=r"adminCidrs\[0\]: '0.0.0.0/0' is open to the whole internet"):
        offline_run("dev", adminCidrs=["0.0.0.0/0"])


@pytest.mark.parametrize("stack", ["dev", "prod"])
def test_mail_volume_is_protected_retained_and_attached(stack: str) -> None:
    run = offline_run(stack)
    volume = run.one(VOLUME)
    assert volume.protect and volume.retain_on_delete
    assert volume.inputs["size"] == run.settings.volume_size_gb
    assert volume.inputs["region"] == run.settings.region
    attachment = run.one("digitalocean:index/volumeAttachment:VolumeAttachment")
    assert {volume.urn, run.one(DROPLET).urn} <= set(attachment.dependencies)
    assert isinstance(attachment.inputs["dropletId"], float)  # an int on the wire, as DigitalOcean wants


@pytest.mark.parametrize(("stack", "relay", "spam"), COMBINATIONS)
def test_user_data_holds_no_secret_and_is_the_rendered_bootstrap(stack: str, relay: str, spam: str) -> None:
    run = run_for(stack, relay, spam)
    user_data = run.one(DROPLET).inputs["userData"]
    assert "userData" not in run.one(DROPLET).secret_inputs
    for secret in secret_values(run):
        assert secret not in user_data
    deploy_key = run.named("deploy-key").state["publicKeyOpenssh"].strip()
    with_deploy_key = dataclasses.replace(run.settings, ssh_public_keys=(*run.settings.ssh_public_keys, deploy_key))
    assert user_data == render_user_data(with_deploy_key)
    assert yaml.safe_load(user_data)["fqdn"] == run.settings.host_name


@pytest.mark.parametrize("stack", ["dev", "prod"])
def test_iam_user_may_only_send_raw_mail_as_the_domain(stack: str) -> None:
    run = offline_run(stack)
    policy = json.loads(run.named("ses-smtp-send").inputs["policy"])
    identity = run.one("aws:sesv2/emailIdentity:EmailIdentity")
    config_set = run.one("aws:sesv2/configurationSet:ConfigurationSet")
    (statement,) = policy["Statement"]
    assert statement["Effect"] == "Allow"
    assert statement["Action"] == "ses:SendRawEmail"
    # Every identity of the account in the SES region: in the sandbox SES authorises against the
    # recipient's identity too. The sender is limited by the From condition.
    region_identities = identity.state["arn"].replace(f"identity/{run.settings.domain}", "identity/*")
    assert region_identities.startswith("arn:aws:ses:") and region_identities.endswith(":identity/*")
    assert statement["Resource"] == [region_identities, config_set.state["arn"]]
    domain = run.settings.domain
    assert statement["Condition"] == {"StringLike": {"ses:FromAddress": [f"*@{domain}", f"*@*.{domain}"]}}
    assert identity.inputs["emailIdentity"] == run.settings.domain


@pytest.mark.parametrize("stack", ["dev", "prod"])
def test_ses_uses_its_own_region_mail_from_and_notifies_bounces(stack: str) -> None:
    run = offline_run(stack)
    provider = run.named("ses-aws")
    assert provider.inputs["region"] == run.settings.ses_region
    for r in run.resources:
        if r.type.startswith("aws:") and r.name.startswith("ses-"):
            assert r.provider.startswith(provider.urn), f"{r.name} does not use the SES region's provider"
    mail_from = run.one("aws:sesv2/emailIdentityMailFromAttributes:EmailIdentityMailFromAttributes")
    assert mail_from.inputs["mailFromDomain"] == f"bounce.{run.settings.domain}"
    destination = run.one("aws:sesv2/configurationSetEventDestination:ConfigurationSetEventDestination")
    events = destination.inputs["eventDestination"]
    assert {"BOUNCE", "COMPLAINT"} <= set(events["matchingEventTypes"])
    assert events["snsDestination"]["topicArn"] == run.one("aws:sns/topic:Topic").state["arn"]
    subscription = run.one("aws:sns/topicSubscription:TopicSubscription")
    assert (subscription.inputs["protocol"], subscription.inputs["endpoint"]) == ("email", run.settings.alert_email)
    config_set = run.one("aws:sesv2/configurationSet:ConfigurationSet")
    assert config_set.inputs["reputationOptions"]["reputationMetricsEnabled"] is True
    assert run.outputs["smtpRelayEndpoint"] == smtp_endpoint(run.settings.ses_region)


@pytest.mark.parametrize("relay", ["smtp2go", "direct"])
def test_other_relays_declare_nothing_at_aws(relay: str) -> None:
    run = run_for("dev", relay, "spamassassin")
    # The backup's bucket is at AWS too (backupTarget s3); nothing else is.
    at_aws = [r.name for r in run.resources if r.type.startswith(("aws:", "pulumi:providers:aws"))]
    assert at_aws and all(name.startswith("backup-") for name in at_aws)
    assert "sesSmtpPassword" not in run.outputs


@pytest.mark.parametrize("stack", ["dev", "prod"])
def test_credentials_are_secret_everywhere(stack: str) -> None:
    run = offline_run(stack)
    # Nothing outside needs the SMTP password or certbot's token: the bundle carries them, the
    # state keeps them (secret), no output shows them, even as a secret.
    assert not {"sesSmtpPassword", "certbotToken"} & set(run.outputs)
    assert not run.secret_outputs
    for name, value in run.outputs.items():
        if name not in run.secret_outputs:
            for secret in secret_values(run):
                assert secret not in json.dumps(value), f"output {name} shows a secret in plain text"
    assert "sesSmtpPasswordV4" in run.named("ses-smtp-key").additional_secret_outputs
    assert "privateKeyPem" in run.named("dkim-key").additional_secret_outputs
    assert run.named("dkim-key").inputs == {"algorithm": "RSA", "rsaBits": 2048.0}
    assert "value" in run.one("cloudflare:index/apiToken:ApiToken").additional_secret_outputs


@pytest.mark.parametrize("stack", ["dev", "prod"])
def test_certbot_token_may_edit_dns_in_this_zone_only(stack: str) -> None:
    run = offline_run(stack)
    (policy,) = run.one("cloudflare:index/apiToken:ApiToken").inputs["policies"]
    assert policy["effect"] == "allow"
    assert [g["id"] for g in policy["permissionGroups"]] == ["4755a26eedb94da69e1066d98aa820be"]  # DNS Write
    zone_id = run.of_type(DNS_RECORD)[0].inputs["zoneId"]
    assert json.loads(policy["resources"]) == {f"com.cloudflare.api.account.zone.{zone_id}": "*"}
    # And only from the server, which alone runs certbot (a leaked token is useless elsewhere).
    droplet = run.one(DROPLET).state
    condition = run.one("cloudflare:index/apiToken:ApiToken").inputs["condition"]
    assert condition == {"requestIp": {"ins": [f"{droplet['ipv4Address']}/32", f"{droplet['ipv6Address']}/128"]}}


def as_declared(record: Record) -> dict[str, Any]:
    """What a DnsRecord resource must carry for this record."""
    base: dict[str, Any] = {"name": record.name, "type": record.type, "ttl": float(record.ttl), "proxied": False}
    if record.type == "SRV":
        data = {"priority": record.priority, "weight": record.weight, "port": record.port, "target": record.value}
        return base | {
            "data": {k: float(v) if isinstance(v, int) else v for k, v in data.items()},
            "priority": float(record.priority or 0),
        }
    if record.type == "CAA":
        return base | {"data": {"flags": float(record.flags or 0), "tag": record.tag, "value": record.value}}
    if record.type == "MX":
        return base | {"content": record.value, "priority": float(record.priority or 0)}
    return base | {"content": record.rdata() if record.type == "TXT" else record.value}


@pytest.mark.parametrize(("stack", "relay", "spam"), COMBINATIONS)
def test_cloudflare_records_are_exactly_the_record_list(stack: str, relay: str, spam: str) -> None:
    run = run_for(stack, relay, spam)
    expected = {f"zone-{r.key}": as_declared(r) for r in records(run.settings, run.facts()) if r.hosted}
    declared = {
        r.name: {
            k: v for k, v in r.inputs.items() if k in ("name", "type", "ttl", "proxied", "content", "data", "priority")
        }
        for r in run.of_type(DNS_RECORD)
    }
    assert declared == expected
    for r in run.of_type(DNS_RECORD):
        if r.inputs["type"] == "TXT":
            strings = [s for s in r.inputs["content"].split('"') if s.strip()]
            assert all(len(s.encode()) <= 255 for s in strings)


def commands(run: OfflineRun) -> dict[str, Any]:
    return {r.name.removeprefix("server-"): r for r in run.of_type(COMMAND)}


@pytest.mark.parametrize(("stack", "relay", "spam"), COMBINATIONS)
def test_remote_commands_wait_for_bootstrap_and_carry_secrets_only_on_stdin(stack: str, relay: str, spam: str) -> None:
    run = run_for(stack, relay, spam)
    steps = commands(run)
    assert list(steps) == [
        "wait-for-bootstrap",
        "mail-volume",
        "install-apply-script",
        "apply-bundle",
        "issue-certificate",
    ]
    wait, volume, install, apply, issue = steps.values()
    droplet = run.one(DROPLET)
    attachment = run.one("digitalocean:index/volumeAttachment:VolumeAttachment")
    assert {droplet.urn, attachment.urn} <= set(wait.dependencies)
    assert "cloud-init status --wait" in wait.inputs["create"] and BOOTSTRAP_MARKER in wait.inputs["create"]
    assert wait.urn in volume.dependencies and volume.urn in install.dependencies
    assert install.urn in apply.dependencies and apply.urn in issue.dependencies
    assert issue.inputs["triggers"][1:] == [
        run.settings.host_name,
        f"mta-sts.{run.settings.domain}",
        f"autoconfig.{run.settings.domain}",
    ]
    assert install.inputs["stdin"].startswith("#!") and APPLY_PATH in install.inputs["create"]
    for step in steps.values():
        assert step.inputs["connection"]["host"] == droplet.state["ipv4Address"]
        assert step.inputs["connection"]["user"] == run.settings.admin_user
        assert "connection" in step.secret_inputs  # it holds the deploy key
        for secret in secret_values(run):
            assert secret not in step.inputs["create"]
    bundle = json.loads(apply.inputs["stdin"])
    assert {"stdin", "triggers"} <= apply.secret_inputs
    assert apply.inputs["logging"] == "none"
    assert {"stdout", "stderr"} <= set(apply.additional_secret_outputs)
    hashes = [b.password_hash.reveal() for b in run.settings.mailboxes]
    assert all(h in apply.inputs["stdin"] for h in hashes)
    secret_files = [f for f in bundle["files"] if f["secret"]]
    assert secret_files and all(f["mode"] & 0o077 == 0 or f["group"] != "root" for f in secret_files)


def test_remote_commands_rerun_only_when_what_they_carry_changes() -> None:
    base = commands(offline_run("dev"))
    same = commands(offline_run("dev", messageSizeLimitMb=25))  # the default, spelled out
    changed = commands(offline_run("dev", messageSizeLimitMb=40))
    for name in base:
        assert base[name].inputs["triggers"] == same[name].inputs["triggers"], name
    assert base["apply-bundle"].inputs["triggers"] != changed["apply-bundle"].inputs["triggers"]
    for name in ("wait-for-bootstrap", "mail-volume", "install-apply-script", "issue-certificate"):
        assert base[name].inputs["triggers"] == changed[name].inputs["triggers"], name
    assert base["wait-for-bootstrap"].inputs["triggers"] == [base["wait-for-bootstrap"].inputs["triggers"][0]]


def test_stack_outputs_are_few_and_named_for_users() -> None:
    run = offline_run("dev")
    assert set(run.outputs) == {
        "mailHost",
        "ipv4",
        "ipv6",
        "nameServers",
        "smtpRelayEndpoint",
        "sesSmtpUsername",
        "sesDkimTokens",
        "backupRepository",
    }
    assert run.outputs["backupRepository"] == "s3:https://s3.us-east-1.amazonaws.com/mail-example-net-mail-backup"
    assert run.outputs["mailHost"] == "mail.example.net"
    # What `check` expects at SES's DKIM names: the identity's tokens, as the zone publishes them.
    assert list(run.outputs["sesDkimTokens"]) == list(run.facts().ses_dkim_tokens) != []
    assert run.outputs["ipv4"] == run.one(DROPLET).state["ipv4Address"]


def test_bad_settings_are_refused_before_any_resource_is_declared() -> None:
    from infra.tools import rehearsal as offline

    before = len(offline._GENERATED)
    with pytest.raises(SettingsError, match="relay: 'pigeon' is not accepted"):
        offline.run_program("dev", {"relay": "pigeon", "image": "debian-12-x64"})
    assert len(offline._GENERATED) == before


def test_every_resource_urn_is_unique_and_every_child_has_a_component_parent() -> None:
    run = offline_run("prod")
    urns = [r.urn for r in run.resources]
    assert len(urns) == len(set(urns))
    components = {r.urn for r in run.resources if not r.custom}
    for r in run.resources:
        # The keys and the webmail secret belong to the whole program, not to one component.
        if r.custom and r.type not in ("tls:index/privateKey:PrivateKey", "random:index/randomPassword:RandomPassword"):
            assert r.parent in components, f"{r.type} {r.name} is declared outside a component"


def test_remote_steps_come_out_in_dependency_order_with_their_stdin() -> None:
    from infra.tools.rehearsal import remote_steps

    run = offline_run("dev")
    steps = remote_steps(run)
    names = [
        "server-wait-for-bootstrap",
        "server-mail-volume",
        "server-install-apply-script",
        "server-apply-bundle",
        "server-issue-certificate",
    ]
    assert [s.name for s in steps] == names
    assert steps[3].stdin == commands(run)["apply-bundle"].inputs["stdin"]
    assert "stdin=yes" in repr(steps[3]) and "BLF-CRYPT" not in repr(steps[3])
    assert steps[1].delete is not None and "systemctl stop" in steps[1].delete


MONITOR_ALERT = "digitalocean:index/monitorAlert:MonitorAlert"
SSH_KEY = "digitalocean:index/sshKey:SshKey"
EMAIL_IDENTITY = "aws:sesv2/emailIdentity:EmailIdentity"
GET_ZONE = "cloudflare:index/getZone:getZone"
SECOND_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILRlQIGEvEOt95qaWK02gQb9h2JUDYgZ0psVgYrZXbGe carol@example.org"


@pytest.mark.parametrize(
    ("stack", "overrides", "alert_email"),
    [
        # DigitalOcean sends alerts only to addresses verified on its account: by default the
        # account's own, as the API answers it, whatever alertEmail says.
        ("dev", {}, DO_ACCOUNT_EMAIL),
        ("prod", {}, DO_ACCOUNT_EMAIL),
        ("dev", {"alertEmail": "pager@example.com"}, DO_ACCOUNT_EMAIL),
        ("dev", {"doAlertEmail": "Pager@Example.com"}, "pager@example.com"),
    ],
)
def test_monitoring_alerts_on_cpu_memory_and_disk_reach_the_alert_email(
    stack: str, overrides: dict[str, Any], alert_email: str
) -> None:
    run = offline_run(stack, **overrides)
    alerts = {a.inputs["type"]: a for a in run.of_type(MONITOR_ALERT)}
    assert sorted(alerts) == [
        "v1/insights/droplet/cpu",
        "v1/insights/droplet/disk_utilization_percent",
        "v1/insights/droplet/memory_utilization_percent",
    ]
    assert len(run.of_type(MONITOR_ALERT)) == 3
    droplet = run.one(DROPLET)
    for metric, alert in alerts.items():
        assert alert.inputs["alerts"] == {"emails": [alert_email]}, metric
        assert alert.inputs["entities"] == [droplet.id], metric
        assert alert.inputs["compare"] == "GreaterThan" and alert.inputs["enabled"] is True, metric
        assert 50 <= alert.inputs["value"] < 100, metric
        assert alert.inputs["description"].startswith(f"{run.settings.host_name}: "), metric


def test_only_the_stacks_own_deploy_key_is_registered_and_the_admins_keys_reach_the_server_by_user_data() -> None:
    # DigitalOcean refuses a key already on the account (422), as an admin's key often is: two
    # stacks sharing the admins' keys must not register them twice.
    first = offline_run("dev").settings.ssh_public_keys[0]
    runs = [offline_run("dev", sshPublicKeys=[first, SECOND_KEY]), offline_run("prod", sshPublicKeys=[first])]
    registered = []
    for run in runs:
        (key,) = run.of_type(SSH_KEY)
        deploy_public = run.named("deploy-key").state["publicKeyOpenssh"].strip()
        assert key.inputs["publicKey"] == deploy_public
        assert key.inputs["name"] == f"mailroom deploy key of {run.settings.host_name}"
        droplet = run.one(DROPLET)
        assert droplet.inputs["sshKeys"] == [key.state["fingerprint"]]
        assert key.urn in droplet.dependencies
        authorized = yaml.safe_load(droplet.inputs["userData"])["users"][-1]["ssh_authorized_keys"]
        assert authorized == [*run.settings.ssh_public_keys, deploy_public]
        registered.append(key.inputs["publicKey"])
    # (Each stack's deploy key is its own tls.PrivateKey; the offline runs share one process's keys.)
    assert first not in registered and SECOND_KEY not in registered


def test_every_apply_converges_the_admins_authorized_keys_to_the_settings_and_the_deploy_key() -> None:
    """cloud-init writes the keys once; the bundle carries them on every apply, so a key taken
    out of sshPublicKeys is taken off the server by the next `pulumi up`."""
    first = offline_run("dev").settings.ssh_public_keys[0]
    for keys in ([first, SECOND_KEY], [first]):
        run = offline_run("dev", sshPublicKeys=keys)
        deploy_public = run.named("deploy-key").state["publicKeyOpenssh"].strip()
        files = json.loads(commands(run)["apply-bundle"].inputs["stdin"])["files"]
        [entry] = [f for f in files if f["path"] == "/home/mailadmin/.ssh/authorized_keys"]
        assert (entry["mode"], entry["owner"], entry["group"], entry["secret"]) == (
            0o600,
            "mailadmin",
            "mailadmin",
            False,
        )
        lines = [line for line in entry["content"].splitlines() if not line.startswith("#")]
        assert lines == [*keys, deploy_public]


@pytest.mark.parametrize("stack", ["dev", "prod"])
def test_cloudflare_zone_is_looked_up_by_the_domain_name(stack: str) -> None:
    from pulumi.runtime.mocks import MockCallArgs

    from infra.tools.rehearsal import NAME_SERVERS, StandInCloud

    run = offline_run(stack)
    (lookup,) = run.invokes(GET_ZONE)
    assert lookup.args["filter"]["name"] == run.settings.domain
    assert lookup.args["filter"].get("match", "all") == "all"
    # Every record goes into the zone that lookup answered, and its name servers are the output.
    answer, _ = StandInCloud().call(MockCallArgs(GET_ZONE, lookup.args, ""))
    assert {r.inputs["zoneId"] for r in run.of_type(DNS_RECORD)} == {answer["zoneId"]}
    assert run.outputs["nameServers"] == NAME_SERVERS


def strings_in(value: Any) -> list[str]:
    """Every string inside an input, however deeply nested."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings_in(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings_in(v)]
    return []


def server_secrets(run: OfflineRun) -> dict[str, str]:
    """The credentials the server gets, as the stand-in clouds generated them."""
    found = {
        "DKIM private key": run.named("dkim-key").state["privateKeyPem"],
        "certbot token": run.one("cloudflare:index/apiToken:ApiToken").state["value"],
    }
    if run.settings.relay.value == "ses":
        found["SES SMTP password"] = run.named("ses-smtp-key").state["sesSmtpPasswordV4"]
    if run.settings.relay.value == "smtp2go":
        found["SMTP2GO password"] = run.settings.smtp2go_password.reveal()
    return found


@pytest.mark.parametrize(("stack", "relay"), list(product(("dev", "prod"), ("ses", "smtp2go"))))
def test_server_credentials_reach_the_server_only_on_the_apply_steps_secret_stdin(stack: str, relay: str) -> None:
    run = offline_run(stack, relay=relay, **({"smtp2goUsername": "mailroom-user"} if relay == "smtp2go" else {}))
    found = server_secrets(run)
    assert len(found) == 3 and all(len(v) >= 16 for v in found.values())
    apply = commands(run)["apply-bundle"]
    assert "stdin" in apply.secret_inputs
    contents = [f["content"] for f in json.loads(apply.inputs["stdin"])["files"]]
    for what, secret in found.items():
        assert any(secret in c for c in contents), f"the {what} is not in the bundle"
        # The secret itself, and each line of a multi-line one (a PEM re-encoded elsewhere).
        needles = [secret] + [line for line in secret.splitlines() if len(line) >= 16 and "-----" not in line]
        for r in run.resources:
            for key, value in r.inputs.items():
                if r is apply and key == "stdin":
                    continue
                for text in strings_in(value):
                    assert not any(n in text for n in needles), f"the {what} is in {r.name}'s {key}"
    user_data = run.one(DROPLET).inputs["userData"]
    for step in commands(run).values():
        for what, secret in found.items():
            assert secret not in step.inputs["create"] and secret not in user_data, what


@pytest.mark.parametrize("stack", ["dev", "prod"])
def test_ses_identity_uses_easy_dkim_and_its_three_cnames_are_on_cloudflare(stack: str) -> None:
    run = offline_run(stack)
    identity = run.one(EMAIL_IDENTITY)
    signing = identity.inputs["dkimSigningAttributes"]
    # Easy DKIM: SES makes and rotates the keys; no BYODKIM private key or selector is given.
    assert "domainSigningPrivateKey" not in signing and "domainSigningSelector" not in signing
    assert signing == {"nextSigningKeyLength": "RSA_2048_BIT"}
    assert "dkimSigningAttributes" not in identity.secret_inputs
    tokens = identity.state["dkimSigningAttributes"]["tokens"]
    assert len(tokens) == 3
    domain = run.settings.domain
    ses_cnames = {
        r.inputs["name"]: r.inputs["content"]
        for r in run.of_type(DNS_RECORD)
        if r.inputs["type"] == "CNAME" and r.inputs["content"].endswith(".dkim.amazonses.com")
    }
    assert ses_cnames == {f"{t}._domainkey.{domain}": f"{t}.dkim.amazonses.com" for t in tokens}
    for relay in ("smtp2go", "direct"):
        other = run_for(stack, relay, run.settings.spam_filter.value)
        assert not [r for r in other.of_type(DNS_RECORD) if "amazonses" in str(r.inputs.get("content"))]


def engine_view(stack_text: str, tmp_path: Path, stack: str = "leaky") -> tuple[dict[str, str], list[str]]:
    """What the Pulumi engine hands the program for a stack file: config strings, and the keys it
    decrypted (those the file holds as `secure:`); encrypted values decrypt to stand-ins here."""
    from infra.core.stack import stack_config
    from infra.tools.rehearsal import engine_config

    (tmp_path / f"Pulumi.{stack}.yaml").write_text(stack_text)
    document = yaml.safe_load(stack_text)["config"]
    secure = [k for k, v in document.items() if isinstance(v, dict) and "secure" in v]
    return engine_config(stack_config(stack, project_dir=tmp_path)), secure


def dev_config() -> tuple[dict[str, str], list[str]]:
    from infra.core.stack import stack_config
    from infra.tools.rehearsal import engine_config

    return engine_config(stack_config("dev")), ["mailroom:passwordHashes"]


def test_the_real_entry_declares_the_stack_from_the_engines_config() -> None:
    from infra.tools.rehearsal import run_entry

    config, secret = dev_config()
    entry = run_entry("dev", config, secret)
    assert entry.error is None
    assert sorted((r.type, r.name) for r in entry.resources) == sorted(
        (r.type, r.name) for r in offline_run("dev").resources
    )


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"mailroom:relay": "pigeon"}, "relay: 'pigeon' is not accepted; accepted: ses, smtp2go, direct"),
        ({"mailroom:volumeSizeGb": "lots"}, "volumeSizeGb: 'lots' is not an integer"),
        ({"mailroom:backups": "sometimes"}, "backups: 'sometimes'"),
        ({"mailroom:relayy": "ses"}, "relayy: not a mailroom setting; did you mean 'relay'?"),
        ({"mailroom:hostName": "mail.example.com"}, "hostName: 'mail.example.com' is outside the domain example.net"),
        ({"mailroom:adminCidrs": '["0.0.0.0/0"]'}, "adminCidrs[0]: '0.0.0.0/0' is open to the whole internet"),
    ],
)
def test_the_real_entry_refuses_bad_settings_before_declaring_anything(given: dict[str, str], message: str) -> None:
    from infra.tools import rehearsal as offline

    config, secret = dev_config()
    before = dict(offline._GENERATED)
    entry = offline.run_entry("dev", config | given, secret)
    assert isinstance(entry.error, SettingsError)
    assert message in str(entry.error)
    assert entry.resources == []
    assert before == offline._GENERATED


def test_the_real_entry_refuses_a_secret_stored_in_plain_text(tmp_path: Path) -> None:
    from infra.tools.rehearsal import run_entry

    dev = (PROJECT_DIR / "Pulumi.dev.yaml").read_text()
    relay = "  mailroom:relay: smtp2go\n  mailroom:smtp2goUsername: mailroom-user\n"
    encrypted = "  mailroom:passwordHashes:\n    secure: v1:AAAABBBBCCCCDDDD\n"
    # The password typed into the stack file instead of `pulumi config set --secret`.
    leaked = dev + relay + encrypted + "  mailroom:smtp2goPassword: hunter2hunter2\n"
    config, secure = engine_view(leaked, tmp_path)
    assert secure == ["mailroom:passwordHashes"] and config["mailroom:smtp2goPassword"] == "hunter2hunter2"
    entry = run_entry("leaky", config, secure)
    assert isinstance(entry.error, SettingsError)
    assert str(entry.error).count("\n  - ") == 1
    assert (
        "smtp2goPassword: stored in plain text in the stack file; set it again with "
        "pulumi config set --secret smtp2goPassword"
    ) in str(entry.error)
    assert "hunter2" not in str(entry.error)
    assert entry.resources == []

    # The same password set with --secret: the entry accepts it and declares the stack.
    config, secure = engine_view(
        dev + relay + encrypted + "  mailroom:smtp2goPassword:\n    secure: v1:EEEE\n", tmp_path
    )
    config["mailroom:smtp2goPassword"] = "hunter2hunter2"  # what the engine decrypts it to
    entry = run_entry("leaky", config, [*secure])
    assert entry.error is None and entry.resources
