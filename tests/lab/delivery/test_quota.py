"""A mailbox over its quota is refused at RCPT on port 25 (552 5.2.2, from Dovecot's quota-status):
the sending server keeps the message and tells its own sender, so this host never bounces mail to
a sender address that may be forged. With room again, the same mail is taken and delivered."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from infra.lab import state
from infra.lab.mail import find, message, send_inbound
from infra.lab.network import REMOTE_DOMAIN
from tests.lab.faults.faults import queue, root
from tests.support.lab import LAB_MARKS
from tests.support.mail import smtp_reply

pytestmark = LAB_MARKS

USER = "bob@example.net"
MAILDIRSIZE = "/var/mail/vhosts/example.net/bob/Maildir/maildirsize"


def quota_storage(lab: state.LabInfo, user: str) -> tuple[int, int]:
    """(used, limit) of the user's storage quota in KiB, as `doveadm quota get` reports it."""
    for line in root(lab, f"doveadm quota get -u {user}").splitlines():
        words = line.split()
        if len(words) >= 5 and words[-4] == "STORAGE":
            return int(words[-3]), int(words[-2])
    raise AssertionError(f"no STORAGE line for {user}")


@pytest.fixture
def full_mailbox(lab: state.LabInfo) -> Iterator[None]:
    """bob's mailbox counted over its limit: Dovecot's Maildir++ quota file rewritten to its limits
    line and one usage line of twice the limit (what Dovecot trusts without counting again, while
    the file is fresh); `doveadm quota recalc` counts the real usage again after."""
    root(lab, f"doveadm quota recalc -u {USER}")  # the file exists, with the limits Dovecot uses
    _, limit = quota_storage(lab, USER)
    root(lab, f'limits=$(head -n 1 {MAILDIRSIZE}) && printf "%s\\n{2 * limit * 1024} 1\\n" "$limits" > {MAILDIRSIZE}')
    try:
        used, limit = quota_storage(lab, USER)
        assert used > limit, (used, limit)
        yield
    finally:
        root(lab, f"doveadm quota recalc -u {USER}")


def test_a_full_mailbox_is_refused_at_rcpt_and_nothing_is_queued_or_bounced(
    lab: state.LabInfo, full_mailbox: None
) -> None:
    code, text = smtp_reply(lab, f"dana@{REMOTE_DOMAIN}", USER)
    assert (code, text) == (552, b"5.2.2 <bob@example.net>: Recipient address rejected: Mailbox is full")
    # Another mailbox, with room, still takes its mail in the same state.
    code, _ = smtp_reply(lab, f"dana@{REMOTE_DOMAIN}", "alice@example.net")
    assert code == 250
    assert not [m for m in queue(lab) if any(r["address"] == USER for r in m["recipients"])]


def test_with_room_again_the_mailbox_takes_mail(lab: state.LabInfo) -> None:
    used, limit = quota_storage(lab, USER)
    assert used < limit
    msg = message(f"dana@{REMOTE_DOMAIN}", USER, "after the quota was freed")
    send_inbound(msg)
    assert find(USER, lab.passwords[USER], msg["Message-ID"]) is not None
