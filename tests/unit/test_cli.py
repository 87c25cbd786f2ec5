"""The offline commands a reviewer runs without cloud credentials: plan, zone and render."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import dns.zone
import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from infra.core.dns import dkim_public_key_body, records
from infra.core.settings import parse_settings
from infra.core.stack import stack_config
from infra.tools import rehearsal as offline
from infra.tools.cli import OFFLINE_BANNER, PLACEHOLDER_DEPLOY_KEY, main
from tests.conftest import offline_run


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
    assert "  sesSmtpPassword:" not in out and "  certbotToken:" not in out  # no longer outputs


def test_plan_never_shows_a_secret(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--stack", "dev"]) == 0
    out = capsys.readouterr().out
    # The generated secrets; the public halves of the keys are published (DNS, user-data), and a
    # private key file holds its public key too: those lines are public, the rest must not show.
    states = list(offline._GENERATED.values())
    published = " ".join(
        dkim_public_key_body(state["publicKeyPem"]) + " " + state["publicKeyOpenssh"]
        for state in states
        if "publicKeyPem" in state
    )
    generated = [v for state in states for k, v in state.items() if not k.startswith("public") and len(v) > 12]
    hashes = [b.password_hash.reveal() for b in parse_settings(stack_config("dev")).mailboxes]
    assert generated and hashes
    for secret in generated + hashes:
        assert secret not in out
        for line in secret.splitlines():
            if len(line) > 12 and not line.startswith("-----") and line not in published:
                assert line not in out
    assert "stdin: [secret]" in out


def test_plan_with_an_override_and_a_bad_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--stack", "dev", "--set", "relay=direct", "--set", "backupTarget=none"]) == 0
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


def test_plan_shows_rules_policies_and_records_readably(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--stack", "dev"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    # One firewall rule per line, in full.
    assert "        - portRange: 22, protocol: tcp, sourceAddresses: [198.51.100.0/24, 2001:db8:100::/48]" in lines
    assert "        - portRange: 25, protocol: tcp, sourceAddresses: [0.0.0.0/0, ::/0]" in lines
    assert "        - protocol: icmp, sourceAddresses: [0.0.0.0/0, ::/0]" in lines
    # The IAM policy as indented JSON: its action and condition can be read.
    assert '              "Action": "ses:SendRawEmail",' in lines
    assert '                  "ses:FromAddress": [' in lines
    assert '                    "*@example.net",' in lines and '                    "*@*.example.net"' in lines
    # Every option the program sets, beside its resource.
    assert "  + digitalocean:index/volume:Volume  mail-mail  [protect; retain-on-delete]" in lines
    assert (
        "  + digitalocean:index/volumeAttachment:VolumeAttachment  mail-mail-attachment  [delete-before-replace]"
        in lines
    )
    assert "  + aws:iam/user:User  ses-smtp-user  [provider: ses-aws]" in lines
    (apply_line,) = [line for line in lines if "  server-apply-bundle  " in line]
    assert "secret-outputs: stdout,stderr," in apply_line
    assert apply_line.endswith("depends-on: server-install-apply-script]")  # the remote steps' order
    # DMARC and DKIM records in full, as Cloudflare gets them.
    run = offline.run_program("dev")
    by_key = {r.key: r for r in records(run.settings, run.facts())}
    for key in ("dmarc", "dkim", "spf"):
        assert f"      content: {by_key[key].rdata()}" in lines, key
    assert "      value: 90" in lines and "      sshKeys: [" in out  # numbers and lists as written
    # Only the long texts are summarised, and the summary says where to read them.
    summarised = [line.strip().split(":")[0] for line in lines if line.endswith(" characters)")]
    assert sorted(summarised) == ["stdin", "userData"]
    assert "(in full: python -m infra render --stack dev --out DIR)" in out


def droplet_user_data() -> tuple[str, str]:
    """The user-data the droplet gets in an offline run, and the deploy key in it."""
    run = offline_run("dev")
    deploy_key = run.named("deploy-key").state["publicKeyOpenssh"].strip()
    user_data = run.one("digitalocean:index/droplet:Droplet").inputs["userData"]
    assert deploy_key in user_data
    return user_data, deploy_key


def test_render_writes_the_droplets_user_data_with_a_placeholder_deploy_key(tmp_path: Path) -> None:
    assert main(["render", "--stack", "dev", "--out", str(tmp_path)]) == 0
    rendered = (tmp_path / "user-data").read_text()
    user_data, deploy_key = droplet_user_data()
    assert rendered == user_data.replace(deploy_key, PLACEHOLDER_DEPLOY_KEY)
    (admin,) = yaml.safe_load(rendered)["users"]
    stack_keys = list(parse_settings(stack_config("dev")).ssh_public_keys)
    assert admin["ssh_authorized_keys"] == [*stack_keys, PLACEHOLDER_DEPLOY_KEY]
    assert "PLACEHOLDER" in PLACEHOLDER_DEPLOY_KEY
    with pytest.raises(ValueError):  # clearly fake: not a key anything would accept
        serialization.load_ssh_public_key(PLACEHOLDER_DEPLOY_KEY.encode())
    assert not (tmp_path / "deploy-key").exists()


def test_render_with_generated_secrets_has_a_usable_deploy_key(tmp_path: Path) -> None:
    assert main(["render", "--stack", "dev", "--generate-secrets", "--out", str(tmp_path)]) == 0
    private_file = tmp_path / "deploy-key"
    assert oct(private_file.stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "bundle.json").stat().st_mode & 0o777) == "0o600"  # it holds every secret file
    private = serialization.load_ssh_private_key(private_file.read_bytes(), password=None)
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    rendered = (tmp_path / "user-data").read_text()
    user_data, deploy_key = droplet_user_data()
    assert public.decode() != deploy_key
    assert rendered == user_data.replace(deploy_key, public.decode())
    (admin,) = yaml.safe_load(rendered)["users"]
    assert admin["ssh_authorized_keys"][-1] == public.decode()


def test_plan_shows_every_option_of_every_resource(capsys: pytest.CaptureFixture[str]) -> None:
    """Each option a resource was declared with appears on its line, read from what the engine got."""
    assert main(["plan", "--stack", "dev"]) == 0
    lines = capsys.readouterr().out.splitlines()
    run = offline.run_program("dev")
    for r in run.resources:
        (line,) = [ln for ln in lines if ln.split()[:3] == ["+", r.type, r.name]]
        wanted = [flag for flag, on in (("protect", r.protect), ("retain-on-delete", r.retain_on_delete)) if on]
        wanted += ["delete-before-replace"] * r.delete_before_replace
        wanted += [*r.ignore_changes, *r.replace_on_changes, *r.additional_secret_outputs]
        wanted += [urn.split("::")[-1] for urn in r.depends_on]
        missing = [flag for flag in wanted if flag not in line]
        assert not missing, f"{r.name}: {missing} not on {line!r}"
    assert sum("depends-on: " in ln for ln in lines) >= 5  # every remote step waits for the one before


@pytest.mark.parametrize("command", ["check", "backup", "plan", "render", "lab"])
def test_every_option_of_a_command_is_explained_in_its_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    usage, _, options = capsys.readouterr().out.partition("options:")
    flags = sorted(set(re.findall(r"\[(--[a-z-]+)", usage)) - {"--help"})
    assert flags, usage
    lines = [*options.splitlines(), ""]
    for flag in flags:
        (at,) = [i for i, ln in enumerate(lines) if re.match(rf"\s+{flag}\b", ln)]
        # argparse puts the help after the option, or on the next line when the option is long.
        same_line = re.split(r"\s{2,}", lines[at].strip(), maxsplit=1)[1:]
        explained = same_line[0] if same_line else lines[at + 1].strip()
        assert explained and not explained.startswith("-"), f"`{command} {flag}` has no help text"


FAKE_PULUMI = """#!/bin/sh
# Stands for the Pulumi CLI: records how it was called, answers as the real one does.
printf '%s\\n' "$*" >> "$(dirname "$0")/calls"
case "$1 $2" in
  "config get") echo "dqs-key-from-the-encrypted-stack" ;;
  "stack output") echo '{"ipv4": "203.0.113.10", "ipv6": "2001:db8::10"}' ;;
  *) exit 1 ;;
