"""The off-site backup, end to end on the lab host: `python -m infra backup run --lab` stores an
encrypted snapshot in the S3 stand-in (moto, over HTTPS as the bucket's real endpoint name); the
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

import pytest

from infra.core import backup
from infra.core.facts import IMAPS_PORT, MAIL_DIR
from infra.lab import host
from infra.lab.mail import message, send_inbound, unverified
from infra.lab.network import WORLD_NS, in_netns
from infra.lab.state import LabInfo
from infra.tools.rehearsal import DROPLET_IPV4
from tests.support.lab import LAB_MARKS

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


def test_a_lost_mailbox_comes_back_whole_while_new_mail_keeps_arriving(lab: LabInfo, mailbox: Mailbox) -> None:
    # The volume's mail is gone (and the staging copy with it).
    root(f"systemctl stop dovecot && rm -rf {HOME} {backup.BACKUP_STAGING} && systemctl start dovecot", lab)
    gone = root(f"doveadm mailbox list -u {USER}", lab).split()
    assert "Projects/2026" not in gone and not root(f"doveadm search -u {USER} all", lab).strip(), gone
    # Mail arrives before the restore: it is kept.
    arrived = message("carol@example.com", USER, "arrived while the mail was gone")
    send_inbound(arrived)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not root(f"doveadm search -u {USER} mailbox INBOX all", lab).strip():
        time.sleep(0.5)

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

        # A run that cannot reach the repository (a wrong password) fails, and says so.
        root(f"cp {backup.BACKUP_ENV} /root/backup.env.saved", lab)
        root(f"sed -i 's/^RESTIC_PASSWORD=.*/RESTIC_PASSWORD=not-the-password/' {backup.BACKUP_ENV}", lab)
        done = cli(lab, "run")
        assert done.returncode != 0
        status = json.loads(root("python3 /usr/local/lib/mailroom/status.py server", lab))
        line = next(r for r in status["results"] if r["name"] == "backup")
        assert line["status"] == "failure" and "the last backup failed" in line["detail"], line
        assert "not-the-password" not in line["detail"] + done.stderr
    finally:
        root(f"test ! -f /root/backup.env.saved || mv /root/backup.env.saved {backup.BACKUP_ENV}", lab)
        write(result, saved, lab)
