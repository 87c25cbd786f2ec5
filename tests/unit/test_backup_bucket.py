"""The off-site backup's bucket and key as the program declares them: where they are, what keeps
the backups (protect, versioning, lifecycle) and how little the server's key may do."""

from __future__ import annotations

import json
from typing import Any

from infra.cloud.backup import DENIED_ACTIONS, retention_days
from infra.tools.rehearsal import OfflineRun
from tests.conftest import offline_run

BUCKET = "mail-example-net-mail-backup"


def backup_resources(run: OfflineRun) -> dict[str, Any]:
    return {r.name: r for r in run.resources if r.name.startswith("backup-")}


def test_the_s3_bucket_is_protected_versioned_private_and_in_its_own_region() -> None:
    run = offline_run("dev", backupRegion="eu-central-1")
    found = backup_resources(run)
    bucket, versioning = found["backup-bucket"], found["backup-versioning"]
    assert bucket.inputs["bucket"] == BUCKET and bucket.protect
    # Deleting the versioning resource would suspend versioning: protected like the bucket.
    assert versioning.protect and versioning.inputs["versioningConfiguration"] == {"status": "Enabled"}
    assert found["backup-public-access"].inputs == {
        "bucket": BUCKET,
        "blockPublicAcls": True,
        "blockPublicPolicy": True,
        "ignorePublicAcls": True,
        "restrictPublicBuckets": True,
    }
    (rule,) = found["backup-encryption"].inputs["rules"]
    assert rule["applyServerSideEncryptionByDefault"] == {"sseAlgorithm": "AES256"}
    assert found["backup-aws"].inputs["region"] == "eu-central-1"
    for r in found.values():
        if r.type.startswith("aws:"):
            assert r.provider.startswith(found["backup-aws"].urn), f"{r.name} is not in backupRegion"
    assert run.outputs["backupRepository"] == f"s3:https://s3.eu-central-1.amazonaws.com/{BUCKET}"


def test_deleted_versions_stay_longer_than_the_longest_keep() -> None:
    run = offline_run("dev", backupKeepMonthly=24)
    (rule,) = backup_resources(run)["backup-lifecycle"].inputs["rules"]
    # AWS provider v6+: a rule needs a filter (or prefix); an empty one means every object.
    assert rule["status"] == "Enabled" and rule["filter"] == {}
    days = rule["noncurrentVersionExpiration"]["noncurrentDays"]
    assert days == retention_days(14, 8, 24) > 24 * 31
    assert rule["abortIncompleteMultipartUpload"]["daysAfterInitiation"] >= 1


def test_the_servers_key_may_use_restic_on_its_bucket_and_nothing_else() -> None:
    run = offline_run("dev")
    found = backup_resources(run)
    assert found["backup-user-policy"].inputs["user"] == found["backup-user"].inputs["name"]
    statements = json.loads(found["backup-user-policy"].inputs["policy"])["Statement"]
    allowed = {(a, s["Resource"]) for s in statements if s["Effect"] == "Allow" for a in s["Action"]}
    arn = f"arn:aws:s3:::{BUCKET}"
    assert allowed == {
        ("s3:ListBucket", arn),
        ("s3:GetBucketLocation", arn),
        ("s3:GetObject", f"{arn}/*"),
        ("s3:PutObject", f"{arn}/*"),
        ("s3:DeleteObject", f"{arn}/*"),
    }
    (deny,) = [s for s in statements if s["Effect"] == "Deny"]
    assert {"s3:DeleteObjectVersion", "s3:PutBucketVersioning", "s3:PutLifecycleConfiguration"} <= set(deny["Action"])
    assert set(deny["Action"]) == set(DENIED_ACTIONS)
    # The key and restic's password are secrets in the state and no output shows them.
    assert "secret" in found["backup-key"].additional_secret_outputs
    assert "result" in found["backup-password"].additional_secret_outputs
    shown = json.dumps(run.outputs)
    assert found["backup-key"].state["secret"] not in shown
    assert found["backup-password"].state["result"] not in shown


def test_spaces_holds_the_backup_with_a_key_scoped_to_its_bucket() -> None:
    run = offline_run("dev", backupTarget="spaces", backupRegion="ams3")
    found = backup_resources(run)
    assert not [r.name for r in found.values() if r.type.startswith("aws:")]
    bucket = found["backup-bucket"]
    assert bucket.type == "digitalocean:index/spacesBucket:SpacesBucket" and bucket.protect
    assert (bucket.inputs["name"], bucket.inputs["region"], bucket.inputs["acl"]) == (BUCKET, "ams3", "private")
    assert bucket.inputs["versioning"] == {"enabled": True}
    (rule,) = bucket.inputs["lifecycleRules"]
    assert rule["enabled"] and rule["noncurrentVersionExpiration"]["days"] == retention_days(14, 8, 12)
    key = found["backup-key"]
    # Grant permissions the provider accepts: read, readwrite, fullaccess (bucket "" for fullaccess).
    assert key.inputs["grants"] == [{"bucket": BUCKET, "permission": "readwrite"}]
    assert key.state["secretKey"] not in json.dumps(run.outputs)
    assert run.outputs["backupRepository"] == f"s3:https://ams3.digitaloceanspaces.com/{BUCKET}"


def test_backup_target_none_declares_nothing_and_sends_the_server_no_backup() -> None:
    run = offline_run("dev", backupTarget="none")
    assert not backup_resources(run)
    assert "backupRepository" not in run.outputs
