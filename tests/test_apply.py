"""The apply script on scratch roots: converge, check before switching, roll back, stay quiet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from infra.bundle import Bundle, BundleFile, Service

APPLY = Path(__file__).resolve().parent.parent / "cloud_init" / "apply.py"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root").mkdir()
    return tmp_path / "root"


@pytest.fixture
def fake_apt(tmp_path: Path) -> dict[str, str]:
    """dpkg-query answers from a list of installed packages; apt-get logs what it is asked and
    installs or purges in that list. Writing "stale" to the behaviour file makes install fail
    until an update ran (old package lists); "broken" makes it always fail."""
    installed = tmp_path / "installed"
    installed.write_text("postfix\nspamassassin\n")
    log = tmp_path / "apt.log"
    behaviour = tmp_path / "apt-behaviour"
    behaviour.write_text("ok\n")
    query = tmp_path / "dpkg-query"
    query.write_text(f'#!/bin/sh\ngrep -qx "$3" {installed} && echo "install ok installed"\n')
    apt = tmp_path / "apt-get"
    apt.write_text(
        f"""#!/bin/sh
echo "$@" >> {log}
shift 2
verb=$1; shift
case "$verb:$(cat {behaviour})" in
  install:broken|install:stale) echo "E: Unable to locate package $3"; exit 100 ;;
  update:stale) echo ok > {behaviour} ;;
esac
case "$verb" in
  install) shift 2; for p; do echo "$p" >> {installed}; done ;;
  purge) shift; for p; do grep -vx "$p" {installed} > {installed}.new; mv {installed}.new {installed}; done ;;
