"""Secrets stay secret. After a full lab deploy, and while a changed setting is deployed
and then undone, no secret appears where someone without root could read it: not in the
droplet's user-data (DigitalOcean shows it to anyone with API access), not on a command line
(`ps` shows every user every process's arguments), not in the system logs, not in the remote
commands' output (Pulumi shows it), not in a world-readable file on the host, not in what the
owner's tools print, not in the daily status mail that leaves the server.

The secrets are the lab's real ones, taken from where the lab keeps them: the mailbox passwords
and their hashes (lab.json), the SES SMTP password (ses-password), and the keys and tokens the
stand-in cloud generated (pulumi-state.json, as Pulumi state holds them): the DKIM private key,
the deploy key, the certbot Cloudflare token, the IAM user's secret key, any random password.
A secret is looked for by its value, or for a key by the lines of its PEM body that hold private
material. Failures say which secret and where, never its value.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from infra.core.facts import PROJECT_DIR
from infra.lab import deploy, state
from infra.lab.host import guest, ssh_argv
from infra.lab.state import LabInfo
from tests.support.mail import status_mails
from tests.support.wait import wait_for

pytestmark = [pytest.mark.lab, pytest.mark.reliability]

CHANGE = {"messageSizeLimitMb": 31}  # any one-line change: the bundle is sent and applied again
STOP = "/run/mailroom-secrets-test.stop"
MAX_SAMPLES = 50000
# Where files live on the host: the root file system, the tmpfs mounts, the mail volume.
FILE_SYSTEMS = "/ /tmp /run /var/mail/vhosts"


@dataclass(frozen=True)
class Secret:
    name: str  # what it is, for messages: never the value
    markers: tuple[str, ...] = field(repr=False)  # any of these found somewhere is the secret found there


def _private_lines(pem: str) -> list[str]:
    """The full-width body lines of the second half of a PEM: private material only (the first
    lines of an RSA key hold its modulus, which the public key and the DKIM record show too)."""
    body = [line for line in pem.strip().splitlines() if not line.startswith("-----")]
    full = [line for line in body if len(line) == len(body[0])]
    return full[len(full) // 2 :]


def _key_markers(values: dict[str, str]) -> tuple[str, ...]:
    """A private key as the server might hold it: PKCS#8 (as generated), PKCS#1, OpenSSH."""
    key = serialization.load_pem_private_key(values["privateKeyPem"].encode(), password=None)
    forms = [values["privateKeyPem"], values.get("privateKeyOpenssh", "")]
    for fmt in (serialization.PrivateFormat.TraditionalOpenSSL, serialization.PrivateFormat.OpenSSH):
        try:
            forms.append(key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()).decode())
        except ValueError:  # an Ed25519 key has no PKCS#1 form
            continue
    return tuple(sorted({line for form in forms if form for line in _private_lines(form)}))


def lab_secrets(lab: LabInfo) -> list[Secret]:
    found = []
    for address, password in lab.passwords.items():
        found.append(Secret(f"the password of {address}", (password,)))
    for line in lab.overrides.get("passwordHashes", []):
        address, _, scheme_hash = line.partition(" ")
        found.append(Secret(f"the password hash of {address}", (scheme_hash.rpartition("}")[2],)))
    found.append(Secret("the SES SMTP password", ((state.STATE_DIR / "ses-password").read_text().strip(),)))
    for kind, name, values in json.loads((state.STATE_DIR / "pulumi-state.json").read_text()):
        if "privateKeyPem" in values:
            found.append(Secret(f"the private key of {name.split('/')[0]}", _key_markers(values)))
        for key, what in (("value", "token"), ("secret", "secret access key"), ("result", "random password")):
            if key in values:
                found.append(Secret(f"the {what} of {kind.rpartition(':')[2]} {name.split('/')[0]}", (values[key],)))
    assert all(m and len(m) >= 12 for s in found for m in s.markers), "a secret too short to look for"
    return found


def leaks(secrets: list[Secret], text: str | bytes) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [s.name for s in secrets if any(m.encode() in data for m in s.markers)]


