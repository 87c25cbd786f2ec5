"""The admin's SSH keys follow the settings: cloud-init writes them at first boot only, so the
bundle carries them on every apply. A key added to sshPublicKeys logs in after `pulumi up`; taken
out again, it is refused, while the deploy key keeps working."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from infra.core.settings import parse_settings
from infra.core.stack import stack_config
from infra.lab import deploy, host
from infra.lab.state import LabInfo
from tests.support.lab import LAB_MARKS

pytestmark = LAB_MARKS


def key_pair(directory: Path) -> tuple[Path, str]:
    key = ed25519.Ed25519PrivateKey.generate()
    private = directory / "colleague"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    private.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public.decode() + " colleague@example.org"


def login(lab: LabInfo, key: Path) -> subprocess.CompletedProcess[str]:
    """`ssh -i KEY admin@host whoami` from the outside world, with that key only."""
    argv = host.ssh_argv(dataclasses.replace(lab, key_file=str(key)), "whoami")
    argv[argv.index("ssh") + 1 : argv.index("ssh") + 1] = ["-o", "IdentitiesOnly=yes"]
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)


def test_a_key_taken_out_of_the_settings_can_no_longer_log_in(lab: LabInfo, tmp_path: Path) -> None:
    if lab.overrides.get("spamFilter") == "rspamd":
        pytest.skip("the admin's keys do not depend on the spam filter: tested once, in spamassassin mode")
    private, public = key_pair(tmp_path)
    keys = list(parse_settings(stack_config(lab.stack, lab.overrides)).ssh_public_keys)
    assert login(lab, private).returncode == 255  # not yet authorised
    try:
        steps = deploy.redeploy({"sshPublicKeys": [*keys, public]})
        assert [s["name"] for s in steps if s["exit"] != 0] == []
        added = login(lab, private)
        assert (added.returncode, added.stdout.strip()) == (0, lab.admin_user), added.stderr
    finally:
        steps = deploy.redeploy()  # the settings as they were: the colleague's key taken out
    assert [s["name"] for s in steps if s["exit"] != 0] == []
    removed = login(lab, private)
    assert removed.returncode == 255 and "Permission denied (publickey)" in removed.stderr
    # The deploy key is among the keys every apply writes: the next remote command still gets in.
    assert host.guest("whoami", lab).stdout.strip() == lab.admin_user
    authorized = host.guest(f"stat -c '%a %U' /home/{lab.admin_user}/.ssh/authorized_keys", lab).stdout.split()
    assert authorized == ["600", lab.admin_user]
