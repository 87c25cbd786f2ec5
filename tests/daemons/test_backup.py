"""The server's backup script against real restic and an S3 stand-in (moto's server), and the
status check's backup line for each state a run leaves behind (each fault planted)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from collections.abc import Iterator
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
