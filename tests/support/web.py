"""The host's HTTPS (nginx: MTA-STS, autoconfig) as a client in the outside world asks it."""

from __future__ import annotations

import http.client

from infra.lab import network
from infra.lab.mail import unverified
from infra.tools.rehearsal import DROPLET_IPV4


def https_get(host: str, path: str) -> tuple[int, str]:
    """The status and body of GET PATH with Host: HOST, from the outside world."""

    def get() -> tuple[int, str]:
        conn = http.client.HTTPSConnection(DROPLET_IPV4, 443, context=unverified(), timeout=30)
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        return response.status, response.read().decode()

    return network.in_netns(network.WORLD_NS, get)
