"""The program's remote commands: every one of them ran on the host, in order, and succeeded; the
bundle's apply changed the configuration and reloaded its daemons."""

from __future__ import annotations

import json

from infra.lab import state
from tests.support.lab import LAB_MARKS

pytestmark = LAB_MARKS


def test_every_remote_command_of_the_program_ran(lab: state.LabInfo) -> None:
    assert [s["name"] for s in lab.steps] == [
        "server-wait-for-bootstrap",
        "server-mail-volume",
        "server-install-apply-script",
        "server-apply-bundle",
        "server-issue-certificate",
    ]
    assert all(s["exit"] == 0 for s in lab.steps)
    applied = json.loads(next(s for s in lab.steps if s["name"] == "server-apply-bundle")["stdout"])
    assert "/etc/postfix/main.cf" in applied["changed"] and "postfix" in applied["reloaded"]
