"""The status check against the running lab: all ok on a healthy lab, and each check fails for
the right reason, with its fix, on a fault planted in the lab (and put back after), in both spam
filter modes. Then the daily timer: one mail on the first run and on a change, none when nothing changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dns.reversename
import pytest

from infra.core.facts import MAIL_DIR, PROJECT_DIR, SUBMISSION_PORT
from infra.core.settings import parse_settings
from infra.core.stack import stack_config
from infra.lab import state
from infra.lab.host import guest
from infra.lab.mail import message
from infra.lab.network import REMOTE_DOMAIN
from infra.lab.state import STATE_DIR
from infra.lab.world.pki import LabCA
from infra.tools.rehearsal import DROPLET_IPV4, DROPLET_IPV6
from tests.lab.faults.faults import Outcome, flush_queue, queue, relayed_ids, send, set_relay
from tests.support.lab import LAB_MARKS, alice, zone_changed
from tests.support.mail import status_mails
from tests.support.wait import wait_for

pytestmark = LAB_MARKS


def run_check(*args: str) -> tuple[int, str]:
    """`python -m infra check --lab ARGS` as the owner runs it: its exit status and what it printed."""
    done = subprocess.run(
        [sys.executable, "-m", "infra", "check", "--lab", *args],
        capture_output=True, text=True, check=False, timeout=300, cwd=PROJECT_DIR,
    )  # fmt: skip
    assert not done.stderr.strip(), done.stderr
    return done.returncode, done.stdout


def entry(output: str, group: str, name: str) -> str:
    """The line (and its fix line) of check NAME in GROUP."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        words = line.split(None, 2)
        if len(words) == 3 and words[1] == group and words[2].startswith(f"{name}:"):
            fix = lines[i + 1].strip() if i + 1 < len(lines) and lines[i + 1].startswith(" ") else ""
            return f"{line}\n{fix}".strip()
    raise AssertionError(f"no line for {group} {name} in:\n{output}")


def on_host(command: str) -> str:
    done = guest(command)
    assert done.returncode == 0, done.stderr
    return done.stdout


def checked_while(plant: str, undo: str, *groups: str) -> tuple[int, str]:
    """The check of GROUPS while the fault PLANT (a command on the host) holds; UNDO runs after,
    whatever happened."""
    try:
        on_host(plant)
        return run_check(*(arg for group in groups for arg in ("--only", group)))
    finally:
        on_host(undo)


@contextmanager
def host_file_saved(*paths: str) -> Iterator[None]:
    """Files on the host restored exactly (content, mode, owner) after the test changed them."""
    for p in paths:
        on_host(f"sudo cp -p {p} {p}.check-saved")
    try:
        yield
    finally:
        for p in paths:
            on_host(f"sudo mv {p}.check-saved {p}")


def test_a_healthy_lab_checks_ok_and_prints_no_secret(lab: state.LabInfo) -> None:
    code, output = run_check()
    assert code == 0, output
    assert output.rstrip().splitlines()[-1].startswith("0 failure(s), 0 warning(s),")
    for group in ("dns", "addresses", "tls", "blocklists", "relay", "server"):
        assert f" {group} " in output
    code, as_json = run_check("--json")
    document = json.loads(as_json)
    assert code == 0 and document["status"] == "ok"
    # The lab stands in for SES's SMTP endpoint, not its API: that one line says it was skipped.
    assert {(r["name"], r["status"]) for r in document["results"] if r["status"] != "ok"} <= {
        ("SES account", "skipped")
    }
    names = {r["name"] for r in document["results"]}
    assert {"DKIM signature", "DMARC", "SPF", "MTA-STS policy", "queue", "login"} <= names
    secrets = [p.read_text().strip() for p in (STATE_DIR / "ses-password", STATE_DIR / "cloudflare-token")]
    secrets += list(lab.passwords.values())
    assert all(s and s not in output and s not in as_json for s in secrets)


def test_a_removed_record_fails_with_the_record_to_set(lab: state.LabInfo) -> None:
    with zone_changed(lab, remove="IN MX 10 mail.example.net."):
        code, output = run_check("--only", "dns")
    assert code == 2
    line = entry(output, "dns", "MX example.net")
    assert line.startswith("FAILURE  dns        MX example.net: 10 mail.example.net. expected (absent)")
    assert "fix: set the record `example.net MX 10 mail.example.net.` at Cloudflare" in line


def test_a_caa_record_naming_another_ca_fails(lab: state.LabInfo) -> None:
    """Someone allowed another CA (and not the configured one): Let's Encrypt would refuse to renew."""
    with zone_changed(lab, add='example.net. 3600 IN CAA 0 issue "sectigo.com"', remove='CAA 0 issue "example.com"'):
        code, output = run_check("--only", "dns")
    assert code == 2
    line = entry(output, "dns", "CAA example.net")
    assert line.startswith(
        'FAILURE  dns        CAA example.net: 0 issue "example.com" expected (it has 0 issue "sectigo.com")'
    ), line
    assert 'fix: set the record `example.net CAA 0 issue "example.com"` at Cloudflare' in line


def test_a_changed_dkim_record_fails_showing_what_it_has(lab: state.LabInfo) -> None:
    old = 'mail._domainkey.example.net. 300 IN TXT "v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAold"'
    with zone_changed(lab, add=old, remove="mail._domainkey.example.net."):
        code, output = run_check("--only", "dns")
    assert code == 2
    line = entry(output, "dns", "TXT mail._domainkey.example.net")
    assert (
        line.startswith("FAILURE")
        and '(it has "v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAold")' in line
    )
    # What a receiver sees: the server's fresh signature does not verify with the key in DNS.
    line = entry(output, "dns", "DKIM signature")
    assert line.startswith("FAILURE  dns        DKIM signature: a message signed by the server's key does not verify")
    assert "fix: receivers treat the mail as unsigned" in line


def test_a_second_spf_record_fails_as_permerror(lab: state.LabInfo) -> None:
    with zone_changed(lab, add='example.net. 300 IN TXT "v=spf1 a -all"'):
        code, output = run_check("--only", "dns")
    assert code == 2
    line = entry(output, "dns", "TXT example.net")
    assert "a second SPF record makes SPF fail for every message (permerror)" in line
    assert 'fix: delete `example.net TXT "v=spf1 a -all"` at Cloudflare' in line


def test_a_missing_ipv6_ptr_fails(lab: state.LabInfo) -> None:
    with zone_changed(lab, remove=str(dns.reversename.from_address(DROPLET_IPV6))):
        code, output = run_check("--only", "addresses")
    assert code == 2
    line = entry(output, "addresses", "IPv6 PTR")
    assert line.startswith(f"FAILURE  addresses  IPv6 PTR: {DROPLET_IPV6} points back to none, not mail.example.net")
    assert "the droplet must be named mail.example.net" in line
    assert entry(output, "addresses", "IPv4 PTR").startswith("OK")


def test_a_listed_address_fails_and_the_public_resolver_answer_is_not_a_listing(lab: state.LabInfo) -> None:
    reversed_v4 = ".".join(reversed(DROPLET_IPV4.split(".")))
    with zone_changed(lab, add=f"{reversed_v4}.zen.spamhaus.org. 300 IN A 127.0.0.4"):
        code, output = run_check("--only", "blocklists")
    assert code == 2
    line = entry(output, "blocklists", f"IPv4 {DROPLET_IPV4} on Spamhaus ZEN")
    assert line.startswith("FAILURE") and "listed (127.0.0.4)" in line and "https://check.spamhaus.org/" in line
    with zone_changed(lab, add=f"{reversed_v4}.zen.spamhaus.org. 300 IN A 127.255.255.254"):
        code, output = run_check("--only", "blocklists")
    assert code == 1
    line = entry(output, "blocklists", f"IPv4 {DROPLET_IPV4} on Spamhaus ZEN")
    assert line.startswith("WARNING") and "public resolver" in line and "listed (" not in line


def test_a_changed_mta_sts_policy_fails(lab: state.LabInfo) -> None:
    policy = "/var/www/mailroom/mta-sts/.well-known/mta-sts.txt"
    with host_file_saved(policy):
        on_host(f"sudo sed -i 's/^mode: .*/mode: none/' {policy}")
        code, output = run_check("--only", "dns")
    assert code == 2
    line = entry(output, "dns", "MTA-STS policy")
    assert line.startswith("FAILURE") and "mode none" in line and "is not the program's" in line


@contextmanager
def certificate_served(lab: state.LabInfo, label: str, names: list[str], days: int) -> Iterator[None]:
    """A lab CA certificate for NAMES, DAYS from expiry, installed and taken up by every daemon
    but Dovecot (which reads it only at a restart); the program's one back afterwards."""
    issued = LabCA(STATE_DIR / "pki").issue(label, names, days=days)
    tls = "/etc/mailroom/tls"
    try:
        with host_file_saved(f"{tls}/fullchain.pem", f"{tls}/privkey.pem"):
            for local, remote in ((issued.certificate, "fullchain.pem"), (issued.key, "privkey.pem")):
                done = subprocess.run(
                    [*state_ssh(lab), f"sudo tee {tls}/{remote} >/dev/null"], input=local.read_text(),
                    capture_output=True, text=True, check=False, timeout=60,
                )  # fmt: skip
                assert done.returncode == 0, done.stderr
            on_host("sudo postfix reload && sudo systemctl reload nginx")
            yield
    finally:  # the saved files are back: every daemon serves them again
        on_host("sudo postfix reload && sudo systemctl reload nginx")


def test_an_expiring_certificate_and_a_different_one_on_993_fail(lab: state.LabInfo) -> None:
    """A valid certificate 5 days from expiry installed and taken up by every daemon but Dovecot."""
    with certificate_served(lab, "expiring", ["mail.example.net"], days=5):
        code, output = run_check("--only", "tls", "--only", "server")
    assert code == 2
    assert entry(output, "tls", "port 25 STARTTLS").startswith("FAILURE  tls        port 25 STARTTLS: valid for")
    assert "4 days left" in entry(output, "tls", "port 465") or "5 days left" in entry(output, "tls", "port 465")
    assert entry(output, "tls", "port 993").startswith("OK")
    line = entry(output, "tls", "one certificate")
    assert "port(s) 993 serve a different certificate from port(s) 25, 465, 587, 443" in line
    assert entry(output, "server", "certificate").startswith("FAILURE  server     certificate: expires in")
    code, output = run_check("--only", "tls")
    assert code == 0, output


def state_ssh(lab: state.LabInfo) -> list[str]:
    from infra.lab.host import ssh_argv

    return ssh_argv(lab, "")[:-1]


def test_the_relay_refusing_the_password_fails(lab: state.LabInfo) -> None:
    mode = Path(lab.ses_spool) / "mode"
    mode.write_text("refuse-login")
    try:
        code, output = run_check("--only", "relay")
    finally:
        mode.unlink()
    assert code == 2
    line = entry(output, "relay", "login")
    assert "email-smtp.us-east-1.amazonaws.com refused the server's login (535)" in line
    assert "fix: run `pulumi up` to send the current credentials" in line


def test_mail_deferred_for_over_a_day_fails_with_the_reason_and_is_not_lost(lab: state.LabInfo) -> None:
    """The relay answers 451: a real message waits in the deferred queue. Its arrival time is
    Postfix's own; the check's clock is moved a day on (and two hours) to see it graded."""
    user, password = alice(lab)
    msg = message(user, f"dana@{REMOTE_DOMAIN}", "deferred, for the status check")
    set_relay(lab, "4xx")
    try:
        sent = send(Outcome(msg["Message-ID"]), msg, port=SUBMISSION_PORT, login=(user, password))
        assert sent.replies == [250]
        wait_for(lambda: any(r.get("delay_reason") for m in queue(lab) for r in m["recipients"]), 60, 0.5, "deferred")

        def queue_line(hours: int) -> str:
            later = f"import status, time; print(status.check_queue(time.time() + {hours} * 3600)[0].line())"
            return on_host(f'cd /usr/local/lib/mailroom && sudo python3 -c "{later}"')

        a_day, two_hours = queue_line(25), queue_line(2)
    finally:
        set_relay(lab, "ok")
    assert a_day.startswith("FAILURE  server     queue: 1 message(s) deferred, the oldest for 25.")
    assert "most often: " in a_day and "451 4.4.2" in a_day
    assert "fix: read the reason above" in a_day and "`sudo postqueue -f` retries now" in a_day
    assert two_hours.startswith("WARNING  server     queue: 1 message(s) deferred, the oldest for 2.")
    flush_queue(lab)
    wait_for(lambda: msg["Message-ID"] in relayed_ids(lab), 90, 0.5, "the deferred message at the relay")
    code, output = run_check("--only", "server")
    assert code == 0 and entry(output, "server", "queue").startswith("OK"), output


def test_a_nearly_full_volume_fails(lab: state.LabInfo) -> None:
    fill = f"{MAIL_DIR}/.check-fill"
    # Leave 8 % of the volume free (the failure limit is 10 %).
    grow = (
        f"import os; s = os.statvfs('{MAIL_DIR}'); print(s.f_bavail * s.f_frsize - int(0.08 * s.f_blocks * s.f_frsize))"
    )
    try:
        size = int(on_host(f'sudo python3 -c "{grow}"').strip())
        on_host(f"sudo fallocate -l {size} {fill}")
        code, output = run_check("--only", "server")
    finally:
        on_host(f"sudo rm -f {fill}")
    assert code == 2
    line = entry(output, "server", "mail volume")
    assert line.startswith("FAILURE  server     mail volume: 8 % free of") or " 7 % free" in line
    assert "raise volumeSizeGb" in line


def test_a_stopped_spam_filter_fails_naming_it(lab: state.LabInfo) -> None:
    unit = "rspamd" if lab.overrides.get("spamFilter") == "rspamd" else "spamd"
    code, output = checked_while(f"sudo systemctl stop {unit}", f"sudo systemctl start {unit}", "server")
    assert code == 2
    line = entry(output, "server", "daemons")
    assert line.startswith(f"FAILURE  server     daemons: not running: {unit}")
    assert f"fix: sudo systemctl restart {unit}" in line
    wait_for(lambda: guest(f"systemctl is-active --quiet {unit}").returncode == 0, 60, 1, f"{unit} back")


def test_the_daily_check_mails_the_owner_once_per_change(lab: state.LabInfo) -> None:
    assert on_host("systemctl is-enabled mailroom-status.timer").strip() == "enabled"
    on_host("sudo rm -f /var/lib/mailroom/status-last.json")
    before = len(status_mails(lab))

    def daily() -> None:
        on_host("sudo systemctl start mailroom-status.service")

    daily()  # the first run: every line is new
    first = wait_for(lambda: status_mails(lab)[before:], 60, 1, "the first status mail")
    assert len(first) == 1 and first[0]["To"] == parse_settings(stack_config(lab.stack, lab.overrides)).alert_email
    daily()  # nothing changed
    time.sleep(5)
    assert len(status_mails(lab)) == before + 1
    unit = "rspamd" if lab.overrides.get("spamFilter") == "rspamd" else "spamd"
    on_host(f"sudo systemctl stop {unit}")
    try:
        daily()
    finally:
        on_host(f"sudo systemctl start {unit}")
    # Under rspamd the milter signs local mail too: sendmail's message waits in the maildrop until
    # rspamd is back, and pickup takes it up within a minute.
    changed = wait_for(lambda: status_mails(lab)[before + 1 :], 180, 1, "the mail of the change")
    raw = changed[0].get_payload(decode=True)  # quoted-printable: the fix lines are long
    assert isinstance(raw, bytes)
    body = raw.decode()
    assert changed[0]["Subject"].endswith("1 failure(s), 0 warning(s)")
    assert body.splitlines()[2].startswith(f"FAILURE  server     daemons: not running: {unit}")
    secrets = [p.read_text().strip() for p in (STATE_DIR / "ses-password", STATE_DIR / "cloudflare-token")]
    assert not any(s in body for s in secrets)
    wait_for(lambda: guest(f"systemctl is-active --quiet {unit}").returncode == 0, 60, 1, f"{unit} back")


@pytest.fixture(autouse=True)
def _healthy_after(lab: state.LabInfo) -> Iterator[None]:
    """Each test leaves the lab as it found it: nothing planted survives into the next."""
    yield
    mode = Path(lab.ses_spool) / "mode"
    assert not mode.exists() or mode.read_text().strip() == "ok"


def test_a_certificate_for_another_name_fails(lab: state.LabInfo) -> None:
    with certificate_served(lab, "other-name", ["other.example.net"], days=60):
        code, output = run_check("--only", "tls")
    assert code == 2
    line = entry(output, "tls", "port 25 STARTTLS")
    assert line.startswith("FAILURE  tls        port 25 STARTTLS: the certificate does not verify: Hostname mismatch")
    assert "fix: sudo /usr/local/sbin/mailroom-certificate on the server installs the current one" in line
    assert entry(output, "tls", "port 993").startswith("OK")  # Dovecot still has the program's


def test_a_host_name_resolving_elsewhere_fails_the_ptr_forward_confirmation(lab: state.LabInfo) -> None:
    with zone_changed(
        lab, add="mail.example.net. 300 IN A 203.0.113.99", remove=f"mail.example.net. 300 IN A {DROPLET_IPV4}"
    ):
        code, output = run_check("--only", "addresses")
    assert code == 2
    line = entry(output, "addresses", "IPv4 PTR")
    assert line.startswith(f"FAILURE  addresses  IPv4 PTR: mail.example.net does not resolve back to {DROPLET_IPV4}")
    assert f"fix: set `mail.example.net A {DROPLET_IPV4}` (run `pulumi up`)" in line
    assert entry(output, "addresses", "IPv6 PTR").startswith("OK")


def test_a_listed_ipv6_address_and_a_listed_domain_fail(lab: state.LabInfo) -> None:
    nibbles = str(dns.reversename.from_address(DROPLET_IPV6)).removesuffix(".ip6.arpa.")
    listed = f"{nibbles}.zen.spamhaus.org. 300 IN A 127.0.0.3\nexample.net.dbl.spamhaus.org. 300 IN A 127.0.1.2"
    with zone_changed(lab, add=listed):
        code, output = run_check("--only", "blocklists")
    assert code == 2
    line = entry(output, "blocklists", f"IPv6 {DROPLET_IPV6} on Spamhaus ZEN")
    assert line.startswith("FAILURE") and "listed (127.0.0.3)" in line and "https://check.spamhaus.org/" in line
    line = entry(output, "blocklists", "example.net on the Spamhaus DBL")
    assert line.startswith("FAILURE") and "listed (127.0.1.2)" in line
    assert entry(output, "blocklists", f"IPv4 {DROPLET_IPV4} on Spamhaus ZEN").startswith("OK")


def test_records_edited_by_hand_fail_as_drift(lab: state.LabInfo) -> None:
    """A stray MX, a second DMARC record, SPF that leaves the relay out and an old DKIM key left at
    another selector, all at once, as a hand edit at Cloudflare leaves them."""
    with zone_changed(
        lab,
        add="\n".join(
            (
                "example.net. 300 IN MX 20 old-mail.example.org.",
                '_dmarc.example.net. 300 IN TXT "v=DMARC1; p=none"',
                'default._domainkey.example.net. 300 IN TXT "v=DKIM1; k=rsa; p=MIIBIjANBgkq"',
            )
        ),
    ):
        code, output = run_check("--only", "dns")
    assert code == 2
    line = entry(output, "dns", "MX example.net")
    assert "an extra record 20 old-mail.example.org.: the program does not declare it" in line
    assert "fix: delete `example.net MX 20 old-mail.example.org.` at Cloudflare" in line
    assert entry(output, "dns", "DMARC").startswith(
        "FAILURE  dns        DMARC: 2 DMARC records (receivers then ignore all)"
    )
    line = entry(output, "dns", "TXT default._domainkey.example.net")
    assert line.startswith("WARNING") and "delete `default._domainkey.example.net TXT` at Cloudflare" in line
    # SES sends with MAIL FROM bounce.example.net: that name's SPF is the one receivers evaluate.
    spf = next(ln for ln in Path(lab.zone).read_text().splitlines() if "v=spf1" in ln and ln.startswith("bounce."))
    with zone_changed(lab, add='bounce.example.net. 300 IN TXT "v=spf1 -all"', remove=" ".join(spf.split())):
        code, output = run_check("--only", "dns")
    assert code == 2
    line = entry(output, "dns", "SPF")
    assert line.startswith("FAILURE") and "gets SPF fail" in line


def test_a_disabled_renewal_timer_fails(lab: state.LabInfo) -> None:
    code, output = checked_while(
        "sudo systemctl disable certbot.timer", "sudo systemctl enable certbot.timer", "server"
    )
    assert code == 2
    line = entry(output, "server", "renewal")
    assert line.startswith("FAILURE  server     renewal: certbot.timer is not enabled: the certificate will expire")
    assert "fix: sudo systemctl enable --now certbot.timer" in line


def test_a_stopped_jail_and_a_stopped_fail2ban_fail(lab: state.LabInfo) -> None:
    try:
        on_host("sudo fail2ban-client stop dovecot")
        code, output = run_check("--only", "server")
        assert code == 2
        line = entry(output, "server", "fail2ban")
        assert line.startswith("FAILURE  server     fail2ban: jails not running: dovecot")
        assert "fix: sudo fail2ban-client reload" in line
        on_host("sudo systemctl stop fail2ban")
        code, output = run_check("--only", "server")
        assert code == 2
        line = entry(output, "server", "fail2ban")
        assert line.startswith(
            "FAILURE  server     fail2ban: fail2ban is not answering: password guessing goes unbanned"
        )
        assert "fix: sudo systemctl restart fail2ban" in line
    finally:
        on_host("sudo systemctl restart fail2ban")
    wait_for(lambda: "dovecot" in guest("sudo fail2ban-client status").stdout, 60, 1, "fail2ban back with its jails")


def test_a_pending_reboot_warns(lab: state.LabInfo) -> None:
    code, output = checked_while("sudo touch /run/reboot-required", "sudo rm -f /run/reboot-required", "server")
    assert code == 1
    line = entry(output, "server", "reboot")
    assert line.startswith("WARNING  server     reboot: a reboot is pending")
    assert "fix: sudo reboot at a quiet hour" in line


def test_an_unmounted_mail_volume_fails(lab: state.LabInfo) -> None:
    from infra.core.user_data import mount_unit

    unit = mount_unit()
    on_host("sudo systemctl stop postfix dovecot")
    try:
        on_host(f"sudo systemctl stop {unit}")
        assert guest(f"mountpoint -q {MAIL_DIR}").returncode != 0
        code, output = run_check("--only", "server")
    finally:
        on_host(f"sudo systemctl start {unit} && sudo systemctl start dovecot postfix")
    assert code == 2
    line = entry(output, "server", "mail volume")
    assert line.startswith(
        f"FAILURE  server     mail volume: {MAIL_DIR} is not mounted: mail would go to the droplet's disk"
    )
    assert "fix: sudo /usr/local/sbin/mailroom-mount-volume" in line
    code, output = run_check("--only", "server")
    assert code == 0, output


def test_a_relay_that_does_not_answer_fails(lab: state.LabInfo) -> None:
    mode = Path(lab.ses_spool) / "mode"
    mode.write_text("away")
    try:
        time.sleep(1)  # the stand-in stops listening within 0.2 s
        code, output = run_check("--only", "relay")
    finally:
        mode.unlink()
    assert code == 2
    line = entry(output, "relay", "login")
    assert line.startswith("FAILURE  relay      login: email-smtp.us-east-1.amazonaws.com:587 did not answer")
    assert "fix: outbound mail waits in the queue" in line
    wait_for(lambda: run_check("--only", "relay")[0] == 0, 30, 1, "the relay stand-in answering again")


# A package installed at version 1, and a local repository that offers version 2 as a security
# update (its Release says Debian-Security, as the real one does): what apt sees when one is pending.
SECURITY_UPDATE = """set -eu
repo=/srv/mailroom-check-repo; mkdir -p $repo
for v in 1 2; do
  d=$(mktemp -d); mkdir $d/DEBIAN
  printf 'Package: mailroom-probe\\nVersion: %s\\nArchitecture: all\\nMaintainer: lab <lab@example.net>\\nDescription: probe\\n' $v > $d/DEBIAN/control
  dpkg-deb --build $d $repo/mailroom-probe_$v.deb >/dev/null; rm -rf $d
done
dpkg -i $repo/mailroom-probe_1.deb >/dev/null
size=$(stat -c %s $repo/mailroom-probe_2.deb)
printf 'Package: mailroom-probe\\nVersion: 2\\nArchitecture: all\\nFilename: ./mailroom-probe_2.deb\\nSize: %s\\nDescription: probe\\n\\n' $size > $repo/Packages
printf 'Origin: Debian\\nLabel: Debian-Security\\nSuite: stable-security\\nCodename: bookworm-security\\n' > $repo/Release
echo "deb [trusted=yes] file:$repo ./" > /etc/apt/sources.list.d/mailroom-check.list
apt-get update -qq -o Dir::Etc::sourcelist=/etc/apt/sources.list.d/mailroom-check.list \\
  -o Dir::Etc::sourceparts=- -o APT::Get::List-Cleanup=0
"""
SECURITY_UPDATE_GONE = (
    "dpkg -r mailroom-probe >/dev/null 2>&1; rm -rf /srv/mailroom-check-repo "
    "/etc/apt/sources.list.d/mailroom-check.list /var/lib/apt/lists/*mailroom-check-repo*; true"
)


def test_a_pending_security_update_warns(lab: state.LabInfo) -> None:
    import base64

    script = base64.b64encode(SECURITY_UPDATE.encode()).decode()
    try:
        on_host(f"echo {script} | base64 -d | sudo sh")
        code, output = run_check("--only", "server")
    finally:
        on_host(f"sudo sh -c '{SECURITY_UPDATE_GONE}'")
    assert code == 1, output
    line = entry(output, "server", "updates")
    assert line.startswith("WARNING  server     updates: 1 security update(s) pending: mailroom-probe")
    assert "fix: sudo apt-get upgrade" in line
    code, output = run_check("--only", "server")
    assert code == 0 and entry(output, "server", "updates").startswith("OK"), output


def test_a_relay_certificate_that_does_not_verify_fails_and_the_mail_waits(lab: state.LabInfo) -> None:
    """The SES stand-in answers STARTTLS with a self-signed certificate for its own name, as
    something intercepting the path would: the check fails, and Postfix (which verifies the
    relay) keeps the message in its queue instead of sending it, until the real one is back."""
    user, password = alice(lab)
    msg = message(user, f"dana@{REMOTE_DOMAIN}", "held while the relay's certificate does not verify")
    set_relay(lab, "untrusted-certificate")
    try:
        code, output = run_check("--only", "relay")
        sent = send(Outcome(msg["Message-ID"]), msg, port=SUBMISSION_PORT, login=(user, password))
        assert sent.replies == [250]
        reasons = wait_for(
            lambda: [r["delay_reason"] for m in queue(lab) for r in m["recipients"] if r.get("delay_reason")],
            90, 0.5, "the message deferred",
        )  # fmt: skip
        assert msg["Message-ID"] not in relayed_ids(lab)
    finally:
        set_relay(lab, "ok")
    assert code == 2, output
    line = entry(output, "relay", "login")
    assert line.startswith(
        "FAILURE  relay      login: email-smtp.us-east-1.amazonaws.com's certificate did not verify "
        "(self-signed certificate): outbound mail is deferred, not sent in clear"
    ), line
    assert "fix: update ca-certificates" in line
    assert any("certificate" in r.lower() for r in reasons), reasons
    flush_queue(lab)
    wait_for(lambda: msg["Message-ID"] in relayed_ids(lab), 90, 0.5, "the held message at the relay")
    code, output = run_check("--only", "relay")
    assert code == 0, output


# /proc/meminfo as a 1 GiB droplet's kernel writes it when memory has run short: 40 MiB available
# and 90 % of its 1 GiB swap file in use. The lab host shares this machine's kernel and memory, so
# a real shortage cannot be made inside it; the check reads what it is given, over SSH, as on a droplet.
STARVED_MEMINFO = """MemTotal:        1004584 kB
MemFree:           21344 kB
MemAvailable:      40960 kB
Buffers:            1024 kB
Cached:            30720 kB
SwapTotal:       1048572 kB
SwapFree:         104856 kB
"""


def test_a_droplet_short_of_memory_fails_on_memory_and_swap(lab: state.LabInfo) -> None:
    import base64

    planted = base64.b64encode(STARVED_MEMINFO.encode()).decode()
    code, output = checked_while(
        f"echo {planted} | base64 -d | sudo tee /run/mailroom-meminfo >/dev/null && "
        "sudo mount --bind /run/mailroom-meminfo /proc/meminfo && grep -q '^MemAvailable: *40960 kB' /proc/meminfo",
        "sudo umount /proc/meminfo; sudo rm -f /run/mailroom-meminfo",
        "server",
    )
    assert code == 2, output
    line = entry(output, "server", "memory")
    assert line.startswith("FAILURE  server     memory: 4 % available of 981 MiB"), line
    assert "fix: see what grew with `ps aux --sort=-rss | head`" in line and "dropletSize" in line
    line = entry(output, "server", "swap")
    assert line.startswith("FAILURE  server     swap: 90 % of swap in use"), line
    assert "fix: the droplet is short of memory" in line
    code, output = run_check("--only", "server")
    assert code == 0 and entry(output, "server", "memory").startswith("OK"), output


def test_with_a_dqs_key_the_dqs_zone_is_asked_and_the_key_is_never_shown(lab: state.LabInfo) -> None:
    """With spamhausDqsKey set, the check asks Spamhaus's DQS zones (KEY.zen.dq.spamhaus.net),
    which answer from any resolver: a listing there fails; the public zone is not asked."""
    key = "labdqskey" + os.urandom(8).hex()  # made up here; a real key comes from the stack's secrets
    reversed_v4 = ".".join(reversed(DROPLET_IPV4.split(".")))
    listed = f"{reversed_v4}.{key}.zen.dq.spamhaus.net. 300 IN A 127.0.0.2"
    public = f"{reversed_v4}.zen.spamhaus.org. 300 IN A 127.0.0.4"  # must not be what is read
    with zone_changed(lab, add=f"{listed}\n{public}"):
        code, output = run_check("--only", "blocklists", "--set", f"spamhausDqsKey={key}")
    assert code == 2, output
    line = entry(output, "blocklists", f"IPv4 {DROPLET_IPV4} on Spamhaus ZEN (DQS)")
    assert line.startswith("FAILURE") and "listed (127.0.0.2)" in line, line
    domain = parse_settings(stack_config(lab.stack, lab.overrides)).domain
    assert entry(output, "blocklists", f"{domain} on the Spamhaus DBL").startswith("OK"), output
    assert key not in output