esac
"""


def test_check_reads_an_encrypted_dqs_key_with_the_pulumi_cli_off_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stack whose spamhausDqsKey is encrypted: the check asks `pulumi config get` for it (the
    key comes back on a pipe), asks the DQS zones with it, and never prints it."""
    from infra.tools import check, cli

    pulumi = tmp_path / "pulumi"
    pulumi.write_text(FAKE_PULUMI)
    pulumi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setattr(cli, "encrypted_keys", lambda stack: ["spamhausDqsKey"])
    asked: list[str] = []

    def run(target: check.Target, groups: list[str]) -> list[object]:
        asked.append(target.settings.spamhaus_dqs_key.reveal())
        return []

    monkeypatch.setattr(check, "run", run)
    assert main(["check", "--stack", "dev", "--no-ssh", "--no-aws", "--only", "blocklists"]) == 0
    assert asked == ["dqs-key-from-the-encrypted-stack"]
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == ["config get mailroom:spamhausDqsKey --stack dev", "stack output --json --stack dev"]
    assert "dqs-key-from-the-encrypted-stack" not in capsys.readouterr().out


def test_check_without_the_pulumi_cli_says_why_it_cannot_read_an_encrypted_dqs_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from infra.tools import cli

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(cli, "encrypted_keys", lambda stack: ["spamhausDqsKey"])
    outputs = tmp_path / "outputs.json"
    outputs.write_text('{"ipv4": "203.0.113.10", "ipv6": "2001:db8::10"}')
    assert main(["check", "--stack", "dev", "--outputs", str(outputs), "--no-ssh", "--only", "dns"]) == 3
    err = capsys.readouterr().err
    assert "the stack holds spamhausDqsKey encrypted: reading it needs the Pulumi CLI" in err


def test_encrypted_keys_are_the_stack_files_secure_values(tmp_path: Path) -> None:
    from infra.core.stack import encrypted_keys

    (tmp_path / "Pulumi.x.yaml").write_text(
        "config:\n  mailroom:spamhausDqsKey:\n    secure: v1:abc\n  mailroom:domain: example.net\n"
        "  digitalocean:token:\n    secure: v1:def\n"
    )
    assert encrypted_keys("x", tmp_path) == ["spamhausDqsKey"]
