"""The droplet's user-data: valid cloud-config, the whole bootstrap the design asks for, no secret.

The volume script is run for real: on a loop device standing in for the DigitalOcean volume,
inside a private mount namespace so that the mount unit it writes, /dev/disk and the mail directory it
touches are scratch copies, never this machine's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.core.dns import Facts
from infra.core.facts import BOOTSTRAP_MARKER, MAIL_DIR, MOUNT_VOLUME_SCRIPT
from infra.core.modes import packages
from infra.core.render import render_bundle
from infra.core.settings import Settings, parse_settings
from infra.core.stack import stack_config
from infra.core.user_data import (
    SWAP_BYTES,
    VOLUME_LABEL,
    mount_unit,
    render_mount_volume_script,
    render_user_data,
    volume_device,
)
from infra.tools.stand_ins import generated_secrets

IMAGES = ("ubuntu-24-04-x64", "debian-12-x64")
SECRETS = generated_secrets()
# Deploy-time facts for the status check's expected records (documentation addresses).
FACTS = Facts("198.51.100.10", "2001:db8::10", "AAAA", ("token0", "token1", "token2"))


def settings_for(**overrides: Any) -> Settings:
    if overrides.get("relay") == "smtp2go":
        overrides.setdefault("smtp2goUsername", "mailroom")
    return parse_settings(stack_config("dev", overrides))


def cloud_config(settings: Settings) -> dict[str, Any]:
    text = render_user_data(settings)
    assert text.startswith("#cloud-config\n")
    document = yaml.safe_load(text)
    assert isinstance(document, dict)
    return document


def written(document: dict[str, Any], path: str) -> dict[str, Any]:
    files: dict[str, dict[str, Any]] = {f["path"]: f for f in document["write_files"]}
    return files[path]


@pytest.mark.daemons
@pytest.mark.skipif(shutil.which("cloud-init") is None, reason="cloud-init is not installed (requirements-debian.txt)")
@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize("spam", ["spamassassin", "rspamd"])
def test_user_data_is_valid_cloud_config(tmp_path: Path, image: str, spam: str) -> None:
    user_data = tmp_path / "user-data"
    user_data.write_text(render_user_data(settings_for(image=image, spamFilter=spam, webmail=True)))
    result = subprocess.run(
        ["cloud-init", "schema", "--config-file", str(user_data)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("Valid cloud-config")


def test_the_host_is_named_and_resolves_itself() -> None:
    document = cloud_config(settings_for())
    assert (document["hostname"], document["fqdn"]) == ("mail", "mail.example.net")
    assert document["manage_etc_hosts"] is True


def test_only_the_admin_user_logs_in_with_its_keys_and_sudo() -> None:
    settings = settings_for()
    document = cloud_config(settings)
    (user,) = document["users"]
    assert user["name"] == settings.admin_user
    assert user["ssh_authorized_keys"] == list(settings.ssh_public_keys)
    assert user["lock_passwd"] is True and "sudo" in user["groups"]
    assert document["disable_root"] is True and document["ssh_pwauth"] is False
    sshd = written(document, "/etc/ssh/sshd_config.d/10-mailroom.conf")["content"].splitlines()
    for line in ("PermitRootLogin no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
                 f"AllowUsers {settings.admin_user}", "AuthenticationMethods publickey"):  # fmt: skip
        assert line in sshd


@pytest.mark.skipif(shutil.which("sshd") is None, reason="openssh-server is not installed")
def test_sshd_accepts_the_hardening(tmp_path: Path) -> None:
    document = cloud_config(settings_for())
    conf = tmp_path / "sshd_config"
    conf.write_text(written(document, "/etc/ssh/sshd_config.d/10-mailroom.conf")["content"])
    key = tmp_path / "host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    result = subprocess.run(
        ["sshd", "-t", "-f", str(conf), "-h", str(key)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_a_swap_file_sized_for_a_small_droplet() -> None:
    swap = cloud_config(settings_for())["swap"]
    assert swap == {"filename": "/swapfile", "size": SWAP_BYTES, "maxsize": SWAP_BYTES}


@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize(("spam", "webmail", "relay"), [("spamassassin", False, "ses"), ("rspamd", True, "direct")])
def test_the_packages_of_the_chosen_modes_come_from_the_distribution(
    image: str, spam: str, webmail: bool, relay: str
) -> None:
    settings = settings_for(image=image, spamFilter=spam, webmail=webmail, relay=relay)
    document = cloud_config(settings)
    assert document["packages"] == list(packages(settings))
    assert document["package_update"] is True
    wanted = {"spamassassin": "spamd", "rspamd": "rspamd"}[spam]
    unwanted = {"spamassassin": "rspamd", "rspamd": "spamd"}[spam]
    assert wanted in document["packages"] and unwanted not in document["packages"]
    assert ("roundcube-core" in document["packages"]) is webmail
    # What the bundle will need is already there after the bootstrap: no apt run on first apply.
    assert set(render_bundle(settings, SECRETS, FACTS).packages) <= set(document["packages"])
    # Nothing is fetched and piped into a shell: every command is a plain list.
    commands = [" ".join(c) if isinstance(c, list) else c for c in document["runcmd"]]
    assert not [c for c in commands if "curl" in c or "wget" in c]


@pytest.mark.daemons
@pytest.mark.skipif(shutil.which("debconf-set-selections") is None, reason="debconf is not installed")
def test_webmail_answers_roundcubes_database_question_before_the_packages(tmp_path: Path) -> None:
    """With OpenDMARC (SpamAssassin mode) dbconfig-mysql is installed too, and dbconfig-common would
    set Roundcube up for a MySQL that is not there: bootcmd, which runs before cloud-init installs
    packages, answers SQLite first, in a form debconf-set-selections checks and accepts."""
    with_webmail = cloud_config(settings_for(spamFilter="spamassassin", webmail=True))
    (command,) = with_webmail["bootcmd"]
    assert command.startswith("debconf-set-selections <<'EOF'\n")
    lines = command.splitlines()[1:-1]
    assert lines == ["roundcube-core roundcube/database-type select sqlite3"]
    checked = subprocess.run(
        ["debconf-set-selections", "--checkonly"], input="\n".join(lines) + "\n", capture_output=True, text=True
    )
    assert checked.returncode == 0 and not checked.stderr, checked.stderr
    assert "bootcmd" not in cloud_config(settings_for(spamFilter="spamassassin", webmail=False))


def test_security_upgrades_are_automatic_and_fail2ban_is_enabled() -> None:
    document = cloud_config(settings_for())
    periodic = written(document, "/etc/apt/apt.conf.d/20auto-upgrades")["content"]
    assert 'APT::Periodic::Unattended-Upgrade "1";' in periodic
    assert "unattended-upgrades" in document["packages"] and "fail2ban" in document["packages"]
    assert ["systemctl", "enable", "--now", "unattended-upgrades.service"] in document["runcmd"]
    assert ["systemctl", "enable", "fail2ban.service"] in document["runcmd"]


def test_the_bootstrap_marker_waits_for_the_mail_volume() -> None:
    from infra.core.steps import WAIT

    document = cloud_config(settings_for())
    script = written(document, MOUNT_VOLUME_SCRIPT)
    assert script["permissions"] == "0755"
    assert script["content"] == render_mount_volume_script(settings_for())
    assert document["runcmd"][-1] == ["sh", "-c", f"{MOUNT_VOLUME_SCRIPT} && touch {BOOTSTRAP_MARKER}"]
    assert f"[ ! -e {BOOTSTRAP_MARKER} ]" in WAIT.create, "the deploy waits for the marker the bootstrap writes"


@pytest.mark.parametrize("relay", ["ses", "smtp2go", "direct"])
@pytest.mark.parametrize("webmail", [False, True])
def test_user_data_holds_no_secret(relay: str, webmail: bool) -> None:
    settings = settings_for(relay=relay, webmail=webmail, spamhausDqsKey="dqs-key-not-for-user-data")
    user_data = render_user_data(settings)
    secrets = [b.password_hash.reveal() for b in settings.mailboxes]
    secrets += [settings.smtp2go_password.reveal(), settings.spamhaus_dqs_key.reveal()]
    secrets += [SECRETS.relay_password, SECRETS.certbot_token, SECRETS.webmail_des_key]
    secrets += SECRETS.dkim_private_key_pem.splitlines()[1:-1]
    assert [s for s in secrets if s] and not [s for s in secrets if s and s in user_data]
    assert "PRIVATE KEY" not in user_data


# --- the mail volume, for real --------------------------------------------------------------------

can_mount = os.geteuid() == 0 and all(shutil.which(t) for t in ("unshare", "losetup", "mkfs.ext4", "blkid"))


@pytest.fixture
def loop_volume(tmp_path: Path) -> Iterator[str]:
    image = tmp_path / "volume.img"
    with image.open("wb") as f:
        f.truncate(64 * 1024 * 1024)
    attached = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=False)
    if attached.returncode != 0:
        pytest.skip(f"no loop device available here: {attached.stderr.strip()}")
    device = attached.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)


def run_mount_script(script: str, loop: str | None, scratch: Path, after: str = "") -> subprocess.CompletedProcess[str]:
    """Run the script in a private mount namespace where /var/mail is scratch, on LOOP in place of
    the DigitalOcean device (this machine has no /dev/disk/by-id to link it in); the unit it
    installs lands in SCRATCH/units instead of /etc/systemd/system."""
    settings = settings_for()
    script = script.replace(volume_device(settings), loop or str(scratch / "no-volume-attached"))
    script = script.replace("/etc/systemd/system/", f"{scratch}/units/")
    (scratch / "units").mkdir(exist_ok=True)
    (scratch / "script").write_text(script)
    bin_dir = scratch / "bin"
    bin_dir.mkdir(exist_ok=True)
    # No systemd manager here: its daemon-reload is recorded instead.
    (bin_dir / "systemctl").write_text(f'#!/bin/sh\necho "$*" >> {scratch}/systemctl.log\n')
    (bin_dir / "systemctl").chmod(0o755)
    inner = f"""set -e
