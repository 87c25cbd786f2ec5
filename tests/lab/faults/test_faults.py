"""Faults: mail is queued, never lost.

Each test makes its fault on the lab host in both spam filter modes, with real mail through the
real daemons, counts messages in and out by Message-ID, and asserts that none is lost or stored
twice. Senders behave as real ones do: a remote MTA offers a temp-failed message again (a 5xx
it would bounce), a mail client reports an error to its user. The faults that take the host down
(reboot, replacement) come last, so that every other test runs on an undisturbed host.

Run one test alone against a running lab: `python -m infra lab up`, then
`MAILROOM_LAB_REUSE=1 .venv/bin/pytest tests/lab/faults/test_faults.py -k relay_is_down`.
"""

from __future__ import annotations

import email
import email.utils
import threading
import time
from collections.abc import Iterator

import pytest

from infra.core.facts import SUBMISSION_PORT
from infra.lab import deploy, host, network
from infra.lab.mail import message
from infra.lab.network import REMOTE_DOMAIN
from infra.lab.state import LabInfo
from tests.lab.faults.faults import (
    Outcome,
    flush_queue,
    inbound,
    mailbox_ids,
    queue,
    relayed_ids,
    relayed_messages,
    relayed_raw,
    retry_until_accepted,
    root,
    send,
    set_relay,
)
from tests.support.lab import alice
from tests.support.wait import wait_for

pytestmark = [pytest.mark.lab, pytest.mark.reliability]
DELIVERY_TIMEOUT = 90
# The signing key the bundle installs, in whichever mode (OpenDKIM's or rspamd's copy).
# The DKIM key files' checksums; sha256sum fails (and so root() does) when there is none.
DKIM_KEYS = "sha256sum $(ls /etc/opendkim/keys/*.private /etc/rspamd/dkim/*.key 2>/dev/null)"


def assert_each_stored_once(lab: LabInfo, outcomes: list[Outcome]) -> None:
    """Every accepted message is in the mailbox exactly once, waiting for delivery to finish.

    A message deferred by the fault waits for the queue manager's next run (minutes, by
    Postfix's defaults); the test asks for that run now, every few seconds, instead of waiting."""
    user, password = alice(lab)
    wanted = {o.message_id for o in outcomes if o.accepted}
    last_flush = 0.0

    def delivered() -> bool:
        nonlocal last_flush
        if time.monotonic() - last_flush > 5:
            flush_queue(lab)
            last_flush = time.monotonic()
        return wanted <= set(mailbox_ids(user, password))

    wait_for(delivered, DELIVERY_TIMEOUT, 0.5, "every accepted message in the mailbox")
    # Counted once nothing for the user is left in the queue: a copy a later queue run would
    # deliver is counted too.
    wait_for(
        lambda: not [m for m in queue(lab) for r in m.get("recipients", []) if r.get("address") == user],
        DELIVERY_TIMEOUT, 1, "no mail for the user left in the queue",
    )  # fmt: skip
    stored = mailbox_ids(user, password)
    assert {m: stored[m] for m in wanted if stored[m] != 1} == {}, "stored more than once"


# --- the relay ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["away", "4xx"])
def test_mail_waits_while_the_relay_is_down_and_leaves_in_full_when_it_returns(lab: LabInfo, fault: str) -> None:
    user, password = alice(lab)
    set_relay(lab, fault)
    try:
        outcomes = []
        for i in range(5):
            msg = message(user, f"dana@{REMOTE_DOMAIN}", f"relay {fault} {i}")
            outcomes.append(send(Outcome(msg["Message-ID"]), msg, port=SUBMISSION_PORT, login=(user, password)))
        # The client was told its mail was accepted, not that it failed.
        assert [o.replies for o in outcomes] == [[250]] * 5
        wanted = {o.message_id for o in outcomes}

        def to_the_relay() -> list[dict[str, object]]:
            return [r for m in queue(lab) for r in m["recipients"] if r["address"] == f"dana@{REMOTE_DOMAIN}"]

        wait_for(lambda: len([r for r in to_the_relay() if r.get("delay_reason")]) >= 5, 60, 0.5, "five deferred")
        reasons = {str(r["delay_reason"]) for r in to_the_relay()}
        expected = "Connection refused" if fault == "away" else "451 4.4.2"
        assert all(expected in reason for reason in reasons), reasons
        assert not wanted & set(relayed_ids(lab))
    finally:
        set_relay(lab, "ok")
    flush_queue(lab)
    wait_for(lambda: wanted <= set(relayed_ids(lab)), DELIVERY_TIMEOUT, 0.5, "the queue delivered to the relay")
    relayed = relayed_ids(lab)
    assert {m: relayed[m] for m in wanted} == dict.fromkeys(wanted, 1)
    wait_for(lambda: not queue(lab), 30, 0.5, "an empty queue")


