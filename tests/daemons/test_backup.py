"""The server's backup script against real restic and an S3 stand-in (moto's server), and the
status check's backup line for each state a run leaves behind (each fault planted)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import pytest

from infra.core.facts import CLOUD_INIT
from infra.tools.check import load_status

BUCKET = "mail-example-net-mail-backup"
status = load_status()


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mailroom_backup", CLOUD_INIT / "backup.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = _script()


# --- the status check's line --------------------------------------------------------------------


def line(backup: dict[str, Any] | None, tmp_path: Path, result: dict[str, Any] | None, *, installed_hours: float = 48):
    marker = tmp_path / "bootstrapped"
    marker.touch()
    os.utime(marker, (time.time() - installed_hours * 3600,) * 2)
    if backup is not None:
        backup = {**backup, "result": str(tmp_path / "backup.json")}
        if result is not None:
            (tmp_path / "backup.json").write_text(json.dumps(result))
    (found,) = status.check_backup(backup, installed=marker)
    return found


CONFIG = {"max_age_hours": 26, "repository": f"s3:https://s3.us-east-1.amazonaws.com/{BUCKET}"}


def test_no_backup_target_is_a_warning_that_says_how_to_turn_it_on(tmp_path: Path) -> None:
    found = line(None, tmp_path, None)
    assert found.status == status.WARNING and "backupTarget" in found.fix


def test_a_new_server_waits_for_its_first_night_and_an_old_one_without_a_backup_fails(tmp_path: Path) -> None:
    assert line(CONFIG, tmp_path, None, installed_hours=2).status == status.OK
    late = line(CONFIG, tmp_path, None, installed_hours=30)
    assert late.status == status.FAILURE and "no backup has run" in late.detail


def test_a_good_recent_run_is_ok_and_names_the_snapshot(tmp_path: Path) -> None:
    now = time.time() - 3600
    good = {"ok": True, "started": now, "last_success": now, "snapshot": "a1b2c3d4e5", "files": 42, "bytes": 3e6}
    found = line(CONFIG, tmp_path, good)
    assert found.status == status.OK and "a1b2c3d4" in found.detail and "42 files" in found.detail


def test_a_backup_older_than_a_day_and_a_bit_fails(tmp_path: Path) -> None:
    then = time.time() - 27 * 3600
    found = line(CONFIG, tmp_path, {"ok": True, "started": then, "last_success": then})
    assert found.status == status.FAILURE and "27 h old" in found.detail and "list-timers" in found.fix


def test_a_failed_run_fails_and_tells_how_old_the_newest_good_one_is(tmp_path: Path) -> None:
    then = time.time() - 5 * 3600
    failed = {"ok": False, "started": time.time(), "last_success": then, "error": "repository is locked"}
    found = line(CONFIG, tmp_path, failed)
    assert found.status == status.FAILURE
    assert "repository is locked" in found.detail and "5 h old" in found.detail and "journalctl" in found.fix


# --- restic against the S3 stand-in ----------------------------------------------------------------


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    if shutil.which("restic") is None:
        pytest.skip("restic is not installed (requirements-debian.txt; make setup)")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="AKIALAB", aws_secret_access_key="x"
    )
    client.create_bucket(Bucket=BUCKET)
    client.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    yield endpoint
    server.stop()


@pytest.fixture()
def config(tmp_path: Path, s3: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    env = tmp_path / "backup.env"
    repository = f"s3:{s3}/{BUCKET}/{tmp_path.name}"
    env.write_text(
        f"# test\nRESTIC_REPOSITORY={repository}\nRESTIC_PASSWORD=correct horse\n"
        "AWS_ACCESS_KEY_ID=AKIALAB\nAWS_SECRET_ACCESS_KEY=lab-secret\n"
    )
    env.chmod(0o600)
    monkeypatch.setattr(script, "ENVIRONMENT", env)
    return {"cache_dir": str(tmp_path / "cache"), "result": str(tmp_path / "result.json")}


def test_the_first_run_makes_the_repository_and_the_next_finds_it(config: dict[str, Any], tmp_path: Path) -> None:
    assert script.ensure_repository(config) is True
    assert script.ensure_repository(config) is False
    data = tmp_path / "mail"
    data.mkdir()
    (data / "message").write_text("Subject: kept\n\nbody\n")
    script.restic(config, "backup", str(data))
    assert len(script.snapshots(config)) == 0, "a snapshot without mailroom's tag is not one of its backups"
    script.restic(config, "backup", "--tag", "mailroom", str(data))
    (snap,) = script.snapshots(config)
    assert snap["paths"] == [str(data)]
    # The list shows what a restore brings back and what the repository holds.
    (data / "second").write_text("Subject: also\n\n" + "x" * 5000 + "\n")
    script.restic(config, "backup", "--tag", "mailroom", str(data))
    listed = script.listing(config)
    sizes = [s["size"] for s in listed["snapshots"]]
    message = len((data / "message").read_bytes())
    assert sizes == [message, message + len((data / "second").read_bytes())], sizes
    # Stored compressed (restic 0.14's repository version 2) and deduplicated: the x's take little.
    assert 0 < listed["stored"] < sizes[-1], listed["stored"]


def test_the_wrong_password_is_refused_and_nothing_is_initialised_over_it(
    config: dict[str, Any], tmp_path: Path
) -> None:
    script.ensure_repository(config)
    env = Path(script.ENVIRONMENT)
    env.write_text(env.read_text().replace("correct horse", "wrong horse"))
    with pytest.raises(script.BackupError) as refused:
        script.ensure_repository(config)
    assert "wrong horse" not in str(refused.value)
    assert "wrong password" in str(refused.value) or "cannot be read" in str(refused.value)


def test_the_secrets_reach_restic_in_its_environment_not_its_command_line(config: dict[str, Any]) -> None:
    env = script.restic_env(config)
    assert env["RESTIC_PASSWORD"] == "correct horse" and env["AWS_SECRET_ACCESS_KEY"] == "lab-secret"
    assert env["RESTIC_CACHE_DIR"] == config["cache_dir"]


def test_a_spaces_key_that_could_destroy_the_history_is_a_warning(tmp_path: Path) -> None:
    now = time.time() - 3600
    (tmp_path / "backup.json").write_text(json.dumps({"ok": True, "last_success": now, "snapshot": "a1b2c3d4"}))
    spaces = {**CONFIG, "result": str(tmp_path / "backup.json"), "history_protected": False}
    marker = tmp_path / "bootstrapped"
    marker.touch()
    age, history = status.check_backup(spaces, installed=marker)
    assert age.status == status.OK
    assert history.status == status.WARNING and "delete" in history.detail and "backupTarget s3" in history.fix
    assert len(status.check_backup({**spaces, "history_protected": True}, installed=marker)) == 1


# --- the server's key against a bucket that enforces its IAM policy -------------------------------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """moto's server in its own process, enforcing IAM: the bucket as the program declares it, the
    backup user with the program's policy and key, and an owner with every right."""
    if shutil.which("restic") is None:
        pytest.skip("restic is not installed (requirements-debian.txt; make setup)")
    import socket
    import subprocess
    import sys
    import urllib.request

    from infra.cloud.backup import key_policy

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)  # noqa: S310 (http to loopback)
                break
            except OSError:
                time.sleep(0.1)
        anyone = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "AKIASETUP"}
        iam = boto3.client("iam", aws_secret_access_key="x", **anyone)
        s3 = boto3.client("s3", aws_secret_access_key="x", **anyone)
        s3.create_bucket(Bucket=BUCKET)
        s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
        keys = {}
        policy = json.loads(key_policy(BUCKET))
        # moto authorises HEAD on a bucket as s3:HeadBucket; AWS as s3:ListBucket, which the
        # policy allows (docs.aws.amazon.com/AmazonS3/latest/API/API_HeadBucket.html).
        policy["Statement"][0]["Action"].append("s3:HeadBucket")
        owner = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        for user, document in (("server", policy), ("owner", owner)):
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName=user, PolicyDocument=json.dumps(document))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = (key["AccessKeyId"], key["SecretAccessKey"])
        # From here on every request must be signed by a key whose policy allows it.
        reset = urllib.request.Request(  # noqa: S310 (http to loopback)
            f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
        )
        urllib.request.urlopen(reset)  # noqa: S310 (http to loopback)
        yield {"endpoint": endpoint, "keys": keys}
    finally:
        server.terminate()
        server.wait(timeout=10)


