"""The spam filter as the tests meet it: GTUBE, a message spam-like in its form alone, and the
counters of what its Bayes has learned (SpamAssassin's or rspamd's, by the lab's mode)."""

from __future__ import annotations

from infra.lab import host, state
from tests.support.wait import wait_for

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def scored_spam(sender: str, recipient: str, tag: str) -> str:
    """A message spam-like in its form alone (no Message-ID, no Date, all-caps subject, HTML only
    with a link to a bare IP address), for rspamd 3.4 about 7 points from a known server."""
    return (
        f'From: "Account Security" <{sender}>\r\nTo: {recipient}\r\n'
        f"Subject: URGENT!!! YOUR ACCOUNT IS {tag}\r\nMIME-Version: 1.0\r\nContent-Type: text/html\r\n\r\n"
        '<html><body><a href="http://203.0.113.99/login">Verify your account now</a></body></html>\r\n'
    )


def learned(lab: state.LabInfo, kind: str = "spam") -> int:
    """How many messages the filter's Bayes has learned as KIND (spam or ham)."""
    if lab.overrides.get("spamFilter", "spamassassin") == "spamassassin":
        dump = host.guest("sudo sa-learn --dump magic", lab).stdout
        return next((int(line.split()[2]) for line in dump.splitlines() if line.endswith(f"n{kind}")), 0)
    # rspamd's Bayes keeps its counters in Redis (`rspamc stat` refreshes them only periodically).
    count = host.guest(f"redis-cli HGET RS learns_{kind}", lab).stdout.strip()
    return int(count) if count.isdigit() else 0


def wait_for_learning(lab: state.LabInfo, kind: str, before: int) -> int:
    """The KIND count once it has grown past BEFORE (within 30 s)."""
    wait_for(lambda: learned(lab, kind) > before, 30, 1, f"the filter learning a message as {kind}")
    return learned(lab, kind)