esac
"""
    )
    query.chmod(0o755)
    apt.chmod(0o755)
    return {
        "MAILROOM_DPKG_QUERY": str(query),
        "MAILROOM_APT_GET": str(apt),
        "log": str(log),
        "behaviour": str(behaviour),
    }


def apply(
    bundle: Bundle | str, root: Path, fake_apt: dict[str, str], extra_args: tuple[str, ...] = (), **extra_env: str
) -> subprocess.CompletedProcess[str]:
    text = bundle if isinstance(bundle, str) else bundle.to_json()
    env = {"PATH": os.environ["PATH"], **{k: v for k, v in fake_apt.items() if k.startswith("MAILROOM_")}, **extra_env}
    return subprocess.run(
        [sys.executable, str(APPLY), "--root", str(root), *extra_args],
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


def summary(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def calls(fake_apt: dict[str, str]) -> list[str]:
    log = Path(fake_apt["log"])
    return log.read_text().splitlines() if log.exists() else []


def test_first_apply_installs_everything_and_reloads_each_service_once(root: Path, fake_apt: dict[str, str]) -> None:
    done = summary(apply(two_services(), root, fake_apt))
    assert done == {
        "changed": ["/etc/dovecot/dovecot.conf", "/etc/dovecot/users", "/etc/postfix/main.cf"],
        "reloaded": ["postfix", "dovecot"],
        "installed": [],
        "removed_packages": [],
    }
    assert (root / "etc/postfix/main.cf").read_text() == "size = 10\n"
    assert (root / "etc/postfix/main.cf").stat().st_mode & 0o7777 == 0o644
    assert events(root, "postfix") == ["prepare", "check", "reload"]
    assert events(root, "dovecot") == ["prepare", "check", "reload"]
    assert not [p.name for p in (root / "etc/postfix").iterdir() if p.name != "main.cf"]  # no temporary left


def test_same_bundle_twice_changes_and_restarts_nothing(root: Path, fake_apt: dict[str, str]) -> None:
    summary(apply(two_services(), root, fake_apt))
    again = summary(apply(two_services(), root, fake_apt))
    assert again == {"changed": [], "reloaded": [], "installed": [], "removed_packages": []}
    assert events(root, "postfix") == ["prepare", "check", "reload"]
    assert events(root, "dovecot") == ["prepare", "check", "reload"]
    assert calls(fake_apt) == []  # postfix is installed: apt never ran


def test_a_one_line_change_reloads_only_its_service(root: Path, fake_apt: dict[str, str]) -> None:
    summary(apply(two_services(), root, fake_apt))
    done = summary(apply(two_services("size = 10\nextra = yes\n"), root, fake_apt))
    assert done["changed"] == ["/etc/postfix/main.cf"] and done["reloaded"] == ["postfix"]
    assert (root / "etc/postfix/main.cf").read_text() == "size = 10\nextra = yes\n"
    assert events(root, "postfix") == ["prepare", "check", "reload"] * 2
    assert events(root, "dovecot") == ["prepare", "check", "reload"]  # not prepared, checked nor reloaded again


def test_a_mode_or_owner_changed_by_hand_is_put_back(root: Path, fake_apt: dict[str, str]) -> None:
    summary(apply(two_services(), root, fake_apt))
    (root / "etc/dovecot/users").chmod(0o644)
    done = summary(apply(two_services(), root, fake_apt))
    assert done["changed"] == ["/etc/dovecot/users"] and done["reloaded"] == ["dovecot"]
    assert (root / "etc/dovecot/users").stat().st_mode & 0o7777 == 0o600


def test_a_file_failing_its_check_is_refused_and_the_old_one_kept(root: Path, fake_apt: dict[str, str]) -> None:
    summary(apply(two_services(), root, fake_apt))
    first = {
        p: (root / p).read_bytes() for p in ("etc/postfix/main.cf", "etc/dovecot/dovecot.conf", "etc/dovecot/users")
    }
    broken = Bundle(
        # main.cf breaks, a file in a new directory appears, dovecot's files leave the bundle.
        files=(
            BundleFile("/etc/postfix/main.cf", "size = broken\n"),
            BundleFile("/etc/postfix/conf.d/extra.cf", "new\n"),
        ),
        services=(
            service("postfix", "/etc/postfix/", check='! grep -q broken "$MAILROOM_ROOT/etc/postfix/main.cf"'),
            service("dovecot", "/etc/dovecot/"),
        ),
    )
    result = apply(broken, root, fake_apt)
    assert result.returncode == 1 and result.stdout == ""
    assert "service postfix" in result.stderr and "grep -q broken" in result.stderr
    assert "previous files are back in place and nothing was reloaded" in result.stderr
    assert {p: (root / p).read_bytes() for p in first} == first  # changed and removed files are back
    assert (root / "etc/dovecot/users").stat().st_mode & 0o7777 == 0o600
    assert not (root / "etc/postfix/conf.d").exists()  # the new file and its new directory are gone
    # Prepared, checked, refused, prepared again on the restored files (postmap's .db follows them), never reloaded.
    assert events(root, "postfix") == ["prepare", "check", "reload", "prepare", "check", "prepare"]
    assert events(root, "dovecot") == ["prepare", "check", "reload"]  # dovecot's turn never came
    # The server still converges from where it was: the good bundle is a no-op.
    assert summary(apply(two_services(), root, fake_apt))["changed"] == []


def test_a_failing_prepare_is_refused_like_a_failing_check(root: Path, fake_apt: dict[str, str]) -> None:
    summary(apply(two_services(), root, fake_apt))
    bundle = Bundle(
        files=two_services("size = 20\n").files,
        services=(Service("postfix", ("/etc/postfix/",), prepare=("echo 'postmap: fatal: bad map' >&2; exit 3",)),),
    )
    result = apply(bundle, root, fake_apt)
    assert result.returncode == 1
    assert (
        "service postfix" in result.stderr and "exit 3" in result.stderr and "postmap: fatal: bad map" in result.stderr
    )
    assert (root / "etc/postfix/main.cf").read_text() == "size = 10\n"


def test_a_hanging_check_is_killed_and_refused(root: Path, fake_apt: dict[str, str]) -> None:
    summary(apply(two_services(), root, fake_apt))
    result = apply(two_services("size = 20\n", check="sleep 30"), root, fake_apt, MAILROOM_COMMAND_TIMEOUT="1")
    assert result.returncode == 1 and "timed out" in result.stderr
    assert (root / "etc/postfix/main.cf").read_text() == "size = 10\n"


def test_a_symlink_replaced_by_a_refused_file_comes_back(root: Path, fake_apt: dict[str, str]) -> None:
    (root / "etc/postfix").mkdir(parents=True)
    (root / "etc/postfix/main.cf").symlink_to("/usr/share/postfix/main.cf.dist")
    result = apply(two_services(check="false"), root, fake_apt)
    assert result.returncode == 1
    assert (root / "etc/postfix/main.cf").readlink() == Path("/usr/share/postfix/main.cf.dist")
    assert not (root / "etc/dovecot").exists()


def test_files_that_leave_the_bundle_are_removed_and_no_others(root: Path, fake_apt: dict[str, str]) -> None:
    summary(apply(two_services(), root, fake_apt))
    (root / "etc/dovecot/local.conf").write_text("the admin's own file\n")
    without_users = Bundle(files=two_services().files[:2], services=two_services().services)
    done = summary(apply(without_users, root, fake_apt))
    assert done["changed"] == ["/etc/dovecot/users"] and done["reloaded"] == ["dovecot"]
    assert not (root / "etc/dovecot/users").exists()
    assert (root / "etc/dovecot/dovecot.conf").read_text() == "protocols = imap\n"
    assert (root / "etc/dovecot/local.conf").read_text() == "the admin's own file\n"
    # Gone for good: the next apply neither recreates nor reports it.
    assert summary(apply(without_users, root, fake_apt))["changed"] == []


def test_a_file_mailroom_never_installed_is_never_removed(root: Path, fake_apt: dict[str, str]) -> None:
    (root / "etc/dovecot").mkdir(parents=True)
    (root / "etc/dovecot/dovecot.conf").write_text("the distribution's file\n")
    summary(apply(Bundle(files=two_services().files[:1]), root, fake_apt))
    assert (root / "etc/dovecot/dovecot.conf").read_text() == "the distribution's file\n"


def test_secret_files_are_root_only_and_never_printed(root: Path, fake_apt: dict[str, str]) -> None:
    bundle = two_services()
    # The first command to run after the write sees the secret already root-only.
    seen = 'stat -c %a "$MAILROOM_ROOT/etc/dovecot/users" >> "$MAILROOM_ROOT/mode-seen"'
    watched = Service("dovecot", ("/etc/dovecot/",), prepare=(seen,))
    result = apply(Bundle(files=bundle.files, services=(bundle.services[0], watched)), root, fake_apt)
    summary(result)
    assert (root / "mode-seen").read_text() == "600\n"
    assert (root / "etc/dovecot/users").stat().st_mode & 0o777 == 0o600
    assert "secret-hash-value" not in result.stdout + result.stderr
    failing = Bundle(files=two_services("x\n").files, services=(service("postfix", "/etc/postfix/", check="false"),))
    refused = apply(failing, root, fake_apt)
    assert refused.returncode == 1 and "secret-hash-value" not in refused.stdout + refused.stderr
    state = root / "var/lib/mailroom/applied.json"
    assert state.stat().st_mode & 0o777 == 0o600 and "secret-hash-value" not in state.read_text()


def test_a_failed_reload_is_reported_and_retried_by_the_next_apply(root: Path, fake_apt: dict[str, str]) -> None:
    flaky = Service(
        "postfix",
        ("/etc/postfix/",),
        reload='test -e "$MAILROOM_ROOT/up" && echo reload >> "$MAILROOM_ROOT/postfix.log"',
    )
    bundle = Bundle(files=two_services().files[:1], services=(flaky,))
    result = apply(bundle, root, fake_apt)
    assert result.returncode == 1 and "service postfix" in result.stderr and "retries the reload" in result.stderr
    assert json.loads(result.stdout)["changed"] == ["/etc/postfix/main.cf"]
    assert (root / "etc/postfix/main.cf").read_text() == "size = 10\n"  # it passed its checks: it stays
    (root / "up").touch()
    assert summary(apply(bundle, root, fake_apt)) == {
        "changed": [],
        "reloaded": ["postfix"],
        "installed": [],
        "removed_packages": [],
    }
    assert summary(apply(bundle, root, fake_apt))["reloaded"] == []
    assert events(root, "postfix") == ["reload"]


def test_packages_missing_are_installed_present_skipped_and_unwanted_purged(
    root: Path, fake_apt: dict[str, str]
) -> None:
    bundle = Bundle(
        files=(), packages=("postfix", "rspamd", "redis-server"), absent_packages=("spamassassin", "opendkim")
    )
    done = summary(apply(bundle, root, fake_apt))
    assert done["installed"] == ["redis-server", "rspamd"] and done["removed_packages"] == ["spamassassin"]
    assert calls(fake_apt) == [
        "-o DPkg::Lock::Timeout=600 install -y --no-install-recommends redis-server rspamd",
        "-o DPkg::Lock::Timeout=600 purge -y spamassassin",
    ]
    again = summary(apply(bundle, root, fake_apt))
    assert again["installed"] == [] and again["removed_packages"] == []
    assert len(calls(fake_apt)) == 2  # converged: apt did not run again


def test_unwanted_packages_stay_until_the_new_files_pass_their_checks(root: Path, fake_apt: dict[str, str]) -> None:
    switch = Bundle(
        files=two_services("milter = rspamd\n").files,
        services=(service("postfix", "/etc/postfix/", check="false"),),
        packages=("rspamd",),
        absent_packages=("spamassassin",),
    )
    refused = apply(switch, root, fake_apt)
    assert refused.returncode == 1 and "service postfix" in refused.stderr
    assert [c.split()[2] for c in calls(fake_apt)] == ["install"]  # rspamd in, spamassassin not purged
    accepted = Bundle(
        files=switch.files,
        services=(service("postfix", "/etc/postfix/"),),
        packages=switch.packages,
        absent_packages=switch.absent_packages,
    )
    done = summary(apply(accepted, root, fake_apt))
    assert done["reloaded"] == ["postfix"] and done["removed_packages"] == ["spamassassin"]
    assert calls(fake_apt)[-1] == "-o DPkg::Lock::Timeout=600 purge -y spamassassin"


def test_a_failed_reload_keeps_the_unwanted_packages_for_the_next_apply(root: Path, fake_apt: dict[str, str]) -> None:
    failing = Service("postfix", ("/etc/postfix/",), reload='test -e "$MAILROOM_ROOT/up"')
    bundle = Bundle(files=two_services().files[:1], services=(failing,), absent_packages=("spamassassin",))
    result = apply(bundle, root, fake_apt)
    assert result.returncode == 1 and json.loads(result.stdout)["removed_packages"] == []
    assert calls(fake_apt) == []
    (root / "up").touch()
    assert summary(apply(bundle, root, fake_apt))["removed_packages"] == ["spamassassin"]


def test_stale_package_lists_are_refreshed_once(root: Path, fake_apt: dict[str, str]) -> None:
    Path(fake_apt["behaviour"]).write_text("stale\n")
    done = summary(apply(Bundle(files=(), packages=("rspamd",)), root, fake_apt))
    assert done["installed"] == ["rspamd"]
    assert [c.split()[2] for c in calls(fake_apt)] == ["install", "update", "install"]


def test_a_package_that_cannot_be_installed_stops_before_any_file(root: Path, fake_apt: dict[str, str]) -> None:
    Path(fake_apt["behaviour"]).write_text("broken\n")
    result = apply(Bundle(files=two_services().files, packages=("rspamd",)), root, fake_apt)
    assert (
        result.returncode == 1 and "installing rspamd failed" in result.stderr and "Unable to locate" in result.stderr
    )
    assert not (root / "etc").exists()


def test_an_unknown_owner_is_refused_before_any_file(root: Path, fake_apt: dict[str, str]) -> None:
    bundle = Bundle(files=(*two_services().files, BundleFile("/etc/x.conf", "x\n", owner="no-such-user-here")))
    result = apply(bundle, root, fake_apt)
    assert result.returncode == 2 and "no user 'no-such-user-here'" in result.stderr
    assert not (root / "etc").exists()


def test_owners_are_looked_up_in_the_root_when_it_has_its_own_accounts(root: Path, fake_apt: dict[str, str]) -> None:
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\nvmail:x:5000:5000::/var/mail:/usr/sbin/nologin\n")
    (root / "etc/group").write_text("root:x:0:\nvmail:x:5000:\nmail:x:8:\n")
    users = BundleFile("/etc/dovecot/users", "alice:x\n", 0o640, owner="vmail", group="mail", secret=True)
    summary(apply(Bundle(files=(users,)), root, fake_apt))
    written = (root / "etc/dovecot/users").stat()
    assert (written.st_uid, written.st_gid) == (5000, 8)
    # This root's accounts are the truth: a user only the host has is unknown here.
    result = apply(Bundle(files=(BundleFile("/etc/x", "x\n", owner="daemon"),)), root, fake_apt)
    assert result.returncode == 2 and "no user 'daemon'" in result.stderr


def test_a_dry_run_reports_what_would_change_and_changes_nothing(root: Path, fake_apt: dict[str, str]) -> None:
    summary(apply(two_services(), root, fake_apt))
    (root / "etc/dovecot/local.conf").write_text("the admin's own file\n")
    changed = Bundle(
        files=(two_services("size = 20\n").files[0], two_services().files[1]),
        services=two_services().services,
        packages=("postfix", "rspamd"),
        absent_packages=("spamassassin",),
    )
    result = apply(changed, root, fake_apt, extra_args=("--dry-run",))
    assert summary(result) == {
        "dry_run": True,
        "changed": ["/etc/dovecot/users", "/etc/postfix/main.cf"],
        "reloaded": ["postfix", "dovecot"],
        "installed": ["rspamd"],
        "removed_packages": ["spamassassin"],
    }
    assert (root / "etc/postfix/main.cf").read_text() == "size = 10\n"
    assert (root / "etc/dovecot/users").exists() and (root / "etc/dovecot/local.conf").exists()
    assert events(root, "postfix") == ["prepare", "check", "reload"]  # nothing ran
    assert calls(fake_apt) == []
    assert "secret-hash-value" not in result.stdout + result.stderr


def test_a_directory_where_a_file_belongs_stops_before_any_file(root: Path, fake_apt: dict[str, str]) -> None:
    (root / "etc/postfix/main.cf").mkdir(parents=True)
    result = apply(two_services(), root, fake_apt)
    assert result.returncode == 1 and "main.cf is not a regular file" in result.stderr
    assert not (root / "etc/dovecot").exists()


def bundle_text(**overrides: object) -> str:
    doc: dict[str, object] = {"version": 1, "files": [], "services": [], "packages": [], "absent_packages": []}
    return json.dumps({**doc, **overrides})


def a_file(**fields: object) -> dict[str, object]:
    return {
        "path": "/etc/x",
        "content": "x",
        "mode": 0o644,
        "owner": "root",
        "group": "root",
        "secret": False,
        **fields,
    }


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("not json", "is not JSON"),
        ('{"version": 7, "files": []}', "not a version 1 mailroom bundle"),
        (bundle_text(version=True), "not a version 1 mailroom bundle"),
        (bundle_text(services=None), "no services list"),
        (bundle_text(files=[a_file(path="etc/x")]), "absolute path"),
        (bundle_text(files=[a_file(path="/etc/../../x")]), "climbs out"),
        (bundle_text(files=[a_file(path="/etc/x/")]), "not a normalised file path"),
        (bundle_text(files=[a_file(), a_file()]), "/etc/x appears twice"),
        (bundle_text(files=[a_file(), a_file(path="/etc/x/y")]), "also the directory of /etc/x/y"),
        (bundle_text(files=[a_file(content=None)]), "lacks its content"),
        (bundle_text(files=[a_file(mode="0644")]), "mode must be an integer"),
        (bundle_text(files=[a_file(mode=0o644, secret=True, content="hunter2")]), "must not be readable by others"),
        (bundle_text(files=[a_file(owner="")]), "owner and group must be names"),
        (bundle_text(services=[{"name": "postfix", "paths": "/etc/postfix/"}]), "paths must be a list"),
        (bundle_text(services=[{"name": "a"}, {"name": "a"}]), "two services share a name"),
        (bundle_text(packages=["-oAPT::Get::Foo=1"]), "not a Debian package name"),
        (bundle_text(packages=["rspamd"], absent_packages=["rspamd"]), "both wanted and unwanted: rspamd"),
    ],
)
def test_a_malformed_bundle_is_refused_before_anything_changes(
    root: Path, fake_apt: dict[str, str], text: str, words: str
) -> None:
    result = apply(text, root, fake_apt)
    assert result.returncode == 2 and "refused" in result.stderr and words in result.stderr
    assert "hunter2" not in result.stderr
    assert not any(root.iterdir())
    assert calls(fake_apt) == []