def test_a_recipient_the_relay_refuses_bounces_to_the_sender_and_the_others_are_delivered(lab: LabInfo) -> None:
    user, password = alice(lab)
    # The SES stand-in answers 554 to any recipient whose address contains "reject".
    msg = message(user, f"dana@{REMOTE_DOMAIN}", "one good, one refused")
    del msg["To"]
    msg["To"] = f"dana@{REMOTE_DOMAIN}, reject@{REMOTE_DOMAIN}"
    outcome = send(Outcome(msg["Message-ID"]), msg, port=SUBMISSION_PORT, login=(user, password))
    assert outcome.replies == [250]
    wait_for(lambda: msg["Message-ID"] in relayed_ids(lab), DELIVERY_TIMEOUT, 0.5, "the good recipient's copy")
    envelopes = [env for env, m in relayed_messages(lab) if m["Message-ID"] == msg["Message-ID"]]
    assert [env["to"] for env in envelopes] == [[f"dana@{REMOTE_DOMAIN}"]]

    def bounce() -> email.message.Message | None:
        for found in fetch_all(user, password):
            if found.get_content_type() == "multipart/report" and msg["Message-ID"] in found.as_string():
                return found
        return None

    wait_for(lambda: bounce() is not None, DELIVERY_TIMEOUT, 0.5, "a bounce in the sender's mailbox")
    dsn = bounce()
    assert dsn is not None
    assert dsn.get_param("report-type") == "delivery-status"
    assert "<MAILER-DAEMON@mail.example.net>" in str(dsn["From"])
    status = next(p for p in dsn.walk() if p.get_content_type() == "message/delivery-status")
    report = status.as_string()
    assert f"Final-Recipient: rfc822; reject@{REMOTE_DOMAIN}" in report
    assert "Action: failed" in report and "Status: 5.7.1" in report
    assert f"dana@{REMOTE_DOMAIN}" not in report  # only the refused recipient is reported


def fetch_all(user: str, password: str) -> list[email.message.Message]:
    import imaplib

    from infra.core.facts import IMAPS_PORT
    from infra.lab.mail import unverified
    from infra.lab.network import WORLD_NS
    from infra.tools.rehearsal import DROPLET_IPV4

    def fetch() -> list[email.message.Message]:
        with imaplib.IMAP4_SSL(DROPLET_IPV4, IMAPS_PORT, ssl_context=unverified(), timeout=30) as imap:
            imap.login(user, password)
            imap.select("INBOX", readonly=True)
            _, data = imap.fetch("1:*", "(BODY.PEEK[])")
            return [email.message_from_bytes(p[1]) for p in data if isinstance(p, tuple)]

    return network.in_netns(WORLD_NS, fetch)


def test_a_message_offered_again_after_its_delivery_is_stored_once(lab: LabInfo) -> None:
    """What a sender does when the reply to its DATA was lost (or Postfix after a restart
    mid-delivery): the same message, same Message-ID, again. SMTP is at-least-once; the mailbox
    keeps one copy."""
    user, _ = alice(lab)
    ((outcome, msg),) = inbound("offered twice", user, 1)
    send(outcome, msg)
    assert outcome.accepted, f"the first offer was not taken: {outcome.replies}"
    assert_each_stored_once(lab, [outcome])
    again = send(Outcome(msg["Message-ID"]), msg)
    assert again.replies == [250]
    other = inbound("after the repeat", user, 1)
    for o, m in other:
        send(o, m)
    assert_each_stored_once(lab, [outcome, *(o for o, _ in other)])


def test_a_decoy_with_a_real_messages_message_id_does_not_suppress_the_real_one(lab: LabInfo) -> None:
    """Message-IDs are no secret (every reply quotes them in References): a message sent first
    with a real message's Message-ID, but its own Date, Subject and body, is not taken for a
    repeat of it, so the real one still arrives; a true repeat of either is still stored once."""
    user, password = alice(lab)
    real = message(f"dana@{REMOTE_DOMAIN}", user, "the real one", "The real message.\n")
    decoy = message(f"dana@{REMOTE_DOMAIN}", user, "a decoy", "Not the real message.\n")
    decoy.replace_header("Date", email.utils.formatdate(time.time() - 3600))
    decoy.replace_header("Message-ID", real["Message-ID"])
    for msg in (decoy, real, real):
        sent = send(Outcome(msg["Message-ID"]), msg)
        assert sent.replies == [250], sent.replies
    wait_for(lambda: mailbox_ids(user, password)[real["Message-ID"]] >= 2, 60, 1, "the decoy and the real one")
    other = inbound("after the decoy", user, 1)  # delivered after the repeat: its copy had its chance
    for o, m in other:
        send(o, m)
    assert_each_stored_once(lab, [o for o, _ in other])
    subjects = sorted(str(m["Subject"]) for m in fetch_all(user, password) if m["Message-ID"] == real["Message-ID"])
    assert subjects == ["a decoy", "the real one"]
    assert mailbox_ids(user, password)[real["Message-ID"]] == 2


