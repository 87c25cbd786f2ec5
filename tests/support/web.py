"""The host's HTTPS (nginx: MTA-STS, autoconfig) as a client in the outside world asks it."""

from __future__ import annotations

import http.client
import socket

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


def answer(host: str, port: int = 443) -> tuple[int, dict[str, str]] | None:
    """The status and headers nginx answers GET / with Host (and, on 443, SNI) HOST, from the
    outside world; None when it closes the connection without a word (its 444)."""

    def get() -> tuple[int, dict[str, str]] | None:
        if port == 443:
            context = unverified()
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(host, 443, context=context, timeout=30)
            # Connect to the droplet's address while sending HOST as SNI and Host, as a browser would.
            conn._create_connection = lambda address, *a, **k: socket.create_connection((DROPLET_IPV4, 443), *a, **k)  # type: ignore[attr-defined]
        else:
            conn = http.client.HTTPConnection(DROPLET_IPV4, port, timeout=30)
        try:
            conn.request("GET", "/", headers={"Host": host})
            response = conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            return None
        return response.status, {k.lower(): v for k, v in response.getheaders()}

    return network.in_netns(network.WORLD_NS, get)
