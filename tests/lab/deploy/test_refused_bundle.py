"""A bundle that fails its checks is refused: the apply exits 1 naming the daemon whose checker
refused it, no file of it goes live, and the server keeps delivering mail."""

from __future__ import annotations

import json

from infra.core.steps import Step
from infra.lab import host, state
from infra.lab.mail import find, message, send_inbound
from infra.lab.network import REMOTE_DOMAIN
from tests.support.lab import LAB_MARKS, alice, main_cf_sum

pytestmark = LAB_MARKS


def test_a_bundle_failing_its_checks_is_refused_and_the_server_keeps_working(lab: state.LabInfo) -> None:
    steps = json.loads((state.STATE_DIR / "steps.json").read_text())
    apply = next(s for s in steps if s["name"] == "server-apply-bundle")
    bundle = json.loads(apply["stdin"])
    main_cf = next(f for f in bundle["files"] if f["path"] == "/etc/postfix/main.cf")
    main_cf["content"] += "this line is not a parameter\n"  # postfix check refuses it
    before = main_cf_sum(lab)
    result = host.run_steps_result(lab, Step(**{**apply, "stdin": json.dumps(bundle)}))
    assert result.returncode == 1
    assert "service postfix" in result.stderr and "refused before any was live" in result.stderr
    # A failing remote command's error carries its whole stdout and stderr into Pulumi's output,
    # whatever its `logging` says: none of the bundle's secrets may be in them.
    secrets = [line for f in bundle["files"] if f["secret"] for line in f["content"].splitlines() if len(line) >= 8]
    assert secrets, "the bundle holds no secret file"
    leaked = [i for i, line in enumerate(secrets) if line in result.stdout + result.stderr]
    assert not leaked, f"the refused apply printed lines {leaked} of the bundle's secret files"
    assert main_cf_sum(lab) == before
    user, password = alice(lab)
    msg = message(f"dana@{REMOTE_DOMAIN}", user, "still working")
    send_inbound(msg)
    assert find(user, password, msg["Message-ID"]) is not None
