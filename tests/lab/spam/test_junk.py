"""Junk filing: mail the spam filter marks as spam is delivered into the user's Junk folder, not
her INBOX. SpamAssassin's is proven with GTUBE; rspamd's with a message that scores between its
add-header and reject thresholds."""

from __future__ import annotations

import smtplib

import pytest

from infra.lab import network, state
from infra.lab.mail import find, message, send_inbound
from infra.lab.network import REMOTE_DOMAIN
from infra.tools.rehearsal import DROPLET_IPV4
from tests.support.lab import LAB_MARKS, alice
from tests.support.spam import GTUBE, scored_spam
from tests.support.wait import wait_for

pytestmark = LAB_MARKS


def test_spam_goes_to_junk(lab: state.LabInfo) -> None:
    if lab.overrides.get("spamFilter", "spamassassin") == "rspamd":
        pytest.skip(
            "rspamd refuses GTUBE outright (test_reject.py); its add-header range is tested with a scored message"
        )
    user, password = alice(lab)
    msg = message(f"dana@{REMOTE_DOMAIN}", user, "spam test", body=f"{GTUBE}\n")
    send_inbound(msg)
    assert find(user, password, msg["Message-ID"], folder="Junk") is not None
    assert find(user, password, msg["Message-ID"], folder="INBOX", wait=0) is None


def test_rspamd_files_mail_it_scores_as_spam_into_junk(lab: state.LabInfo) -> None:
    """Between rspamd's add-header (6) and reject (15) scores: marked, delivered, filed into
    Junk by the global Sieve rule. rspamd's non-reject GTUBE patterns are off in production
    builds, so the message earns its score as spam does (rspamd 3.4, Debian 12: all-caps
    subject 3, no Message-ID 2.5, no Date 1, a link to a bare IP 1, HTML only 0.2)."""
    if lab.overrides.get("spamFilter", "spamassassin") != "rspamd":
        pytest.skip("SpamAssassin's Junk filing is proven with GTUBE above")
    import imaplib
    import time

    from infra.lab.mail import unverified

    user, password = alice(lab)
    tag = f"SUSPENDED{time.time_ns()}"
    raw = scored_spam(f"dana@{REMOTE_DOMAIN}", user, tag)

    def send() -> None:
        with smtplib.SMTP(DROPLET_IPV4, 25, local_hostname=f"mx.{REMOTE_DOMAIN}",
                          source_address=(network.REMOTE_IP, 0), timeout=60) as smtp:  # fmt: skip
            smtp.starttls(context=unverified())
            smtp.sendmail(f"dana@{REMOTE_DOMAIN}", [user], raw.encode())

    def filed() -> tuple[str, str] | None:
        with imaplib.IMAP4_SSL(DROPLET_IPV4, 993, ssl_context=unverified(), timeout=60) as imap:
            imap.login(user, password)

            def look() -> tuple[str, str] | None:
                for folder in ("Junk", "INBOX"):
                    imap.select(folder, readonly=True)
                    _, found = imap.search(None, "SUBJECT", tag)
                    if found[0]:
                        _, data = imap.fetch(found[0].split()[-1], "(BODY.PEEK[HEADER])")
                        return folder, bytes(data[0][1]).decode()  # type: ignore[index]
                return None

            return wait_for(look, 60, 0.5, "the message delivered, to Junk or INBOX")

    network.in_netns(network.WORLD_NS, send)
    where = network.in_netns(network.WORLD_NS, filed)
    assert where is not None, "the message was not delivered"
    folder, headers = where
    assert "X-Rspamd-Action: add header" in headers and "X-Spam: Yes" in headers, headers
    assert folder == "Junk"