# --- daemons stopped and restarted under load ---------------------------------------------------


def filter_unit(lab: LabInfo) -> str:
    return "rspamd" if lab.overrides.get("spamFilter") == "rspamd" else "spamd"


def test_mail_arriving_while_the_spam_filter_is_stopped_is_deferred_never_refused_or_lost(lab: LabInfo) -> None:
    user, _ = alice(lab)
    unit = filter_unit(lab)
    batch = inbound(f"{unit} stopped", user, 9)
    for outcome, msg in batch[:3]:
        send(outcome, msg)
    root(lab, f"systemctl stop {unit}")
    try:
        stopped = host.guest(f"systemctl is-active {unit}", lab).stdout.strip()
        assert stopped in ("inactive", "failed"), f"{unit} is {stopped} after the stop"
        for outcome, msg in batch[3:6]:
            send(outcome, msg)
    finally:
        root(lab, f"systemctl start {unit}")
    # rspamd takes several seconds to open its milter port again; the sender keeps trying.
    for outcome, msg in batch[6:]:
        send(outcome, msg, attempts=30)
    during = [o.replies[0] for o, _ in batch[3:6]]
    assert all(code == 250 or 400 <= code < 500 for code in during), during
    retry_until_accepted(batch, attempts=30)
    outcomes = [o for o, _ in batch]
    assert [o for o in outcomes if o.refused_for_good] == []
    assert all(o.accepted for o in outcomes)
    assert_each_stored_once(lab, outcomes)


@pytest.mark.parametrize(
    "disruption",
    ["systemctl restart dovecot", "postfix reload", "systemctl restart postfix"],
)
def test_restarting_a_daemon_under_inbound_load_loses_nothing(lab: LabInfo, disruption: str) -> None:
    user, _ = alice(lab)
    batch = inbound(disruption, user, 24)
    sent = threading.Event()
    spans: list[tuple[float, float]] = []  # each send's start and end
    errors: list[BaseException] = []

    def load() -> None:
        try:
            for i, (outcome, msg) in enumerate(batch):
                began = time.monotonic()
                send(outcome, msg, attempts=3)
                spans.append((began, time.monotonic()))
                if i == 5:
                    sent.set()
        except BaseException as exc:  # re-raised below: a thread's exception is otherwise lost
            errors.append(exc)
            sent.set()

    sender = threading.Thread(target=load)
    sender.start()
    assert sent.wait(120), "the load did not start"
    disrupted = (time.monotonic(), 0.0)
    root(lab, disruption)
    disrupted = (disrupted[0], time.monotonic())
    sender.join(300)
    assert not sender.is_alive()
    if errors:
        raise errors[0]
    # The load went on through the disruption: some send was under way while it ran (with
    # rspamd the whole batch can be through before a Dovecot restart has ended).
    assert any(s < disrupted[1] and e > disrupted[0] for s, e in spans), (disrupted, spans)
    retry_until_accepted(batch)
    outcomes = [o for o, _ in batch]
    assert [o.replies for o in outcomes if o.refused_for_good] == []
    assert all(o.accepted for o in outcomes)
    assert_each_stored_once(lab, outcomes)


# --- the mail volume fills up ---------------------------------------------------------------------