def host(lab: LabInfo, command: str, stdin: bytes = b"") -> bytes:
    """A command on the host (bytes out: logs and files are not all UTF-8)."""
    result = subprocess.run(ssh_argv(lab, command), input=stdin, capture_output=True, check=False,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, f"`{command[:80]}` on the lab host: exit {result.returncode}"
    return result.stdout


def grep_host(lab: LabInfo, secrets: list[Secret], files: str) -> dict[str, set[str]]:
    """Which secret is in which of the host's FILES (a find(1) expression), grepped there as root.
    The markers travel on stdin into a root-only temporary file, never on a command line."""
    script = (
        "umask 077; p=$(mktemp); cat > \"$p\"; "
        f"{files} ! -path \"$p\" -print0 | xargs -0 -r grep -aHoF -f \"$p\" -- 2>/dev/null | sort -u | head -n 5000; "
        "rm -f \"$p\""
    )  # fmt: skip
    patterns = "\n".join(m for s in secrets for m in s.markers) + "\n"
    out = host(lab, "sudo sh -c " + shlex.quote(script), patterns.encode())
    where: dict[str, set[str]] = {}
    for line in out.decode(errors="replace").splitlines():
        path, _, match = line.rpartition(":")
        for name in leaks(secrets, match):
            where.setdefault(name, set()).add(path)
    return where


@pytest.fixture(scope="module")
def secrets(lab: LabInfo) -> list[Secret]:
    return lab_secrets(lab)


@dataclass
class Redeploy:
    command_lines: str = field(repr=False)  # every distinct `ps -eww -o args` line seen on the host meanwhile
    samples: int
    results: list[dict[str, Any]] = field(repr=False)  # the remote commands' results, as Pulumi shows them


@pytest.fixture(scope="module")
def redeploy(lab: LabInfo) -> Iterator[Redeploy]:
    """A changed setting deployed and then undone, with `ps` sampled on the host all along."""
    guest(f"sudo rm -f {STOP}", lab)
    sampler = (
        f"n=0; while [ ! -e {STOP} ] && [ $n -lt {MAX_SAMPLES} ]; do n=$((n+1)); ps -eww -o args; done; "
        "echo mailroom-samples=$n"
    )
    process = subprocess.Popen(ssh_argv(lab, f"sudo sh -c {shlex.quote(sampler)} | sort -u"),
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    results: list[dict[str, Any]] = []
    try:
        results += deploy.redeploy(CHANGE)
        results += deploy.redeploy()
    finally:
        guest(f"sudo touch {STOP}", lab)
        out, _ = process.communicate(timeout=120)
        guest(f"sudo rm -f {STOP}", lab)
    samples = int(next(line for line in out.splitlines() if line.startswith("mailroom-samples=")).partition("=")[2])
    yield Redeploy(out, samples, results)


def test_the_secrets_looked_for_are_the_ones_the_host_uses(lab: LabInfo, secrets: list[Secret]) -> None:
    """The markers are real: each secret the server needs is found in its root-only file."""
    where = grep_host(lab, secrets, "find /etc -type f")
    expected = {
        "the SES SMTP password": "/etc/postfix/sasl_passwd",
        "the private key of dkim-key": "/etc/opendkim/keys/mail.private"
        if lab.overrides.get("spamFilter", "spamassassin") == "spamassassin"
        else "/etc/rspamd/dkim/mail.key",
        "the token of ApiToken zone-certbot-token": "/etc/letsencrypt/mailroom-cloudflare.ini",
        **{f"the password hash of {a}": "/etc/dovecot/users" for a in lab.passwords},
        # The backup's repository password and its key (backupTarget s3, the default).
        "the random password of RandomPassword backup-password": "/etc/mailroom/backup.env",
        "the secret access key of AccessKey backup-key": "/etc/mailroom/backup.env",
    }
    for name, path in expected.items():
        assert path in where.get(name, set()), f"{name} is not in {path}: the test would look for the wrong value"
    for name in ("the private key of deploy-key", *(f"the password of {a}" for a in lab.passwords)):
        assert name not in where, f"{name} is on the host, in {sorted(where[name])}"


def test_no_secret_in_the_user_data(secrets: list[Secret]) -> None:
    user_data = (state.STATE_DIR / "user-data").read_text()
    found = leaks(secrets, user_data)
    assert user_data.startswith("#cloud-config"), "the lab's user-data is not the droplet's cloud-config"
    assert not found, f"in the droplet's user-data: {found}"


def test_no_secret_on_a_command_line_during_a_redeploy(redeploy: Redeploy, secrets: list[Secret]) -> None:
    assert redeploy.samples >= 20, f"only {redeploy.samples} samples of ps were taken during the redeploy"
    saw_apply = "/usr/local/lib/mailroom/apply.py" in redeploy.command_lines
    assert saw_apply, "ps never saw the apply script run"
    found = leaks(secrets, redeploy.command_lines)
    assert not found, f"on a command line on the host (ps -eo args): {found}"
    steps = json.loads((state.STATE_DIR / "steps.json").read_text())
    found = leaks(secrets, "\n".join(s["create"] for s in steps))
    assert not found, f"in a remote command's command line (ssh's argument on the deploying machine): {found}"


def test_no_secret_in_the_remote_commands_output(redeploy: Redeploy, lab: LabInfo, secrets: list[Secret]) -> None:
    changed = json.loads(next(r for r in redeploy.results if r["name"] == "server-apply-bundle")["stdout"])["changed"]
    assert "/etc/postfix/main.cf" in changed, f"the change was not deployed: {changed}"
    for results, when in ((lab.steps, "the first deploy"), (redeploy.results, "the redeploys")):
        for r in results:
            for stream in ("stdout", "stderr"):
                found = leaks(secrets, r[stream])
                assert not found, f"in the {stream} of {r['name']} during {when}: {found}"


def test_no_secret_in_the_system_logs(redeploy: Redeploy, lab: LabInfo, secrets: list[Secret]) -> None:
    journal = host(lab, "sudo journalctl --no-pager -o export")  # every field, _CMDLINE included
    entries, found = journal.count(b"\n__CURSOR="), leaks(secrets, journal)
    assert entries > 100, f"the journal has only {entries} entries"
    assert not found, f"in the journal (journalctl -o export): {found}"
    where = grep_host(lab, secrets, "find /var/log -type f")
    assert where == {}, "in /var/log: " + "; ".join(f"{n} in {sorted(p)}" for n, p in where.items())


def test_no_secret_in_a_world_readable_file(redeploy: Redeploy, lab: LabInfo, secrets: list[Secret]) -> None:
    where = grep_host(lab, secrets, f"find {FILE_SYSTEMS} -xdev -type f -perm -o+r")
    assert where == {}, "in world-readable files: " + "; ".join(f"{n} in {sorted(p)}" for n, p in where.items())


def test_no_secret_in_what_the_owners_tools_print(lab: LabInfo, secrets: list[Secret]) -> None:
    """`check` (text and JSON), `backup run` and `backup list` print to the owner's terminal and CI logs."""
    printed = []
    for argv in (("check",), ("check", "--json"), ("backup", "run"), ("backup", "list")):
        done = subprocess.run(
            [sys.executable, "-m", "infra", *argv, "--lab"],
            capture_output=True, text=True, check=False, timeout=600, cwd=PROJECT_DIR,
        )  # fmt: skip
        assert done.stdout.strip(), f"`{' '.join(argv)}` printed nothing: {done.stderr[-300:]}"
        printed.append((argv, done.stdout + done.stderr))
    assert '"results"' in printed[1][1] and "snapshot" in printed[2][1], "the tools did not report what they do"
    for argv, text in printed:
        found = leaks(secrets, text)
        assert not found, f"in what `python -m infra {' '.join(argv)}` printed: {found}"


def test_no_secret_in_the_owners_status_mail(lab: LabInfo, secrets: list[Secret]) -> None:
    """The daily status mail leaves the server for alertEmail through the relay: every one the
    relay took, raw and with each part decoded (quoted-printable could split a value), holds none
    of the secrets, after a run that is sure to mail (its last result forgotten first)."""
    before = len(status_mails(lab))
    host(lab, "sudo rm -f /var/lib/mailroom/status-last.json && sudo systemctl start mailroom-status.service")
    wait_for(lambda: status_mails(lab)[before:], 120, 1, "the status mail")
    mails = status_mails(lab)
    for mail in mails:
        texts = [mail.as_bytes()]
        texts += [p for part in mail.walk() if isinstance(p := part.get_payload(decode=True), bytes)]
        found = sorted({name for text in texts for name in leaks(secrets, text)})
        assert not found, f"in the status mail {mail['Subject']!r}: {found}"
        assert any(b"server" in t for t in texts[1:]), "the mail's body was not read"