def client_as(guarded: dict[str, Any], who: str) -> Any:
    key_id, secret = guarded["keys"][who]
    return boto3.client(
        "s3",
        endpoint_url=guarded["endpoint"],
        region_name="us-east-1",
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
    )


def test_the_servers_key_backs_up_and_prunes_but_cannot_destroy_the_history(
    guarded: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from botocore.exceptions import ClientError

    key_id, secret = guarded["keys"]["server"]
    env = tmp_path / "backup.env"
    env.write_text(
        f"RESTIC_REPOSITORY=s3:{guarded['endpoint']}/{BUCKET}/guarded\nRESTIC_PASSWORD=correct horse\n"
        f"AWS_ACCESS_KEY_ID={key_id}\nAWS_SECRET_ACCESS_KEY={secret}\n"
    )
    monkeypatch.setattr(script, "ENVIRONMENT", env)
    config = {"cache_dir": str(tmp_path / "cache"), "result": str(tmp_path / "result.json")}
    data = tmp_path / "mail"
    data.mkdir()
    (data / "message").write_text("Subject: kept\n\nthe first night\n")
    # What the server does every night: all of it works with its own key.
    assert script.ensure_repository(config) is True
    script.restic(config, "backup", "--tag", "mailroom", str(data))
    (data / "message").write_text("Subject: kept\n\nthe second night\n")
    script.restic(config, "backup", "--tag", "mailroom", str(data))
    script.restic(config, "forget", "--tag", "mailroom", "--keep-last", "1", "--prune")
    assert len(script.snapshots(config)) == 1

    # What whoever takes the server can try with its key: every object "deleted" ...
    server = client_as(guarded, "server")
    listed = server.list_objects_v2(Bucket=BUCKET, Prefix="guarded/")["Contents"]
    for item in listed:
        server.delete_object(Bucket=BUCKET, Key=item["Key"])
    assert server.list_objects_v2(Bucket=BUCKET, Prefix="guarded/").get("KeyCount") == 0
    # ... but no version destroyed, versioning not suspended, no lifecycle rule to purge them.
    owner = client_as(guarded, "owner")
    versions = owner.list_object_versions(Bucket=BUCKET, Prefix="guarded/")
    victim = next(v for v in versions["Versions"] if v["Key"] == listed[0]["Key"])
    attempts: dict[str, Callable[[], Any]] = {
        "DeleteObjectVersion": lambda: server.delete_object(
            Bucket=BUCKET, Key=victim["Key"], VersionId=victim["VersionId"]
        ),
        "PutBucketVersioning": lambda: server.put_bucket_versioning(
            Bucket=BUCKET, VersioningConfiguration={"Status": "Suspended"}
        ),
        "PutLifecycleConfiguration": lambda: server.put_bucket_lifecycle_configuration(
            Bucket=BUCKET,
            LifecycleConfiguration={
                "Rules": [{"ID": "purge", "Status": "Enabled", "Filter": {}, "Expiration": {"Days": 1}}]
            },
        ),
        "DeleteBucket": lambda: server.delete_bucket(Bucket=BUCKET),
    }
    for action, attempt in attempts.items():
        with pytest.raises(ClientError) as refused:
            attempt()
        assert refused.value.response["Error"]["Code"] == "AccessDenied", action
    assert owner.get_bucket_versioning(Bucket=BUCKET)["Status"] == "Enabled"

    # The owner undoes the deletes (removes the delete markers) and the backup is whole again.
    for marker in owner.list_object_versions(Bucket=BUCKET, Prefix="guarded/").get("DeleteMarkers", []):
        owner.delete_object(Bucket=BUCKET, Key=marker["Key"], VersionId=marker["VersionId"])
    # Undeleting brings back restic's old lock files too: stale, `restic unlock` removes them.
    script.restic(config, "unlock")
    script.restic(config, "check", "--read-data")
    # Even the snapshot forgotten and pruned with the server's key is back: nothing it did is final.
    first, second = sorted(script.snapshots(config), key=lambda s: s["time"])
    script.restic(config, "restore", first["id"], "--target", str(tmp_path / "first"))
    assert (tmp_path / "first" / data.relative_to("/") / "message").read_text().endswith("the first night\n")
    snap = second
    script.restic(config, "restore", snap["id"], "--target", str(tmp_path / "back"))
    assert (tmp_path / "back" / data.relative_to("/") / "message").read_text().endswith("the second night\n")


def test_forget_keeps_what_the_settings_say_and_prunes_on_request(config: dict[str, Any], tmp_path: Path) -> None:
    script.ensure_repository(config)
    data = tmp_path / "mail"
    data.mkdir()
    for night in range(3):
        (data / "message").write_text(f"night {night}\n")
        script.restic(config, "backup", "--host", "mail.example.net", "--tag", "mailroom", str(data))
    keep = {"host": "mail.example.net", "keep": {"daily": 1, "weekly": 1, "monthly": 1}}
    script.forget({**config, **keep}, prune=True)
    # Three snapshots of one day: the newest is the day's, the week's and the month's.
    (left,) = script.snapshots(config)
    script.restic(config, "restore", left["id"], "--target", str(tmp_path / "back"))
    assert (tmp_path / "back" / data.relative_to("/") / "message").read_text() == "night 2\n"