def test_a_full_mail_volume_defers_mail_and_resumes_when_space_is_freed(lab: LabInfo) -> None:
    """Mail already accepted waits in Postfix's queue (on the droplet's own disk) while Dovecot
    answers 4xx; new mail is answered 452 at RCPT, so its senders keep it; none bounces, and all
    of it is stored once when there is room again."""
    user, _ = alice(lab)
    mail_dir = "/var/mail/vhosts"
    # Accepted before the volume filled and not yet delivered (Dovecot is stopped meanwhile).
    root(lab, "systemctl stop dovecot")
    waiting = inbound("accepted before the volume filled", user, 3)
    for outcome, msg in waiting:
        send(outcome, msg)
    assert all(o.accepted for o, _ in waiting)
    # Take every block an unprivileged writer may use (ext4 keeps 5% for root; Dovecot writes as vmail).
    free = int(root(lab, f"df --output=avail -B1 {mail_dir} | tail -1").strip())
    root(lab, f"fallocate -l {free} {mail_dir}/.filler && chown vmail: {mail_dir}/.filler")
    root(lab, "systemctl start dovecot")
    try:
        probe = host.guest(f"sudo -u vmail dd if=/dev/zero of={mail_dir}/.probe bs=4k count=4", lab)
        assert probe.returncode != 0 and "No space left" in probe.stderr, "the volume is not full"
        batch = inbound("volume full", user, 5)
        for outcome, msg in batch:
            send(outcome, msg)
        # mailroom-storage-policy: 452 at RCPT, never a 5xx, never a 250 for mail with no room.
        assert [o.replies for o, _ in batch] == [[452]] * len(batch)

        def deferred_for_space() -> list[str]:
            return [str(r.get("delay_reason", "")) for m in queue(lab) for r in m["recipients"] if r["address"] == user]

        # Dovecot answers the queued mail's LMTP deliveries with a 4xx (ENOSPC is temporary).
        flush_queue(lab)
        wait_for(lambda: len([r for r in deferred_for_space() if "said: 4" in r]) >= len(waiting), 60, 0.5,
                 "the queued messages deferred with Dovecot's temporary error")  # fmt: skip
        assert [r for r in deferred_for_space() if " 5." in r] == []
        # Nothing was bounced: no delivery report went back out through the relay.
        ids = {o.message_id for o, _ in waiting + batch}
        bounces = [m for _, m in relayed_messages(lab) if m.get_content_type() == "multipart/report"]
        assert not [b for b in bounces if any(mid in b.as_string() for mid in ids)]
    finally:
        root(lab, f"rm -f {mail_dir}/.filler {mail_dir}/.probe")
        root(lab, "systemctl start dovecot")
    flush_queue(lab)
    retry_until_accepted(batch)
    assert all(o.accepted for o, _ in batch)
    assert_each_stored_once(lab, [o for o, _ in waiting + batch])


# --- the host goes down ---------------------------------------------------------------------------


def in_delivery(lab: LabInfo, tag: str, count: int) -> list[Outcome]:
    """COUNT accepted messages in the middle of their delivery: Dovecot is frozen (SIGSTOP), so
    Postfix's LMTP clients have connected to its socket and wait for the greeting, the messages in
    Postfix's active queue. What the host then suffers happens to deliveries under way."""
    user, _ = alice(lab)
    root(lab, "systemctl kill --signal=SIGSTOP dovecot.service")
    batch = inbound(tag, user, count)
    for outcome, msg in batch:
        send(outcome, msg)
    assert all(o.accepted for o, _ in batch)

    def delivering() -> bool:
        active = [m for m in queue(lab) if m["queue_name"] == "active"]
        lmtp = host.guest("pgrep -u postfix -x lmtp", lab).stdout.split()
        return len(active) >= count and bool(lmtp)

    wait_for(delivering, 30, 0.5, f"{count} messages in Postfix's active queue, its LMTP client waiting on Dovecot")
    return [o for o, _ in batch]


@pytest.fixture
def thawed(lab: LabInfo) -> Iterator[None]:
    """Whatever a test leaves behind, Dovecot and Postfix run again afterwards."""
    yield
    host.guest("sudo systemctl kill --signal=SIGCONT dovecot.service", lab)
    host.guest("sudo systemctl start dovecot.service postfix@-.service", lab)


def test_mail_accepted_before_the_daemons_are_killed_is_delivered_exactly_once(lab: LabInfo, thawed: None) -> None:
    queued = in_delivery(lab, "killed", 6)
    units = ("postfix@-.service", "dovecot.service")
    # Postfix's master (its unit is forking, with no MainPID) and Dovecot's.
    pids = {
        "postfix": root(lab, "cat /var/spool/postfix/pid/master.pid").strip(),
        "dovecot": root(lab, "systemctl show -p MainPID --value dovecot.service").strip(),
    }
    assert all(p.isdigit() and p != "0" for p in pids.values()), pids
    root(lab, f"systemctl kill --signal=SIGKILL {' '.join(units)}")

    def dead() -> bool:  # the kill happened: both main processes are gone
        return all(host.guest(f"sudo kill -0 {pid}", lab).returncode != 0 for pid in pids.values())

    wait_for(dead, 30, 0.2, "Postfix's and Dovecot's main processes killed")
    root(lab, f"systemctl restart {' '.join(units)}")
    flush_queue(lab)
    assert_each_stored_once(lab, queued)


