"""What the real providers accept: the rules the program keeps, each with the source of its fact.

The program only ever runs here under mocks, which accept anything. Each test below states one
thing a real `pulumi up` would refuse or get wrong (DigitalOcean's, AWS's or Cloudflare's API, or
the provider), the source of that fact in a one-line comment, and checks the program's recorded
inputs against it. The last tests check every input of the main resources against the providers'
published schemas (an extract in tests/unit/data/provider_schemas.json).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from pathlib import Path
from typing import Any

import pytest

from infra.cloud.relay import CONFIGURATION_SET_NAME_LIMIT, IAM_USER_NAME_LIMIT, TOPIC_NAME_LIMIT, bounded_name
from infra.cloud.zone import ZoneNotFoundError
from infra.core.facts import MAIL_DIR
from infra.core.user_data import mount_unit
from infra.tools import rehearsal
from infra.tools.rehearsal import DO_ACCOUNT_EMAIL, Declared, OfflineRun, run_program
from tests.conftest import offline_run

DROPLET = "digitalocean:index/droplet:Droplet"
ATTACHMENT = "digitalocean:index/volumeAttachment:VolumeAttachment"
COMMAND = "command:remote:Command"
MONITOR_ALERT = "digitalocean:index/monitorAlert:MonitorAlert"
SSH_KEY = "digitalocean:index/sshKey:SshKey"
DNS_RECORD = "cloudflare:index/dnsRecord:DnsRecord"
SCHEMAS = Path(__file__).parent / "data" / "provider_schemas.json"


def command(run: OfflineRun, step: str) -> Declared:
    return run.named(f"server-{step}")


# --- DigitalOcean ----------------------------------------------------------------------------


def test_monitoring_alerts_go_to_an_address_the_account_has_verified() -> None:
    # DO monitoring API: POST /v2/monitoring/alerts answers 400 "email is not verified" for an
    # address not verified on the account; godo's get_account returns the account's own e-mail.
    run = offline_run("dev")
    assert run.invokes("digitalocean:index/getAccount:getAccount"), "the account's address is never looked up"
    for alert in run.of_type(MONITOR_ALERT):
        assert alert.inputs["alerts"]["emails"] == [DO_ACCOUNT_EMAIL]
    chosen = offline_run("dev", doAlertEmail="noc@example.com")
    assert not chosen.invokes("digitalocean:index/getAccount:getAccount")
    assert {tuple(a.inputs["alerts"]["emails"]) for a in chosen.of_type(MONITOR_ALERT)} == {("noc@example.com",)}


def test_no_admin_key_is_registered_on_the_account() -> None:
    # DO API POST /v2/account/keys: 422 "SSH Key is already in use on your account" for a key
    # already uploaded (by hand, or by the other stack, which shares the admins' keys).
    run = offline_run("dev")
    registered = {k.inputs["publicKey"] for k in run.of_type(SSH_KEY)}
    assert registered == {run.named("deploy-key").state["publicKeyOpenssh"].strip()}
    assert not registered & set(run.settings.ssh_public_keys)


def test_the_old_attachment_is_deleted_first_after_mail_stopped_on_the_old_droplet() -> None:
    # DO API: a volume is attached to at most one droplet ("volume is already attached"), so the
    # attachment replaced with a new droplet must go before its successor is created.
    run = offline_run("dev")
    attachment = run.one(ATTACHMENT)
    assert attachment.delete_before_replace
    # Pulumi deletes a delete-before-replace resource's dependents first when their inputs depend
    # on it (pkg/resource/deploy/step_generator.go, calculateDependentReplacements): the volume
    # step's triggers hold the attachment's id, so its delete runs on the old droplet first.
    volume = command(run, "mail-volume")
    assert attachment.id in volume.inputs["triggers"]
    assert attachment.urn in volume.dependencies
    delete = volume.inputs["delete"]
    assert delete.index("systemctl stop postfix.service dovecot.service") < delete.index(
        f"systemctl stop {mount_unit()}"
    )
    assert MAIL_DIR in volume.inputs["create"] and "mountpoint" in volume.inputs["create"]
    # The new droplet is created first (the default), so the old one still answers the delete.
    assert not run.one(DROPLET).delete_before_replace


@pytest.mark.parametrize(
    ("overrides", "policy"),
    [
        ({}, None),
        ({"backups": True}, {"plan": "weekly", "weekday": "SUN", "hour": 4}),
        ({"backups": True, "backupPlan": "daily"}, {"plan": "daily", "hour": 4}),
    ],
)
def test_backups_follow_the_plan_the_settings_promise(overrides: dict[str, Any], policy: dict[str, Any] | None) -> None:
    # pulumi_digitalocean.Droplet backup_policy: "If omitted and `backups` is `true`, the backup
    # plan will default to daily"; plan daily|weekly, hour one of 0, 4, 8, 12, 16, 20.
    droplet = offline_run("dev", **overrides).one(DROPLET)
    assert droplet.inputs["backups"] is bool(overrides.get("backups"))
    assert droplet.inputs.get("backupPolicy") == policy
    if policy:
        assert policy["hour"] in (0, 4, 8, 12, 16, 20)


def test_each_host_has_its_own_tag() -> None:
    # DO tags are account-wide; destroying a stack deletes its Tag resource, untagging every
    # resource of the account with that name.
    dev, prod = offline_run("dev"), offline_run("prod")
    tags = [r.one("digitalocean:index/tag:Tag").inputs["name"] for r in (dev, prod)]
    assert tags[0] != tags[1] and all(t.startswith("mailroom-") for t in tags)
    # DO API: tag names are letters, numbers, colons, dashes and underscores, up to 255.
    assert all(len(t) <= 255 and t.replace("-", "").replace("_", "").replace(":", "").isalnum() for t in tags)
    # The longest host name DNS allows (253) still makes a tag within the limit, and a distinct one.
    from infra.cloud.host import HostArgs

    longest = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    args = HostArgs.of(dev.settings)
    long_tags = {dataclasses.replace(args, host_name=name).tag for name in (longest, longest[:-1] + "e")}
    assert len(long_tags) == 2 and all(len(t) <= 255 for t in long_tags), long_tags


# --- pulumi-command ------------------------------------------------------------------------------


def test_no_remote_command_sends_its_previous_output_as_environment() -> None:
    # pulumi_command.remote.Command add_previous_output_in_env defaults to true: the output goes
    # out with SSH Setenv, which sshd refuses unless AcceptEnv allows it (a warning on every run).
    run = offline_run("dev")
    commands = run.of_type(COMMAND)
    assert len(commands) == 5
    for c in commands:
        assert c.inputs.get("addPreviousOutputInEnv") is False, c.name


# --- Amazon SES and IAM ------------------------------------------------------------------------


def statement(run: OfflineRun) -> dict[str, Any]:
    (only,) = json.loads(run.named("ses-smtp-send").inputs["policy"])["Statement"]
    assert isinstance(only, dict)
    return only


def test_the_smtp_user_may_send_to_sandbox_recipients() -> None:
    # SES developer guide, "Controlling access": in the sandbox SendRawEmail is also authorised
    # against each recipient's verified identity, so identity/<domain> alone gives 554 Access denied.
    run = offline_run("dev")
    resources = statement(run)["Resource"]
    assert any(r.endswith(":identity/*") for r in resources)
    assert run.one("aws:sesv2/configurationSet:ConfigurationSet").state["arn"] in resources


@pytest.mark.parametrize(
    ("sender", "allowed"),
    [
        ("alice@example.net", True),
        ("root@mail.example.net", True),  # cron, certbot and fail2ban mail, and DSNs, from the host
        ("alice@example.com", False),
        ("alice@notexample.net", False),
        ("alice@example.net.evil.example", False),
    ],
)
def test_the_from_condition_allows_the_domain_and_its_hosts_only(sender: str, allowed: bool) -> None:
    # IAM StringLike: * matches any run of characters, and a list of values matches if any does.
    patterns = statement(offline_run("dev"))["Condition"]["StringLike"]["ses:FromAddress"]
    assert any(fnmatch.fnmatchcase(sender, p) for p in patterns) is allowed


def test_names_fit_the_apis_limits_for_any_domain() -> None:
    # IAM CreateUser: UserName up to 64; SES CreateConfigurationSet: up to 64 of letters, digits,
    # _ and -; SNS CreateTopic: up to 256. A domain may have 253 characters.
    longest = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 57, "org"])
    assert len(longest) == 253
    for prefix, limit, suffix in (
        ("mailroom-smtp-", IAM_USER_NAME_LIMIT, ""),
        ("mailroom-", CONFIGURATION_SET_NAME_LIMIT, ""),
        ("mailroom-", TOPIC_NAME_LIMIT, "-notices"),
    ):
        name = bounded_name(prefix, longest, limit, suffix)
        assert len(name) <= limit and name.startswith(prefix) and name.endswith(suffix)
        assert name.replace("-", "").isalnum()
        assert bounded_name(prefix, "b" + longest[1:], limit, suffix) != name, "two domains, one name"
    # A name that fits is left as it was, so existing stacks keep their resources.
    run = offline_run("dev")
    assert run.named("ses-smtp-user").inputs["name"] == "mailroom-smtp-example-net"
    assert (
        run.one("aws:sesv2/configurationSet:ConfigurationSet").inputs["configurationSetName"] == "mailroom-example-net"
    )
    assert run.one("aws:sns/topic:Topic").inputs["name"] == "mailroom-example-net-notices"


# --- Cloudflare --------------------------------------------------------------------------------


def test_the_zone_is_read_by_its_zone_id_and_a_missing_zone_stops_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # terraform-provider-cloudflare v5 data cloudflare_zone with filter: `zone_id` is set, `id`
    # may be empty (issues #5189, #6111: "use zone_id"); no match leaves zone_id empty.
    run = offline_run("dev")
    zone_id = run.invokes("cloudflare:index/getZone:getZone")
    assert zone_id
    assert {r.inputs["zoneId"] for r in run.of_type(DNS_RECORD)} == {"zone-" + rehearsal._token("example.net", 24)}

    answer = rehearsal.StandInCloud._answer

    def no_zone(self: rehearsal.StandInCloud, args: Any) -> dict[str, Any]:
        found = answer(self, args)
        return {**found, "zoneId": None, "id": None} if args.token == "cloudflare:index/getZone:getZone" else found

    monkeypatch.setattr(rehearsal.StandInCloud, "_answer", no_zone)
    with pytest.raises(ZoneNotFoundError, match=r"Cloudflare has no zone example\.net on the account"):
        run_program("dev", {"messageSizeLimitMb": 24})


def test_mx_priority_is_the_top_level_attribute_of_the_pinned_provider() -> None:
    # pulumi-cloudflare 6.23 (terraform-provider-cloudflare 5.x): MX takes `priority` at the top
    # level, `data` is for SRV and CAA only; see requirements.txt for what changes on a bump.
    run = offline_run("dev")
    exchanges = [r for r in run.of_type(DNS_RECORD) if r.inputs["type"] == "MX"]
    assert len(exchanges) == 2  # the domain's, and SES's for the MAIL FROM domain
    for mx in exchanges:
        assert isinstance(mx.inputs["priority"], (int, float)) and "data" not in mx.inputs, mx.name
    (own,) = [mx for mx in exchanges if mx.inputs["name"] == run.settings.domain]
    assert own.inputs["content"] == run.settings.host_name


def test_no_srv_record_with_a_null_target_goes_to_cloudflare_and_the_zone_file_keeps_them() -> None:
    # Cloudflare's API has read a "." SRV target back as `false`
    # (github.com/StackExchange/dnscontrol/issues/561) and refused an empty one
    # (github.com/octodns/octodns/issues/640); SRV `data` drifted on every plan in the provider's
    # 5.x line (github.com/cloudflare/terraform-provider-cloudflare/issues/5405, /5383).
    from infra.core.dns import zone_file
    from infra.core.render import status_config
    from infra.tools.check import Target, expected_records

    run = offline_run("dev")
    services = [r for r in run.of_type(DNS_RECORD) if r.inputs["type"] == "SRV"]
    assert {r.inputs["name"].split(".")[0] for r in services} == {"_submission", "_submissions", "_imaps"}
    assert all(r.inputs["data"]["target"] == run.settings.host_name for r in services)
    exported = zone_file(run.settings, run.facts())
    for service in ("imap", "pop3", "pop3s"):
        assert f"_{service}._tcp.example.net.\t3600\tIN\tSRV\t0 0 0 .\n" in exported
    # Neither the status check nor the server's own daily check expects them on Cloudflare.
    target = Target(run.settings, "198.51.100.10", "2001:db8::10")
    assert not [r for r in expected_records(target, "KEY") if r["value"] == "."]
    daily = status_config(run.settings, run.facts())["records"]
    assert daily and not [r for r in daily if r["value"] == "."]


# --- the providers' published schemas ----------------------------------------------------------


def schemas() -> dict[str, Any]:
    if not SCHEMAS.exists():
        pytest.skip(f"{SCHEMAS.name} is not there (see tests/unit/data/README.md to make it)")
    published = json.loads(SCHEMAS.read_text())
    assert isinstance(published, dict)
    return published


def check_value(value: Any, spec: dict[str, Any], types: dict[str, Any], where: str) -> list[str]:
    """What in VALUE breaks SPEC (a schema property), as readable lines."""
    if value is None:
        return []
    ref = spec.get("$ref", "")
    if ref.startswith("#/types/"):
        return check_object(value, types[ref.removeprefix("#/types/")], types, where)
    kind = spec.get("type")
    if kind == "array":
        if not isinstance(value, list):
            return [f"{where}: {value!r} is not a list"]
        return [p for i, v in enumerate(value) for p in check_value(v, spec.get("items", {}), types, f"{where}[{i}]")]
    python_types: dict[str, type | tuple[type, ...]] = {
        "string": str,
        "integer": (int, float),  # numbers are floats on the wire
        "number": (int, float),
        "boolean": bool,
    }
    expected = python_types.get(kind or "")
    if expected and (not isinstance(value, expected) or (kind != "boolean" and isinstance(value, bool))):
        return [f"{where}: {value!r} is not a {kind}"]
    return []


def check_object(value: Any, spec: dict[str, Any], types: dict[str, Any], where: str) -> list[str]:
    if "enum" in spec:
        allowed = [e["value"] for e in spec["enum"]]
        return [] if value in allowed else [f"{where}: {value!r} is not one of {allowed}"]
    if not isinstance(value, dict):
        return [f"{where}: {value!r} is not an object"]
    properties = spec.get("properties", spec.get("inputProperties", {}))
    problems = [f"{where}.{k}: not a property" for k in value if k not in properties]
    problems += [
        f"{where}.{k}: required" for k in spec.get("required", spec.get("requiredInputs", [])) if k not in value
    ]
    for key, item in value.items():
        if key in properties:
            problems += check_value(item, properties[key], types, f"{where}.{key}")
    return problems


SCHEMA_CHECKED = [
    DROPLET,
    "digitalocean:index/volume:Volume",
    ATTACHMENT,
    "digitalocean:index/firewall:Firewall",
    MONITOR_ALERT,
    SSH_KEY,
    "digitalocean:index/tag:Tag",
    DNS_RECORD,
    "cloudflare:index/apiToken:ApiToken",
    "aws:s3/bucket:Bucket",
    "aws:s3/bucketVersioning:BucketVersioning",
    "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock",
    "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration",
    "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration",
    "aws:s3/bucketOwnershipControls:BucketOwnershipControls",
    "aws:iam/user:User",
    "aws:iam/userPolicy:UserPolicy",
    "aws:iam/accessKey:AccessKey",
    "digitalocean:index/spacesBucket:SpacesBucket",
    "digitalocean:index/spacesKey:SpacesKey",
]


@pytest.mark.parametrize("stack", ["dev", "prod"])
@pytest.mark.parametrize("token", SCHEMA_CHECKED)
def test_inputs_match_the_providers_published_schema(stack: str, token: str) -> None:
    published = schemas()
    resource, types = published["resources"][token], published["types"]
    # The Spaces resources are declared for backupTarget spaces only.
    spaces = {"backupTarget": "spaces", "backupRegion": "nyc3"} if token.startswith("digitalocean:index/spaces") else {}
    declared = offline_run(stack, backups=True, **spaces).of_type(token)
    assert declared, f"the program declares no {token}"
    problems = [p for r in declared for p in check_object(r.inputs, resource, types, r.name)]
    assert not problems, "\n".join(problems)


def test_the_schema_check_catches_a_wrong_input() -> None:
    # Planted faults: an unknown property, a missing required one, a wrong enum or type.
    published = schemas()
    types = published["types"]
    droplet = published["resources"][DROPLET]
    good = offline_run("dev", backups=True).one(DROPLET).inputs
    assert check_object(good, droplet, types, "droplet") == []
    assert check_object({**good, "sshKey": []}, droplet, types, "droplet") == ["droplet.sshKey: not a property"]
    missing = {k: v for k, v in good.items() if k not in ("image", "size")}
    assert sorted(check_object(missing, droplet, types, "droplet")) == [
        "droplet.image: required",
        "droplet.size: required",
    ]
    assert check_object({**good, "ipv6": "yes"}, droplet, types, "droplet") == ["droplet.ipv6: 'yes' is not a boolean"]
