"""The apply script on scratch roots: converge, check before switching, roll back, stay quiet.

The script runs as a child process, as root, on a scratch root (--root); its checks run in a
private mount namespace. The stand-in services log what they do outside the root (in its parent
directory), each line marked `staged` (run in the checks' namespace) or `live` (run in this one),
and a check can look at the live files from outside its namespace through /proc/TEST_PID/root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from infra.core.bundle import Bundle, BundleFile, Service
from infra.core.facts import APPLY_SCRIPT

APPLY = APPLY_SCRIPT


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
    env = {
        "PATH": os.environ["PATH"],
        "MAILROOM_TEST_NS": str(Path("/proc/self/ns/mnt").readlink()),
        **{k: v for k, v in fake_apt.items() if k.startswith("MAILROOM_")},
        **extra_env,
    }
    return subprocess.run(
        [sys.executable, str(APPLY), "--root", str(root), *extra_args],
        input=text,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


# Where a command runs: "live" in the test's own mount namespace, "staged" in the checks' one.
WHERE = 'w=staged; [ "$(readlink /proc/self/ns/mnt)" = "$MAILROOM_TEST_NS" ] && w=live'
# Beside the root, never under it: what the checks write under the root vanishes with their namespace.
OUTSIDE = '"$MAILROOM_ROOT/.."'
# The live files as this test's namespace sees them, from inside the checks' namespace.
LIVE = f"/proc/{os.getpid()}/root$MAILROOM_ROOT"
# One service's whole converge: prepared and checked on the staged files, prepared again once
# they are installed, reloaded.
CONVERGE = ["prepare:staged", "check:staged", "prepare:live", "reload:live"]
CHECKED = ["prepare:staged", "check:staged"]


def log(name: str, event: str) -> str:
    return f"{WHERE}; echo {event}:$w >> {OUTSIDE}/{name}.log"


def service(name: str, prefix: str, check: str = "true", *more_paths: str) -> Service:
    return Service(
        name,
        (prefix, *more_paths),
        prepare=(log(name, "prepare"),),
        check=(log(name, "check"), check),
        reload=log(name, "reload"),
    )


def events(root: Path, name: str) -> list[str]:
    path = root.parent / f"{name}.log"
    return path.read_text().split() if path.exists() else []


def seen(root: Path, name: str) -> str:
    """What a command recorded with `record(name, ...)`."""
    return (root.parent / name).read_text()


def record(name: str, command: str) -> str:
    return f"{{ {command}; }} > {OUTSIDE}/{name} 2>&1"


def mounts_under(root: Path) -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(root) in line]


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
    assert events(root, "postfix") == CONVERGE
    assert events(root, "dovecot") == CONVERGE
    assert not [p.name for p in (root / "etc/postfix").iterdir() if p.name != "main.cf"]  # no temporary left
    assert not (root / "var/lib/mailroom/stage").exists() and mounts_under(root) == []


def test_same_bundle_twice_changes_and_restarts_nothing(root: Path, fake_apt: dict[str, str]) -> None:
    summary(apply(two_services(), root, fake_apt))
    again = summary(apply(two_services(), root, fake_apt))
    assert again == {"changed": [], "reloaded": [], "installed": [], "removed_packages": []}
    assert events(root, "postfix") == CONVERGE
    assert events(root, "dovecot") == CONVERGE
    assert calls(fake_apt) == []  # postfix is installed: apt never ran


def test_a_one_line_change_reloads_only_its_service(root: Path, fake_apt: dict[str, str]) -> None:
    summary(apply(two_services(), root, fake_apt))
    done = summary(apply(two_services("size = 10\nextra = yes\n"), root, fake_apt))
    assert done["changed"] == ["/etc/postfix/main.cf"] and done["reloaded"] == ["postfix"]
    assert (root / "etc/postfix/main.cf").read_text() == "size = 10\nextra = yes\n"
    assert events(root, "postfix") == CONVERGE * 2
    assert events(root, "dovecot") == CONVERGE  # not prepared, checked nor reloaded again


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
    assert "nothing was installed and nothing was reloaded" in result.stderr
    assert {p: (root / p).read_bytes() for p in first} == first  # changed and removed files never left
    assert (root / "etc/dovecot/users").stat().st_mode & 0o7777 == 0o600
    assert not (root / "etc/postfix/conf.d").exists()  # neither the new file nor its new directory appeared
    # Prepared and checked on the staged files, refused; nothing ran on the live ones, nothing reloaded.
    assert events(root, "postfix") == [*CONVERGE, *CHECKED]
    assert events(root, "dovecot") == CONVERGE  # dovecot's turn never came
    # The server still converges from where it was: the good bundle is a no-op.
    assert summary(apply(two_services(), root, fake_apt))["changed"] == []


def test_a_broken_file_is_checked_where_it_belongs_and_never_live(root: Path, fake_apt: dict[str, str]) -> None:
    summary(apply(two_services(), root, fake_apt))
    main_cf = root / "etc/postfix/main.cf"
    before = main_cf.read_bytes(), main_cf.stat()
    checker = Service(
        "postfix",
        ("/etc/postfix/",),
        # A derived file next to its source, as postmap makes one.
        prepare=('cp "$MAILROOM_ROOT/etc/postfix/main.cf" "$MAILROOM_ROOT/etc/postfix/main.cf.db"',),
        check=(
            # While the checker runs: what it reads at the normal paths, and what is live meanwhile.
            record("inside", 'cat "$MAILROOM_ROOT/etc/postfix/main.cf" "$MAILROOM_ROOT/etc/postfix/main.cf.db"'),
            record("outside", f"cat {LIVE}/etc/postfix/main.cf; ls {LIVE}/etc/postfix"),
            'grep -q broken "$MAILROOM_ROOT/etc/postfix/main.cf" && echo "main.cf, line 1: bad size" >&2 && exit 1',
        ),
        reload=log("postfix", "reload"),
    )
    bundle = Bundle(files=two_services("size = broken\n").files, services=(checker, two_services().services[1]))
    result = apply(bundle, root, fake_apt)
    assert result.returncode == 1 and result.stdout == ""
    assert seen(root, "inside") == "size = broken\n" * 2  # the checker saw the new file where it belongs
    assert seen(root, "outside") == "size = 10\nmain.cf\n"  # while the live one stayed, without a new .db
    # The checker, the file it refused and what it said; nothing installed, nothing reloaded.
    assert "service postfix: `grep -q broken" in result.stderr and "on the new /etc/postfix/main.cf" in result.stderr
    assert "main.cf, line 1: bad size" in result.stderr and "exit 1" in result.stderr
    assert "nothing was installed and nothing was reloaded" in result.stderr
    after = main_cf.read_bytes(), main_cf.stat()
    assert after[0] == before[0] and (after[1].st_ino, after[1].st_mtime_ns) == (
        before[1].st_ino,
        before[1].st_mtime_ns,
    )
    assert sorted(p.name for p in (root / "etc/postfix").iterdir()) == ["main.cf"]
    assert events(root, "postfix") == CONVERGE and events(root, "dovecot") == CONVERGE
    assert not (root / "var/lib/mailroom/stage").exists() and mounts_under(root) == []  # the namespace left nothing


def test_single_files_and_new_directories_are_checked_in_place(root: Path, fake_apt: dict[str, str]) -> None:
    """A service owning a single file (with a derived file beside it, as newaliases makes) and a
    directory not made yet; a file no service owns comes along."""
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/aliases").write_text("root: admin\n")
    (root / "etc/aliases.db").write_text("root: admin\n")
    files = (
        BundleFile("/etc/aliases", "root: postmaster\n"),
        BundleFile("/etc/systemd/system/postfix.service.d/wait.conf", "[Unit]\n"),
        BundleFile("/etc/motd", "welcome\n"),
    )
    inside = 'cat "$MAILROOM_ROOT/etc/aliases.db" "$MAILROOM_ROOT/etc/systemd/system/postfix.service.d/wait.conf"'
    outside = f"cat {LIVE}/etc/aliases {LIVE}/etc/aliases.db; ls {LIVE}/etc; ls {LIVE}/etc/systemd/system"

    def postfix(check: str) -> Service:
        return Service(
            "postfix",
            ("/etc/aliases", "/etc/systemd/system/postfix.service.d/"),
            prepare=('cp "$MAILROOM_ROOT/etc/aliases" "$MAILROOM_ROOT/etc/aliases.db"', log("postfix", "prepare")),
            check=(record("inside", inside), record("outside", outside), check),
            reload=log("postfix", "reload"),
        )

    refused = apply(Bundle(files=files, services=(postfix("false"),)), root, fake_apt)
    assert refused.returncode == 1 and "service postfix: `false` on the new /etc/aliases" in refused.stderr
    assert seen(root, "inside") == "root: postmaster\n[Unit]\n"
    assert seen(root, "outside") == "root: admin\nroot: admin\naliases\naliases.db\nsystemd\n"
    assert (root / "etc/aliases").read_text() == (root / "etc/aliases.db").read_text() == "root: admin\n"
    assert sorted(p.name for p in (root / "etc").iterdir()) == ["aliases", "aliases.db", "systemd"]  # no motd
    assert not any((root / "etc/systemd/system").iterdir())  # no postfix.service.d/

    done = summary(apply(Bundle(files=files, services=(postfix("true"),)), root, fake_apt))
    assert done["changed"] == [f.path for f in sorted(files, key=lambda f: f.path)] and done["reloaded"] == ["postfix"]
    assert (root / "etc/aliases.db").read_text() == "root: postmaster\n"  # prepared again on the live files
    assert (root / "etc/motd").read_text() == "welcome\n"
    assert (root / "etc/systemd/system/postfix.service.d/wait.conf").read_text() == "[Unit]\n"
    assert events(root, "postfix") == ["prepare:staged", "prepare:staged", "prepare:live", "reload:live"]


def test_a_good_change_is_checked_before_it_is_live_then_installed(root: Path, fake_apt: dict[str, str]) -> None:
    summary(apply(two_services(), root, fake_apt))
    watching = record("outside", f"cat {LIVE}/etc/postfix/main.cf; ls {LIVE}/etc/dovecot")
    postfix = service("postfix", "/etc/postfix/", watching)
    # dovecot's users leave the bundle: its checker no longer sees them, while they are still live.
    dovecot = service("dovecot", "/etc/dovecot/", 'test ! -e "$MAILROOM_ROOT/etc/dovecot/users"')
    files = (*two_services("size = 20\n").files[:2],)
    done = summary(apply(Bundle(files=files, services=(postfix, dovecot)), root, fake_apt))
    assert seen(root, "outside") == "size = 10\ndovecot.conf\nusers\n"
    assert done["changed"] == ["/etc/dovecot/users", "/etc/postfix/main.cf"]
    assert done["reloaded"] == ["postfix", "dovecot"]
    assert (root / "etc/postfix/main.cf").read_text() == "size = 20\n"
    assert not (root / "etc/dovecot/users").exists()
    assert events(root, "postfix") == CONVERGE * 2 and events(root, "dovecot") == CONVERGE * 2
    # Then a change to postfix alone: only postfix is prepared, checked and reloaded.
    files = (*two_services("size = 30\n").files[:2],)
    done = summary(apply(Bundle(files=files, services=(postfix, dovecot)), root, fake_apt))
    assert done["changed"] == ["/etc/postfix/main.cf"] and done["reloaded"] == ["postfix"]
    assert seen(root, "outside") == "size = 20\ndovecot.conf\n"
    assert events(root, "postfix") == CONVERGE * 3 and events(root, "dovecot") == CONVERGE * 2


def test_files_under_a_path_overlayfs_cannot_name_are_refused(tmp_path: Path, fake_apt: dict[str, str]) -> None:
    root = tmp_path / "a,root"
    root.mkdir()
    result = apply(two_services(), root, fake_apt)
    assert result.returncode == 1 and "mailroom cannot check files under a path with" in result.stderr
    assert not (root / "etc").exists()


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


def test_a_prepare_failing_on_the_installed_files_puts_them_back(root: Path, fake_apt: dict[str, str]) -> None:
    summary(apply(two_services(), root, fake_apt))
    # Passes on the staged files, fails once they are installed (a disk full, say).
    flaky = f'{WHERE}; [ "$w" = staged ] || {{ echo "postmap: fatal: No space left" >&2; exit 4; }}'
    postfix = Service("postfix", ("/etc/postfix/",), prepare=(flaky, log("postfix", "prepare")), reload="false")
    result = apply(Bundle(files=two_services("size = 20\n").files, services=(postfix,)), root, fake_apt)
    assert result.returncode == 1 and "on the installed files failed (exit 4)" in result.stderr
    assert "No space left" in result.stderr and "the previous files are back in place" in result.stderr
    assert (root / "etc/postfix/main.cf").read_text() == "size = 10\n"
    # Staged; failed on the installed files; run again on the restored ones (postmap's .db follows
    # them), where the flaky step fails again and is reported; never reloaded.
    assert events(root, "postfix")[len(CONVERGE) :] == ["prepare:staged", "prepare:live"]
    assert "while restoring" in result.stderr
    assert summary(apply(two_services(), root, fake_apt))["changed"] == []


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
    # The first command to run on the staged copy, then on the installed file, sees it root-only.
    mode = f'stat -c %a "$MAILROOM_ROOT/etc/dovecot/users" >> {OUTSIDE}/mode-seen'
    watched = Service("dovecot", ("/etc/dovecot/",), prepare=(mode,))
    result = apply(Bundle(files=bundle.files, services=(bundle.services[0], watched)), root, fake_apt)
    summary(result)
    assert seen(root, "mode-seen") == "600\n600\n"
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
    assert (root / "postfix.log").read_text().split() == ["reload"]


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


def test_install_questions_are_answered_before_packages_are_installed(
    root: Path, tmp_path: Path, fake_apt: dict[str, str]
) -> None:
    """The bundle's debconf selections reach debconf-set-selections on stdin, before apt-get runs,
    and only when something is to be installed (answers change nothing once a package is there)."""
    selections = tmp_path / "selections"
    tool = tmp_path / "debconf-set-selections"
    tool.write_text(f'#!/bin/sh\ncat >> {selections}\necho "preseed" >> {fake_apt["log"]}\n')
    tool.chmod(0o755)
    line = "roundcube-core roundcube/database-type select sqlite3"
    bundle = Bundle(files=(), packages=("roundcube-core",), debconf=(line,))
    done = summary(apply(bundle, root, fake_apt, MAILROOM_DEBCONF_SET_SELECTIONS=str(tool)))
    assert done["installed"] == ["roundcube-core"]
    assert selections.read_text() == line + "\n"
    assert [c.split()[0] for c in calls(fake_apt)] == ["preseed", "-o"]  # answered first, then apt-get
    summary(apply(bundle, root, fake_apt, MAILROOM_DEBCONF_SET_SELECTIONS=str(tool)))
    assert selections.read_text() == line + "\n"  # nothing to install: not asked again


@pytest.mark.parametrize(
    "line",
    ["roundcube-core only-two", "Roundcube_Core roundcube/database-type select sqlite3", "a q select x\nb q select y"],
)
def test_a_malformed_debconf_selection_is_refused(root: Path, fake_apt: dict[str, str], line: str) -> None:
    result = apply(Bundle(files=(), packages=("roundcube-core",), debconf=(line,)), root, fake_apt)
    assert result.returncode != 0 and "is not a debconf selection" in result.stderr
    assert calls(fake_apt) == []


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
    assert events(root, "postfix") == CONVERGE  # nothing ran
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


def test_each_service_reloads_on_its_new_files_before_the_next_ones_appear(
    root: Path, fake_apt: dict[str, str]
) -> None:
    """A milter Postfix points at, listed first, is reloaded while Postfix's main.cf is still the
    old one: Postfix never sees a milter setting before the milter runs on its new files."""
    summary(apply(two_services(), root, fake_apt))
    milter = Service(
        "milter", ("/etc/milter/",),
        reload=record("milter-reload", f"cat {LIVE}/etc/postfix/main.cf {LIVE}/etc/milter/milter.conf"),
    )  # fmt: skip
    postfix = Service("postfix", ("/etc/postfix/",), reload=record("postfix-reload", f"cat {LIVE}/etc/postfix/main.cf"))
    files = (BundleFile("/etc/milter/milter.conf", "socket = new\n"), BundleFile("/etc/postfix/main.cf", "size = 20\n"),
             *two_services().files[1:])  # fmt: skip
    bundle = Bundle(files=files, services=(milter, postfix, service("dovecot", "/etc/dovecot/")), packages=("postfix",))
    done = summary(apply(bundle, root, fake_apt))
    assert done["reloaded"] == ["milter", "postfix"]
    assert seen(root, "milter-reload") == "size = 10\nsocket = new\n"
    assert seen(root, "postfix-reload") == "size = 20\n"
