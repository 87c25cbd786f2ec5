"""MTA-STS: the policy nginx serves at mta-sts.<domain> is the program's, under the id the
domain's TXT record publishes."""

from __future__ import annotations

from pathlib import Path

from infra.core.stack import stack_config
from infra.lab import state
from tests.support.lab import LAB_MARKS
from tests.support.web import https_get

pytestmark = LAB_MARKS


def test_mta_sts_policy_is_served_with_the_id_published_in_dns(lab: state.LabInfo) -> None:
    from infra.core.dns import mta_sts_id, mta_sts_policy
    from infra.core.settings import parse_settings

    settings = parse_settings(stack_config("dev", lab.overrides))
    status, policy = https_get("mta-sts.example.net", "/.well-known/mta-sts.txt")
    assert (status, policy) == (200, mta_sts_policy(settings))
    assert f"v=STSv1; id={mta_sts_id(settings)}" in Path(lab.zone).read_text()
