"""A one-line change: deploying one changed setting rewrites only the file it is in and reloads
only the daemon that reads it.

It leaves the changed setting deployed, so it runs after test_idempotence.py (pytest takes a
folder's files in name order)."""

from __future__ import annotations

import json

from infra.lab import deploy, host, state
from tests.support.lab import LAB_MARKS

pytestmark = LAB_MARKS


def test_changing_one_setting_reloads_only_its_daemon(lab: state.LabInfo) -> None:
    steps = deploy.redeploy({"messageSizeLimitMb": 30})
    applied = json.loads(next(s for s in steps if s["name"] == "server-apply-bundle")["stdout"])
    assert applied["changed"] == ["/etc/postfix/main.cf"] and applied["reloaded"] == ["postfix"]
    size = host.guest("/usr/sbin/postconf -h message_size_limit", lab).stdout.strip()
    assert size == str(30 * 1024 * 1024)
