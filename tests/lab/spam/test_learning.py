"""Learning from the user's moves: a message moved into Junk is learned as spam, one moved out of
Junk back to INBOX as ham (IMAPSieve hands it to the filter's Bayes)."""

from __future__ import annotations

import uuid

from infra.lab import network, state
from infra.lab.mail import find, message, send_inbound
from infra.lab.network import REMOTE_DOMAIN
from infra.tools.rehearsal import DROPLET_IPV4
from tests.support.lab import LAB_MARKS, alice
from tests.support.spam import learned, wait_for_learning

pytestmark = LAB_MARKS


def test_moving_mail_into_junk_teaches_the_filter(lab: state.LabInfo) -> None:
    import imaplib

    from infra.lab.mail import unverified

    user, password = alice(lab)
    # A body of its own: rspamd learns a message once, and ignores the same content again.
    body = f"Buy cheap watches now, limited offer {uuid.uuid4().hex}!\n"
    msg = message(f"dana@{REMOTE_DOMAIN}", user, "cheap watches", body=body)
    send_inbound(msg)
    assert find(user, password, msg["Message-ID"]) is not None
    before = learned(lab, "spam")

    def move() -> None:
        with imaplib.IMAP4_SSL(DROPLET_IPV4, 993, ssl_context=unverified(), timeout=60) as imap:
            imap.login(user, password)
            imap.select("INBOX")
            _, found = imap.search(None, "HEADER", "Message-ID", msg["Message-ID"])
            assert imap.copy(found[0].split()[-1], "Junk")[0] == "OK"

    network.in_netns(network.WORLD_NS, move)
    assert wait_for_learning(lab, "spam", before) == before + 1


def test_moving_mail_out_of_junk_teaches_the_filter_it_is_ham(lab: state.LabInfo) -> None:
    """A message the filter wrongly put in Junk (here saved there by the user's client), moved
    back to INBOX: IMAPSieve hands it to the filter as ham."""
    import imaplib
    import time

    from infra.lab.mail import unverified

    user, password = alice(lab)
    body = f"Minutes attached, as agreed (ref. {uuid.uuid4().hex}).\n"  # learned once only: its own
    msg = message(f"dana@{REMOTE_DOMAIN}", user, "the minutes of Tuesday", body=body)
    before = learned(lab, "ham")

    def rescue() -> None:
        with imaplib.IMAP4_SSL(DROPLET_IPV4, 993, ssl_context=unverified(), timeout=60) as imap:
            imap.login(user, password)
            assert imap.append("Junk", "", imaplib.Time2Internaldate(time.time()), msg.as_bytes())[0] == "OK"
            imap.select("Junk")
            _, found = imap.search(None, "HEADER", "Message-ID", msg["Message-ID"])
            assert imap.copy(found[0].split()[-1], "INBOX")[0] == "OK"

    network.in_netns(network.WORLD_NS, rescue)
    assert wait_for_learning(lab, "ham", before) == before + 1