def test_mail_accepted_before_a_reboot_is_delivered_exactly_once_after_it(lab: LabInfo, thawed: None) -> None:
    user, _ = alice(lab)
    queued = in_delivery(lab, "before reboot", 4)
    host.reboot_host(lab)
    assert host.guest("findmnt -n -o FSTYPE /var/mail/vhosts", lab).stdout.strip() == "ext4"
    assert host.guest("systemctl is-active postfix dovecot", lab).stdout.split() == ["active", "active"]
    flush_queue(lab)
    after = inbound("after reboot", user, 2)
    for outcome, msg in after:
        send(outcome, msg, attempts=20)
    assert_each_stored_once(lab, queued + [o for o, _ in after])


def test_a_replaced_host_on_the_same_volume_keeps_every_mailbox_message_and_the_dkim_key(lab: LabInfo) -> None:
    import imaplib

    from infra.core.facts import IMAPS_PORT
    from infra.lab.mail import unverified
    from infra.lab.network import WORLD_NS
    from infra.tools.rehearsal import DROPLET_IPV4

    user, password = alice(lab)
    bob = ("bob@example.net", lab.passwords["bob@example.net"])
    for who in (user, bob[0]):
        batch = inbound("before replacement", who, 2)
        for outcome, msg in batch:
            send(outcome, msg, attempts=10)

    def mailbox_state(login: tuple[str, str]) -> dict[str, tuple[str, list[tuple[str, str]]]]:
        """Every folder of the mailbox: its UIDVALIDITY and its messages' (UID, Message-ID)."""

        def look() -> dict[str, tuple[str, list[tuple[str, str]]]]:
            state = {}
            with imaplib.IMAP4_SSL(DROPLET_IPV4, IMAPS_PORT, ssl_context=unverified(), timeout=30) as imap:
                imap.login(*login)
                _, listed = imap.list()
                # Each line: (FLAGS) "SEPARATOR" NAME, the name quoted when it holds a space.
                # A parent made only to hold another (Projects of Projects/2026) is \Noselect: no messages.
                folders = [
                    ln.decode().split(") ", 1)[1].split(" ", 1)[1].strip('"')
                    for ln in listed
                    if isinstance(ln, bytes) and b"\\Noselect" not in ln and b"\\NonExistent" not in ln
                ]
                for folder in folders:
                    _, status = imap.status(f'"{folder}"', "(UIDVALIDITY)")
                    typ, why = imap.select(f'"{folder}"', readonly=True)
                    assert typ == "OK", f"{folder}: {why}"
                    _, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
                    uids = []
                    for part in data:
                        if isinstance(part, tuple):
                            uid = part[0].split(b"UID ")[1].split()[0].decode()
                            uids.append((uid, str(email.message_from_bytes(part[1])["Message-ID"]).strip()))
                    state[folder] = (status[0].decode().split("UIDVALIDITY")[-1], sorted(uids))
            return state

        return network.in_netns(WORLD_NS, look)

    time.sleep(2)  # the last LMTP deliveries
    before = {who[0]: mailbox_state(who) for who in ((user, password), bob)}
    assert all(state["INBOX"][1] for state in before.values())
    assert all({"INBOX", "Junk", "Sent", "Drafts", "Trash", "Archive"} <= set(state) for state in before.values())
    key_before = root(lab, DKIM_KEYS)
    old_boot = host.guest("cat /proc/sys/kernel/random/boot_id; cat /etc/machine-id", lab).stdout

    steps = deploy.replace_host()

    assert host.guest("cat /proc/sys/kernel/random/boot_id; cat /etc/machine-id", lab).stdout != old_boot
    assert [s["exit"] for s in steps] == [0] * len(steps)
    after = {who[0]: mailbox_state(who) for who in ((user, password), bob)}
    assert after == before, "mailboxes, UIDs or UIDVALIDITY changed with the host"
    assert root(lab, DKIM_KEYS) == key_before
    # And the new host signs with that key: a submitted message verifies against the served one.
    import dkim

    from tests.support.mail import dkim_dns

    msg = message(user, f"dana@{REMOTE_DOMAIN}", "after replacement")
    assert send(Outcome(msg["Message-ID"]), msg, port=SUBMISSION_PORT, login=(user, password)).accepted
    wait_for(lambda: msg["Message-ID"] in relayed_ids(lab), DELIVERY_TIMEOUT, 0.5, "the relay receiving it")
    raw = next(r for r in relayed_raw(lab) if msg["Message-ID"].encode() in r)
    txt = dkim_dns(lab)
    assert dkim.verify(raw, dnsfunc=lambda name, timeout=5: txt.get(name, b""))
