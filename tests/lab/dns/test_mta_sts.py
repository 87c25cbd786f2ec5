"""MTA-STS: the policy nginx serves at mta-sts.<domain> is the program's, under the id the
domain's TXT record publishes."""

from __future__ import annotations

from pathlib import Path

from infra.core.stack import stack_config
from infra.lab import state
from tests.support.lab import LAB_MARKS
from tests.support.web import answer, https_get

pytestmark = LAB_MARKS


def test_mta_sts_policy_is_served_with_the_id_published_in_dns(lab: state.LabInfo) -> None:
    from infra.core.dns import mta_sts_id, mta_sts_policy
    from infra.core.settings import parse_settings

    settings = parse_settings(stack_config("dev", lab.overrides))
    status, policy = https_get("mta-sts.example.net", "/.well-known/mta-sts.txt")
    assert (status, policy) == (200, mta_sts_policy(settings))
    assert f"v=STSv1; id={mta_sts_id(settings)}" in Path(lab.zone).read_text()


def test_unknown_names_get_no_answer_and_served_names_send_the_security_headers(lab: state.LabInfo) -> None:
    """Debian's default site is replaced: a name the host does not serve, or its bare address,
    gets the connection closed (nginx's 444), on HTTP and HTTPS; the served names send HSTS."""
    assert answer("unknown.example.org", 80) is None
    assert answer("203.0.113.10", 80) is None
    assert answer("unknown.example.org", 443) is None
    moved = answer("mta-sts.example.net", 80)
    assert moved is not None and moved[0] == 301
    served = answer("mta-sts.example.net", 443)
    assert served is not None and served[0] == 404  # only the policy's own path is served
    headers = served[1]
    assert headers["strict-transport-security"] == "max-age=31536000"
    assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "no-referrer"
    assert "frame-ancestors 'self'" in headers["content-security-policy"]
    assert "server" not in headers or headers["server"] == "nginx"  # no version shown
