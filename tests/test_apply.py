"""The apply script on scratch roots: converge, check before switching, roll back, stay quiet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.bundle import Bundle, BundleFile, Service

APPLY = Path(__file__).resolve().parent.parent / "cloud_init" / "apply.py"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root").mkdir()
    return tmp_path / "root"


@pytest.fixture
def fake_apt(tmp_path: Path) -> dict[str, str]:
    """dpkg-query answers from a list of installed packages; apt-get logs what it is asked."""
    installed = tmp_path / "installed"
    installed.write_text("postfix\nspamassassin\n")
    log = tmp_path / "apt.log"
    query = tmp_path / "dpkg-query"
    query.write_text(f'#!/bin/sh\ngrep -qx "$3" {installed} && echo "install ok installed"\n')
    apt = tmp_path / "apt-get"
    apt.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    query.chmod(0o755)
    apt.chmod(0o755)
    return {"MAILROOM_DPKG_QUERY": str(query), "MAILROOM_APT_GET": str(apt), "log": str(log)}


def apply(
    bundle: Bundle | str, root: Path, fake_apt: dict[str, str], **extra_env: str
) -> subprocess.CompletedProcess[str]:
    text = bundle if isinstance(bundle, str) else bundle.to_json()
    env = {"PATH": os.environ["PATH"], **{k: v for k, v in fake_apt.items() if k != "log"}, **extra_env}
    return subprocess.run(
        [sys.executable, str(APPLY), "--root", str(root)],
        input=text,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def service(name: str, prefix: str, check: str = "true") -> Service:
    log = f'"$MAILROOM_ROOT/{name}.log"'
    return Service(
        name,
        (prefix,),
        prepare=(f"echo prepare >> {log}",),
        check=(f"echo check >> {log}", check),
        reload=f"echo reload >> {log}",
    )


def events(root: Path, name: str) -> list[str]:
    path = root / f"{name}.log"
    return path.read_text().split() if path.exists() else []


def two_services(main_cf: str = "size = 10\n", check: str = "true") -> Bundle:
    return Bundle(
        files=(
            BundleFile("/etc/postfix/main.cf", main_cf),
            BundleFile("/etc/dovecot/dovecot.conf", "protocols = imap\n"),
            BundleFile("/etc/dovecot/users", "alice:{BLF-CRYPT}$2y$05$secret-hash-value\n", 0o600, secret=True),
        ),
        services=(
            service("postfix", "/etc/postfix/", check=check),
            service("dovecot", "/etc/dovecot/"),
        ),
        packages=("postfix",),
    )


def summary(result: subprocess.CompletedProcess[str]) -> dict[str, list[str]]:
    assert result.returncode == 0, result.stderr
    parsed: dict[str, list[str]] = json.loads(result.stdout)
    return parsed


def test_first_apply_installs_everything_and_reloads_each_service_once(root: Path, fake_apt: dict[str, str]) -> None:
    done = summary(apply(two_services(), root, fake_apt))
    assert done["changed"] == ["/etc/dovecot/dovecot.conf", "/etc/dovecot/users", "/etc/postfix/main.cf"]
    assert done["reloaded"] == ["postfix", "dovecot"]
    assert (root / "etc/postfix/main.cf").read_text() == "size = 10\n"
    assert events(root, "postfix") == ["prepare", "reload"]


def test_same_bundle_twice_changes_and_restarts_nothing(root: Path, fake_apt: dict[str, str]) -> None:
    summary(apply(two_services(), root, fake_apt))
    again = summary(apply(two_services(), root, fake_apt))
    assert again == {"changed": [], "reloaded": [], "installed": [], "removed_packages": []}
    assert events(root, "postfix") == ["prepare", "reload"]
    assert events(root, "dovecot") == ["prepare", "reload"]
    assert not Path(fake_apt["log"]).exists()  # postfix is installed: apt never ran


def test_a_one_line_change_reloads_only_its_service(root: Path, fake_apt: dict[str, str]) -> None:
    summary(apply(two_services(), root, fake_apt))
    done = summary(apply(two_services("size = 20\n"), root, fake_apt))
    assert done["changed"] == ["/etc/postfix/main.cf"] and done["reloaded"] == ["postfix"]
    assert events(root, "postfix") == ["prepare", "reload", "prepare", "reload"]
    assert events(root, "dovecot") == ["prepare", "reload"]


def test_a_file_failing_its_check_is_refused_and_the_old_one_kept(root: Path, fake_apt: dict[str, str]) -> None:
    summary(apply(two_services(), root, fake_apt))
    broken = Bundle(
        files=(*two_services("size = broken\n").files, BundleFile("/etc/postfix/extra.cf", "new\n")),
        services=(service("postfix", "/etc/postfix/", check='! grep -q broken "$MAILROOM_ROOT/etc/postfix/main.cf"'),),
    )
    result = apply(broken, root, fake_apt)
    assert result.returncode == 1
    assert "service postfix" in result.stderr and "previous files are back" in result.stderr
    assert (root / "etc/postfix/main.cf").read_text() == "size = 10\n"
    assert not (root / "etc/postfix/extra.cf").exists()
    # Prepared, checked, refused, prepared again on the restored files (postmap's .db follows them), never reloaded.
    assert events(root, "postfix") == ["prepare", "reload", "prepare", "prepare"]
    # The server still converges from where it was: the good bundle is a no-op.
    assert summary(apply(two_services(), root, fake_apt))["changed"] == []


def test_files_that_leave_the_bundle_are_removed_and_no_others(root: Path, fake_apt: dict[str, str]) -> None:
    summary(apply(two_services(), root, fake_apt))
    (root / "etc/dovecot/local.conf").write_text("the admin's own file\n")
    without_dovecot = Bundle(files=two_services().files[:1], services=two_services().services)
    done = summary(apply(without_dovecot, root, fake_apt))
    assert done["changed"] == ["/etc/dovecot/dovecot.conf", "/etc/dovecot/users"]
    assert not (root / "etc/dovecot/dovecot.conf").exists()
    assert (root / "etc/dovecot/local.conf").read_text() == "the admin's own file\n"
    assert done["reloaded"] == ["dovecot"]


def test_secret_files_are_root_only_and_never_printed(root: Path, fake_apt: dict[str, str]) -> None:
    result = apply(two_services(), root, fake_apt)
    summary(result)
    assert (root / "etc/dovecot/users").stat().st_mode & 0o777 == 0o600
    assert "secret-hash-value" not in result.stdout + result.stderr
    failing = Bundle(files=two_services("x\n").files, services=(service("postfix", "/etc/postfix/", check="false"),))
    refused = apply(failing, root, fake_apt)
    assert refused.returncode == 1 and "secret-hash-value" not in refused.stdout + refused.stderr


def test_packages_missing_are_installed_and_unwanted_purged(root: Path, fake_apt: dict[str, str]) -> None:
    bundle = Bundle(
        files=(), packages=("postfix", "rspamd", "redis-server"), absent_packages=("spamassassin", "opendkim")
    )
    done = summary(apply(bundle, root, fake_apt))
    assert done["installed"] == ["redis-server", "rspamd"] and done["removed_packages"] == ["spamassassin"]
    calls = Path(fake_apt["log"]).read_text().splitlines()
    assert calls == [
        "-o DPkg::Lock::Timeout=600 install -y --no-install-recommends redis-server rspamd",
        "-o DPkg::Lock::Timeout=600 purge -y spamassassin",
    ]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("not json", "is not JSON"),
        ('{"version": 7, "files": []}', "not a version 1 mailroom bundle"),
        (
            '{"version": 1, "files": [{"path": "etc/x", "content": ""}], "services": [], "packages": [], "absent_packages": []}',
            "absolute path",
        ),
        (
            '{"version": 1, "files": [{"path": "/etc/../../x", "content": ""}], "services": [], "packages": [], "absent_packages": []}',
            "climbs out",
        ),
    ],
)
def test_a_malformed_bundle_is_refused_before_anything_changes(
    root: Path, fake_apt: dict[str, str], text: str, words: str
) -> None:
    result = apply(text, root, fake_apt)
    assert result.returncode == 2 and words in result.stderr
    assert not any(root.iterdir())
