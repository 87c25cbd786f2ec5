"""Idempotence: deploying the same settings again changes no file, reloads no daemon, installs
and removes no package."""

from __future__ import annotations

import json

from infra.lab import deploy, state
from tests.support.lab import LAB_MARKS

pytestmark = LAB_MARKS


def test_reapplying_the_same_settings_changes_and_restarts_nothing(lab: state.LabInfo) -> None:
    steps = deploy.redeploy()
    applied = json.loads(next(s for s in steps if s["name"] == "server-apply-bundle")["stdout"])
    assert applied == {"changed": [], "reloaded": [], "installed": [], "removed_packages": []}
