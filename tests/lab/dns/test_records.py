"""The records served: what the lab's DNS answers for the domain is what the program computes
(the MX record, asked for from the outside world)."""

from __future__ import annotations

import base64

from infra.core.dns import records
from infra.core.stack import stack_config
from infra.lab import network, state
from infra.tools.rehearsal import DROPLET_IPV4, DROPLET_IPV6
from tests.support.lab import LAB_MARKS

pytestmark = LAB_MARKS


def test_the_records_served_are_the_programs(lab: state.LabInfo) -> None:
    import dns.message
    import dns.query

    settings_mx = next(r for r in records_for_lab() if r.type == "MX" and r.name == "example.net")

    def ask() -> list[str]:
        reply = dns.query.udp(dns.message.make_query("example.net", "MX"), network.DNS_IP, timeout=5)
        return [str(rr.exchange) for rrset in reply.answer for rr in rrset]

    assert network.in_netns(network.WORLD_NS, ask) == [settings_mx.value + "."]


def records_for_lab() -> list:  # type: ignore[type-arg]
    from infra.core.dns import Facts
    from infra.core.settings import parse_settings

    settings = parse_settings(stack_config("dev"))
    return records(settings, Facts(DROPLET_IPV4, DROPLET_IPV6, base64.b64encode(b"k").decode()))
