"""The offline commands a reviewer runs without cloud credentials: plan and zone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dns.zone
import pytest

from infra import offline
from infra.cli import OFFLINE_BANNER, main
from infra.settings import parse_settings
from infra.stack import stack_config


def test_plan_prints_the_resource_tree_labelled_offline(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--stack", "prod"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == OFFLINE_BANNER
    assert lines[1].startswith("stack prod: ") and lines[1].endswith(" resources")
    assert "+ mailroom:index:MailHost  mail" in out
    assert "  + digitalocean:index/droplet:Droplet  mail-droplet  [ignore-changes: userData,image,sshKeys]" in out
    assert "digitalocean:index/volume:Volume  mail-mail  [protect; retain-on-delete]" in out
    assert "      name: mx1.example.org" in out
    assert "  sesSmtpPassword: [secret]" in out and "  certbotToken: [secret]" in out


def test_plan_never_shows_a_secret(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--stack", "dev"]) == 0
    out = capsys.readouterr().out
    generated = [v for state in offline._GENERATED.values() for v in state.values() if len(v) > 12]
    hashes = [b.password_hash.reveal() for b in parse_settings(stack_config("dev")).mailboxes]
    assert generated and hashes
    for secret in generated + hashes:
        for line in secret.splitlines():
            if len(line) > 12 and not line.startswith("-----") and not line.startswith("ssh-"):
                assert line not in out
    assert "stdin: [secret]" in out


def test_plan_with_an_override_and_a_bad_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--stack", "dev", "--set", "relay=direct"]) == 0
    assert "aws:" not in capsys.readouterr().out
    assert main(["plan", "--stack", "dev", "--set", "spamFilter=bogofilter"]) == 2
    err = capsys.readouterr().err
    assert "spamFilter: 'bogofilter' is not accepted; accepted: spamassassin, rspamd" in err


def test_unknown_stack_names_the_stacks_there_are(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--stack", "staging"]) == 2
    assert "stack 'staging': no file Pulumi.staging.yaml; stacks here: dev, prod" in capsys.readouterr().err


def test_zone_prints_a_zone_file_that_dns_tools_load(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["zone", "--stack", "dev"]) == 0
    text = capsys.readouterr().out
    zone = dns.zone.from_text(text, origin="example.net", relativize=False, check_origin=False)
    assert [str(r.exchange) for r in zone.find_rdataset("example.net.", "MX")] == ["mail.example.net."]
    assert [r.address for r in zone.find_rdataset("mail.example.net.", "A")] == [offline.DROPLET_IPV4]
    assert len(zone.find_rdataset("mail._domainkey.example.net.", "TXT")) == 1


def test_python_dash_m_infra_runs_as_documented() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "infra", "zone", "--stack", "dev"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "IN\tMX\t10 mail.example.net." in result.stdout


def test_render_writes_user_data_and_bundle_with_placeholder_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["render", "--stack", "dev", "--set", "spamFilter=rspamd", "--out", str(tmp_path)]) == 0
    assert "secrets are placeholders" in capsys.readouterr().out
    assert (tmp_path / "user-data").read_text().startswith("#cloud-config\n")
    assert (tmp_path / "bundle/etc/rspamd/local.d/dkim_signing.conf").exists()
    assert not (tmp_path / "bundle/etc/opendkim.conf").exists()
    cloudflare = (tmp_path / "bundle/etc/letsencrypt/mailroom-cloudflare.ini").read_text()
    assert "<secret: the Cloudflare DNS token from Pulumi state>" in cloudflare
    assert oct((tmp_path / "bundle/etc/dovecot/users").stat().st_mode & 0o777) == "0o640"
    bundle = json.loads((tmp_path / "bundle.json").read_text())
    assert {f["path"] for f in bundle["files"]} == {
        "/" + str(p.relative_to(tmp_path / "bundle")) for p in (tmp_path / "bundle").rglob("*") if p.is_file()
    }