mount --make-rprivate /
mount -t tmpfs scratch /var/mail
PATH={bin_dir}:$PATH sh {scratch}/script
{after}
"""
    return subprocess.run(
        ["unshare", "--mount", "sh", "-c", inner], capture_output=True, text=True, check=False, timeout=120
    )


@pytest.mark.skipif(not can_mount, reason="needs root, unshare, losetup, mkfs.ext4 and blkid")
def test_an_empty_volume_is_formatted_and_mounted_at_the_mail_dir(loop_volume: str, tmp_path: Path) -> None:
    script = render_mount_volume_script(settings_for())
    result = run_mount_script(script, loop_volume, tmp_path, after=f"findmnt -n -o FSTYPE {MAIL_DIR}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ext4"]
    label = subprocess.run(["blkid", "-p", "-o", "value", "-s", "LABEL", loop_volume], capture_output=True, text=True)
    assert label.stdout.strip() == VOLUME_LABEL
    unit = (tmp_path / "units" / mount_unit()).read_text()
    assert f"What={loop_volume}\nWhere={MAIL_DIR}\nType=ext4\n" in unit
    assert "WantedBy=multi-user.target" in unit and "local-fs.target" not in unit
    assert (tmp_path / "systemctl.log").read_text().splitlines() == ["daemon-reload", f"enable {mount_unit()}"]


@pytest.mark.skipif(not can_mount, reason="needs root, unshare, losetup, mkfs.ext4 and blkid")
def test_a_volume_with_mail_is_never_reformatted(loop_volume: str, tmp_path: Path) -> None:
    subprocess.run(["mkfs.ext4", "-q", "-L", "old-mail", loop_volume], check=True)
    script = render_mount_volume_script(settings_for())
    # Mail written on the first run must still be there when the script runs again.
    first = run_mount_script(script, loop_volume, tmp_path, after=f"echo kept > {MAIL_DIR}/message")
    assert first.returncode == 0, first.stderr
    again = run_mount_script(script, loop_volume, tmp_path, after=f"cat {MAIL_DIR}/message")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "kept"
    label = subprocess.run(["blkid", "-p", "-o", "value", "-s", "LABEL", loop_volume], capture_output=True, text=True)
    assert label.stdout.strip() == "old-mail"
    calls = (tmp_path / "systemctl.log").read_text().splitlines()
    assert calls == ["daemon-reload", f"enable {mount_unit()}"], "running it again changes no unit"


@pytest.mark.skipif(not can_mount, reason="needs root and unshare")
def test_a_missing_volume_fails_the_bootstrap_with_a_reason(tmp_path: Path) -> None:
    script = render_mount_volume_script(settings_for(), wait_seconds=2)
    result = run_mount_script(script, None, tmp_path)
    assert result.returncode == 1
    assert f"no mail volume at {tmp_path}/no-volume-attached after 2 s" in result.stderr
    assert not (tmp_path / "units" / mount_unit()).exists()


@pytest.mark.daemons
@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (requirements-debian.txt)")
def test_the_volume_script_passes_shellcheck(tmp_path: Path) -> None:
    script = tmp_path / "mailroom-mount-volume"
    script.write_text(render_mount_volume_script(settings_for()))
    result = subprocess.run(["shellcheck", "--shell=sh", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout
