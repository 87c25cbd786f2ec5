"""The off-site backup, end to end on the lab host: `python -m infra backup run --lab` stores an
encrypted snapshot in the S3 stand-in (moto, over HTTPS as the bucket's real endpoint name, holding
the server's key to the policy the program declares, which the key cannot get round); the
mailbox is lost (its home deleted, as with a new empty volume) while mail keeps arriving; `backup
restore` brings back every folder, message, flag and keyword, with the folders' UIDVALIDITY and
the messages' UIDs, and the Sieve script; the mail that arrived meanwhile stays, nothing doubles.
The status check reports the backup, and fails when it is too old or its last run failed.
"""

from __future__ import annotations

import base64
import imaplib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from infra.core import backup
from infra.core.facts import IMAPS_PORT, MAIL_DIR
from infra.lab import deploy, host
from infra.lab.mail import message, send_inbound, unverified
from infra.lab.network import WORLD_NS, in_netns
from infra.lab.state import LabInfo
from infra.tools.rehearsal import DROPLET_IPV4
from tests.support.lab import LAB_MARKS
from tests.support.mail import status_mails
from tests.support.wait import wait_for

pytestmark = LAB_MARKS

USER = "bob@example.net"
HOME = f"{MAIL_DIR}/example.net/bob"
FOLDERS = ("INBOX", "Archive", "Projects/2026")
SIEVE = 'require "fileinto";\nif header :contains "subject" "[list]" { fileinto "Archive"; }\n'
# What a mailbox looks like to an IMAP client: per folder, its UIDVALIDITY and each message's
# UID, Message-ID and flags (keywords among them).
Mailbox = dict[str, tuple[int, list[tuple[int, str, str]]]]


def root(command: str, lab: LabInfo) -> str:
    result = host.guest(f"sudo sh -c {json.dumps(command)}", lab)
    assert result.returncode == 0, f"`{command}` on the lab host: exit {result.returncode}: {result.stderr.strip()}"
    return result.stdout


def inbox_count(lab: LabInfo) -> int:
    """How many messages the user's INBOX holds."""
    return int(root(f"doveadm mailbox status -u {USER} messages INBOX", lab).split("=")[1])


def write(path: str, text: str, lab: LabInfo) -> None:
    """TEXT into PATH on the lab host, as root (base64 on the way: no quoting to get wrong)."""
    root(f"echo {base64.b64encode(text.encode()).decode()} | base64 -d > {path}", lab)


def cli(lab: LabInfo, *argv: str) -> subprocess.CompletedProcess[str]:
    """`python -m infra backup ... --lab`, as the owner runs it."""
    return subprocess.run(
        [sys.executable, "-m", "infra", "backup", *argv, "--lab"], capture_output=True, text=True, timeout=900
    )


def imap(lab: LabInfo, work: object) -> object:
    def session() -> object:
        with imaplib.IMAP4_SSL(DROPLET_IPV4, IMAPS_PORT, ssl_context=unverified(), timeout=60) as client:
            client.login(USER, lab.passwords[USER])
            return work(client)  # type: ignore[operator]

    return in_netns(WORLD_NS, session)


def seen(lab: LabInfo) -> Mailbox:
    def look(client: imaplib.IMAP4_SSL) -> Mailbox:
        found: Mailbox = {}
        for folder in FOLDERS:
            typ, data = client.select(f'"{folder}"', readonly=True)
            assert typ == "OK", f"{folder}: {data}"
            _, validity = client.response("UIDVALIDITY")
            items = []
            _, fetched = client.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
            for part in fetched:
                if isinstance(part, tuple):
                    head = part[0].decode()
                    uid = int(re.search(r"UID (\d+)", head).group(1))  # type: ignore[union-attr]
                    flags = " ".join(sorted(re.search(r"FLAGS \(([^)]*)\)", head).group(1).split()))  # type: ignore[union-attr]
                    items.append(
                        (uid, part[1].decode().split(":", 1)[1].strip(), flags.replace("\\Recent", "").strip())
                    )
            found[folder] = (int(validity[0]), sorted(items))
        return found

    return imap(lab, look)  # type: ignore[return-value]


def fill(lab: LabInfo) -> None:
    """Mail in three folders, some read, flagged or with a keyword, as a client leaves them."""

    def work(client: imaplib.IMAP4_SSL) -> None:
        for folder in FOLDERS[1:]:
            client.create(f'"{folder}"')
        for i, folder in enumerate(FOLDERS * 3):
            msg = message("carol@example.com", USER, f"backup {i} in {folder}")
            flags = ["", r"(\Seen)", r"(\Seen \Flagged $Important)"][i % 3]
            typ, data = client.append(f'"{folder}"', flags or None, None, msg.as_bytes())
            assert typ == "OK", data
        client.select("INBOX")
        client.uid("STORE", "1", "+FLAGS", r"(\Deleted)")
        client.expunge()  # a gap in the UIDs: restored UIDs are the old ones, not renumbered

    imap(lab, work)


@pytest.fixture(scope="module")
def mailbox(lab: LabInfo) -> Iterator[Mailbox]:
    fill(lab)
    script = base64.b64encode(SIEVE.encode()).decode()
    root(f"echo {script} | base64 -d | doveadm sieve put -u {USER} -a lists", lab)
    yield seen(lab)


def test_a_backup_is_stored_encrypted_off_site_and_the_status_check_reports_it(lab: LabInfo, mailbox: Mailbox) -> None:
    done = cli(lab, "run")
    assert done.returncode == 0, done.stderr
    made = re.match(r"snapshot ([0-9a-f]{8}): \d+ files", done.stdout)
    assert made, done.stdout
    listed = cli(lab, "list")
    assert listed.returncode == 0 and re.search(r"\d+ snapshot\(s\) in s3:https://", listed.stdout), listed.stdout
    # Newest last: the one just made. (The nightly forget keeps one a day: reruns leave one.)
    assert listed.stdout.strip().splitlines()[-1].split()[0] == made.group(1), listed.stdout
    status = json.loads(root("python3 /usr/local/lib/mailroom/status.py server", lab))
    line = next(r for r in status["results"] if r["name"] == "backup")
    assert line["status"] == "ok" and "verified" in line["detail"], line


def test_the_servers_key_cannot_destroy_the_history_in_the_bucket(lab: LabInfo, mailbox: Mailbox) -> None:
    """With the server's own key (as a thief who took the server has it), against the S3 stand-in
    enforcing the policy the program declares: deleting a snapshot only hides it (a delete
    marker), deleting its version or suspending versioning is refused; the owner's key still
    reads the old version and undoes the delete."""
    import socket
    from unittest import mock

    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    from infra.core.settings import parse_settings
    from infra.core.stack import stack_config
    from infra.lab.network import S3_IP
    from infra.lab.state import STATE_DIR

    settings = parse_settings(stack_config(lab.stack, lab.overrides))
    bucket, region = settings.backup_bucket, settings.backup_region
    server_key = json.loads((STATE_DIR / "s3-server-key.json").read_text())
    owner_key = json.loads((STATE_DIR / "s3-owner.json").read_text())
    real_getaddrinfo = socket.getaddrinfo

    def lab_dns(host: str, *args: Any, **kwargs: Any) -> Any:  # the endpoint's name, as the lab DNS answers it
        return real_getaddrinfo(S3_IP if host.endswith("amazonaws.com") else host, *args, **kwargs)

    def client(key: dict[str, str]) -> Any:
        return boto3.client(
            "s3", endpoint_url=f"https://{backup.endpoint(settings)}", region_name=region,
            aws_access_key_id=key["id"], aws_secret_access_key=key["secret"],
            verify=str(STATE_DIR / "pki/lab-ca.crt"), config=Config(s3={"addressing_style": "path"}),
        )  # fmt: skip

    def attack() -> None:
        server, owner = client(server_key), client(owner_key)
        versions = owner.list_object_versions(Bucket=bucket, Prefix="snapshots/")["Versions"]
        victim = versions[0]
        with pytest.raises(ClientError) as refused:
            server.delete_object(Bucket=bucket, Key=victim["Key"], VersionId=victim["VersionId"])
        assert refused.value.response["Error"]["Code"] == "AccessDenied", refused.value.response
        with pytest.raises(ClientError) as refused:
            server.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Suspended"})
        assert refused.value.response["Error"]["Code"] == "AccessDenied", refused.value.response
        with pytest.raises(ClientError) as refused:  # and the key reaches no other bucket
            server.list_objects_v2(Bucket="another-bucket")
        assert refused.value.response["Error"]["Code"] == "AccessDenied", refused.value.response
        server.delete_object(Bucket=bucket, Key=victim["Key"])  # allowed: only a delete marker
        kept = owner.get_object(Bucket=bucket, Key=victim["Key"], VersionId=victim["VersionId"])["Body"].read()
        assert kept, "the old version is gone"
        markers = owner.list_object_versions(Bucket=bucket, Prefix=victim["Key"])["DeleteMarkers"]
        for marker in markers:  # the owner's undo, as the README shows it
            owner.delete_object(Bucket=bucket, Key=marker["Key"], VersionId=marker["VersionId"])

    with mock.patch("socket.getaddrinfo", lab_dns):
        in_netns(WORLD_NS, attack)
    listed = cli(lab, "list")
    assert listed.returncode == 0 and re.search(r"\d+ snapshot\(s\)", listed.stdout), listed.stdout + listed.stderr


def test_a_lost_mailbox_comes_back_whole_while_new_mail_keeps_arriving(lab: LabInfo, mailbox: Mailbox) -> None:
    # The volume's mail is gone (and the staging copy with it).
    root(f"systemctl stop dovecot && rm -rf {HOME} {backup.BACKUP_STAGING} && systemctl start dovecot", lab)
    gone = root(f"doveadm mailbox list -u {USER}", lab).split()
    assert "Projects/2026" not in gone and not root(f"doveadm search -u {USER} all", lab).strip(), gone
    # Mail arrives before the restore: it is kept.
    arrived = message("carol@example.com", USER, "arrived while the mail was gone")
    send_inbound(arrived)
    wait_for(lambda: inbox_count(lab) > 0, 60, 0.5, "the new mail in the emptied INBOX")

    done = cli(lab, "restore", "--mailbox", USER)
    assert done.returncode == 0 and f"{USER}: restored" in done.stdout, done.stderr + done.stdout

    after = seen(lab)
    for folder, (validity, items) in mailbox.items():
        got_validity, got = after[folder]
        assert got_validity == validity, f"{folder}: UIDVALIDITY {got_validity}, was {validity}"
        restored = [i for i in got if i[1] != arrived["Message-ID"]]
        if folder == "INBOX":
            # The new message took the next UID of the new INBOX; the restored ones keep theirs
            # unless the new one holds it (dsync renumbers that one message, never drops it).
            assert sorted((m, f) for _, m, f in restored) == sorted((m, f) for _, m, f in items), folder
        else:
            assert restored == items, f"{folder}: {restored} != {items}"
    inbox = [m for _, m, _ in after["INBOX"][1]]
    assert inbox.count(arrived["Message-ID"]) == 1, "the mail that arrived before the restore is lost or doubled"
    assert len(inbox) == len(set(inbox)), "a restored message is there twice"
    active = root(f"doveadm sieve list -u {USER}", lab)
    assert re.search(r"^lists\s+ACTIVE", active, re.M), f"the Sieve script is not back and active: {active}"

    # A second restore of the same snapshot changes nothing: no message twice.
    again = cli(lab, "restore", "--mailbox", USER)
    assert again.returncode == 0, again.stderr
    assert seen(lab) == after


def test_a_stale_or_failed_backup_fails_the_status_check(lab: LabInfo, mailbox: Mailbox) -> None:
    result = backup.BACKUP_RESULT
    saved = root(f"cat {result}", lab)
    try:
        old = json.loads(saved)
        old["last_success"] = old["started"] = time.time() - 27 * 3600
        write(result, json.dumps(old), lab)
        status = json.loads(root("python3 /usr/local/lib/mailroom/status.py server", lab))
        line = next(r for r in status["results"] if r["name"] == "backup")
        assert line["status"] == "failure" and "27 h old" in line["detail"], line

        # A run that cannot reach the repository (a wrong password) fails, says so, and the owner
        # is mailed (the run starts the daily check, which mails alertEmail on a change).
        mailed = len(status_mails(lab))
        root(f"cp {backup.BACKUP_ENV} /root/backup.env.saved", lab)
        root(f"sed -i 's/^RESTIC_PASSWORD=.*/RESTIC_PASSWORD=not-the-password/' {backup.BACKUP_ENV}", lab)
        done = cli(lab, "run")
        assert done.returncode != 0
        status = json.loads(root("python3 /usr/local/lib/mailroom/status.py server", lab))
        line = next(r for r in status["results"] if r["name"] == "backup")
        assert line["status"] == "failure" and "the last backup failed" in line["detail"], line
        assert "not-the-password" not in line["detail"] + done.stderr
        news = wait_for(lambda: status_mails(lab)[mailed:], 120, 1, "the status mail of the failed backup")
        raw = news[-1].get_payload(decode=True)
        assert isinstance(raw, bytes) and re.search(r"^FAILURE +server +backup: ", raw.decode(), re.M), raw
    finally:
        root(f"test ! -f /root/backup.env.saved || mv /root/backup.env.saved {backup.BACKUP_ENV}", lab)
        write(result, saved, lab)


def test_a_spam_filter_that_lost_its_learning_gets_it_back(lab: LabInfo, mailbox: Mailbox) -> None:
    from tests.support.spam import learned

    rspamd = lab.overrides.get("spamFilter", "spamassassin") == "rspamd"
    # Something learned for sure: three messages of its own, taught the way each filter is taught.
    for n in range(3):
        words = " ".join(f"offer{i} cheap{i} pills{i} winner{n}" for i in range(30))
        write("/tmp/spam.eml", str(message("carol@example.com", USER, f"cheap pills {n}", body=words + "\n")), lab)
        root("chmod 0644 /tmp/spam.eml", lab)  # read by the filter's own user
        if rspamd:
            root("rspamc learn_spam /tmp/spam.eml", lab)
        else:
            root("runuser -u debian-spamd -- sa-learn --spam /tmp/spam.eml", lab)
    taught = learned(lab, "spam")
    assert taught >= 3
    assert cli(lab, "run").returncode == 0

    # The filter's data is lost: a new server's filter starts empty, then learns from its first
    # mail on its own (autolearn), so it is rarely empty when its owner restores.
    root("redis-cli flushall" if rspamd else "runuser -u debian-spamd -- sa-learn --clear", lab)
    assert learned(lab, "spam") == 0
    write("/tmp/ham.eml", str(message("carol@example.com", USER, "minutes", body="the minutes of today\n")), lab)
    root("chmod 0644 /tmp/ham.eml", lab)
    root("rspamc learn_ham /tmp/ham.eml" if rspamd else "runuser -u debian-spamd -- sa-learn --ham /tmp/ham.eml", lab)
    assert learned(lab, "ham") == 1
    done = cli(lab, "restore")
    assert done.returncode == 0 and "spam filter learning: restored" in done.stdout, done.stderr + done.stdout
    assert learned(lab, "spam") == taught
    # A filter that knows as much as the snapshot keeps what it knows: a second restore leaves it alone.
    again = cli(lab, "restore")
    assert again.returncode == 0 and "kept the live one" in again.stdout, again.stdout


# Run on the lab host against a restored Maildir: every file the uidlist names is there, and every
# message file is whole (its size is the S= its name was given when it was delivered).
CONSISTENT = r"""
import json, os, re, sys
problems, messages = [], 0
for folder, dirs, files in os.walk(sys.argv[1]):
    if "dovecot-uidlist" not in files:
        continue
    with open(os.path.join(folder, "dovecot-uidlist")) as uidlist:
        lines = uidlist.read().splitlines()[1:]
    listed = {line.split(":", 1)[1] for line in lines if ":" in line}
    present = {}
    for sub in ("cur", "new"):
        for name in os.listdir(os.path.join(folder, sub)) if os.path.isdir(os.path.join(folder, sub)) else []:
            present[name.split(":2,")[0]] = os.path.join(folder, sub, name)
    problems += [f"{folder}: the uidlist names {n}, which is not there" for n in sorted(listed - set(present))]
    for base, path in present.items():
        messages += 1
        size = re.search(r",S=(\d+)", base)
        if not size or os.path.getsize(path) != int(size.group(1)):
            problems.append(f"{path}: {os.path.getsize(path)} bytes, named {base}")
print(json.dumps({"problems": problems, "messages": messages}))
"""
DELIVERIES = 200


def test_a_backup_taken_during_delivery_restores_whole_messages_and_a_consistent_uidlist(
    lab: LabInfo, mailbox: Mailbox
) -> None:
    before = inbox_count(lab)
    # 200 messages handed to Postfix on the host, in the background, delivered by LMTP as they come:
    # ten a second at most, so they are still arriving when the run has ended.
    # A transient unit of its own: it outlives the SSH session that starts it (a process left in
    # the background of sudo's session is hung up on when the session ends).
    write(
        "/root/deliver.sh",
        f'for i in $(seq {DELIVERIES}); do printf "Subject: during the backup $i\\n\\nbody $i\\n" '
        f"| /usr/sbin/sendmail {USER}; sleep 0.1; done\n",
        lab,
    )
    root("systemctl reset-failed mailroom-lab-deliveries 2>/dev/null; true", lab)
    root("systemd-run --unit mailroom-lab-deliveries --collect sh /root/deliver.sh", lab)
    # The count once ten are in (wait_for gives back the predicate's true value).
    count = wait_for(lambda: (n := inbox_count(lab)) >= before + 10 and n, 60, 0.2, "the deliveries under way")
    done = cli(lab, "run")
    assert done.returncode == 0, done.stderr
    during = inbox_count(lab)
    assert during < before + DELIVERIES, (
        "every message was in before the backup ended: nothing was taken during delivery"
    )

    staging = f"{backup.BACKUP_STAGING}/{USER}"
    root("rm -rf /root/restored", lab)
    root(
        f"set -a; . {backup.BACKUP_ENV}; restic --quiet --cache-dir /var/cache/mailroom/restic restore latest "
        f"--target /root/restored --include {staging}",
        lab,
    )
    write("/root/consistent.py", CONSISTENT, lab)
    found = json.loads(root(f"python3 /root/consistent.py /root/restored{staging}", lab))
    assert found["problems"] == [], found["problems"]
    assert found["messages"] >= count - 1, found  # at least what was in when the run began (bar the expunged)
    # And every delivery ends in the live mailbox: none lost to the backup.
    wait_for(lambda: inbox_count(lab) >= before + DELIVERIES, 300, 1, "every delivery in the mailbox")
    assert inbox_count(lab) == before + DELIVERIES
    root("rm -rf /root/restored", lab)


def test_a_new_empty_volume_under_the_same_droplet_is_mounted_by_the_next_apply_and_restored(
    lab: LabInfo, mailbox: Mailbox
) -> None:
    """The volume alone is lost (deleted, or its filesystem beyond repair): `pulumi up` attaches a
    new, empty one to the running droplet. The volume step formats and mounts it (cloud-init,
    which did that at the first boot, does not run again) and Dovecot starts on it; `backup
    restore` brings the mail back."""
    from infra.core.user_data import mount_unit
    from infra.lab.state import STATE_DIR, sh

    assert cli(lab, "run").returncode == 0
    before = seen(lab)
    # Dovecot stops with the mount it requires; Postfix keeps taking mail into its queue.
    root(f"systemctl stop dovecot {mount_unit()}", lab)
    device = (STATE_DIR / "volume.loop").read_text().strip()
    sh("wipefs", "--all", "--quiet", device)
    sh("dd", "if=/dev/zero", f"of={device}", "bs=1M", "count=8", "status=none")

    steps = deploy.redeploy()  # the new attachment's id re-runs the volume step, and the rest
    volume = next(s for s in steps if s["name"] == "server-mail-volume")
    assert "a new mail volume was mounted" in volume["stdout"], volume
    assert root(f"findmnt -n -o FSTYPE {MAIL_DIR}", lab).strip() == "ext4"
    assert not root(f"doveadm search -u {USER} all", lab).strip(), "the new volume is not empty"

    done = cli(lab, "restore")
    assert done.returncode == 0 and f"{USER}: restored" in done.stdout, done.stderr + done.stdout
    assert seen(lab) == before


def test_a_lost_volume_comes_back_whole_on_a_new_host(lab: LabInfo, mailbox: Mailbox) -> None:
    """The disaster: the droplet and its volume are gone. `pulumi up` makes a new host with a new,
    empty volume; `backup restore` brings back every folder, message, flag, UID and UIDVALIDITY,
    the Sieve script and the spam filter's learning. (Last in this module: the host is a new one.)"""
    from tests.support.spam import learned

    assert cli(lab, "run").returncode == 0
    before, taught = seen(lab), learned(lab, "spam")
    alice = "alice@example.net"
    alice_had = root(f"doveadm -f flow fetch -u {alice} guid mailbox INBOX all", lab).split()
    assert taught > 0 and alice_had

    deploy.replace_host(new_volume=True)
    assert not root(f"doveadm search -u {USER} all", lab).strip(), "the new volume is not empty"

    done = cli(lab, "restore")
    assert done.returncode == 0, done.stderr + done.stdout
    assert f"{USER}: restored" in done.stdout and f"{alice}: restored" in done.stdout, done.stdout
    assert seen(lab) == before  # same UIDVALIDITY and UIDs: a client's cache stays valid, no resync
    assert sorted(root(f"doveadm -f flow fetch -u {alice} guid mailbox INBOX all", lab).split()) == sorted(alice_had)
    active = root(f"doveadm sieve list -u {USER}", lab)
    assert re.search(r"^lists\s+ACTIVE", active, re.M), f"the Sieve script is not back and active: {active}"
    assert "spam filter learning: restored" in done.stdout and learned(lab, "spam") == taught, done.stdout
