"""The lab's two network namespaces and the cable between them.

    [host namespace]  eth0 198.51.100.10, 2001:db8:51::10       (the droplet's public addresses)
          |  veth
    [world namespace] gateway 198.51.100.1, 2001:db8:51::1      (the host's default route)
                      203.0.113.x / 2001:db8:113::x            (the internet's servers, one address each)

Only documentation ranges (RFC 5737, RFC 3849) are used, and only inside namespaces the lab
creates: nothing is added to this machine's own namespace, whose uplink sits on 192.0.2.0/24.
"""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass

from infra.lab.ledger import Ledger

HOST_IPV4, HOST_IPV6 = "198.51.100.10", "2001:db8:51::10"
GATEWAY_IPV4, GATEWAY_IPV6 = "198.51.100.1", "2001:db8:51::1"
LINK_PREFIX_V4, LINK_PREFIX_V6 = 24, 64


@dataclass(frozen=True)
class WorldAddress:
    ipv4: str
    ipv6: str


# The outside world's servers, each on its own address so that logs and SPF read naturally.
DNS = WorldAddress("203.0.113.53", "2001:db8:113::53")
SES = WorldAddress("203.0.113.25", "2001:db8:113::25")
ACME = WorldAddress("203.0.113.14", "2001:db8:113::14")
REMOTE_MX = WorldAddress("203.0.113.30", "2001:db8:113::30")  # another domain's mail server
CLIENT = WorldAddress("203.0.113.40", "2001:db8:113::40")  # a user's mail client, away from home
WORLD_ADDRESSES = (DNS, SES, ACME, REMOTE_MX, CLIENT)
LAB_RANGES = ("198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
# Never touched: this machine's uplink (see FIELD-NOTES).
FORBIDDEN_RANGE = ipaddress.ip_network("192.0.2.0/24")


class NetworkError(RuntimeError):
    pass


@dataclass(frozen=True)
class Namespaces:
    """Names of one lab's namespaces and links; `name` keeps two labs (or a lab and a test) apart."""

    name: str

    @property
    def host(self) -> str:
        return f"{self.name}-host"

    @property
    def world(self) -> str:
        return f"{self.name}-world"

    @property
    def host_link(self) -> str:  # renamed to eth0 once inside the host namespace
        return f"{self.name}-h"

    @property
    def world_link(self) -> str:
        return f"{self.name}-w"


def _ip(*argv: str) -> None:
    result = subprocess.run(["ip", *argv], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise NetworkError(f"ip {' '.join(argv)}: {result.stderr.strip()}")


def routed_overlaps() -> list[str]:
    """Routes of this machine's own namespace that overlap the lab's ranges (there should be none)."""
    found = []
    for family in ("-4", "-6"):
        listing = subprocess.run(["ip", family, "route"], capture_output=True, text=True, check=True).stdout
        for line in listing.splitlines():
            target = line.split()[0]
            if target == "default":
                continue
            try:
                network = ipaddress.ip_network(target, strict=False)
            except ValueError:
                continue
            if any(network.overlaps(ipaddress.ip_network(r)) for r in LAB_RANGES):
                found.append(line)
    return found


def create(names: Namespaces, ledger: Ledger) -> None:
    if len(names.host_link) > 15:
        raise NetworkError(f"lab name {names.name!r} is too long for a link name; accepted: up to 13 characters")
    overlaps = routed_overlaps()
    if overlaps:
        raise NetworkError(f"this machine already routes the lab's ranges ({'; '.join(overlaps)}); refusing")
    for address in (HOST_IPV4, GATEWAY_IPV4, *(a.ipv4 for a in WORLD_ADDRESSES)):
        assert ipaddress.ip_address(address) not in FORBIDDEN_RANGE
    for namespace in (names.host, names.world):
        _ip("netns", "add", namespace)
        ledger.add("netns", namespace)
        _ip("-n", namespace, "link", "set", "lo", "up")
    # Created inside the world namespace, so that no lab link ever exists in this machine's own.
    _ip("-n", names.world, "link", "add", names.world_link, "type", "veth", "peer", "name", names.host_link)
    ledger.add("link", names.world_link, names.world)
    _ip("-n", names.world, "link", "set", names.host_link, "netns", names.host)
    _ip("-n", names.host, "link", "set", names.host_link, "name", "eth0")
    _ip("-n", names.host, "addr", "add", f"{HOST_IPV4}/{LINK_PREFIX_V4}", "dev", "eth0")
    _ip("-n", names.host, "addr", "add", f"{HOST_IPV6}/{LINK_PREFIX_V6}", "dev", "eth0", "nodad")
    _ip("-n", names.host, "link", "set", "eth0", "up")
    _ip("-n", names.host, "route", "add", "default", "via", GATEWAY_IPV4)
    _ip("-n", names.host, "-6", "route", "add", "default", "via", GATEWAY_IPV6)
    world_link = names.world_link
    _ip("-n", names.world, "addr", "add", f"{GATEWAY_IPV4}/{LINK_PREFIX_V4}", "dev", world_link)
    _ip("-n", names.world, "addr", "add", f"{GATEWAY_IPV6}/{LINK_PREFIX_V6}", "dev", world_link, "nodad")
    for server in WORLD_ADDRESSES:
        _ip("-n", names.world, "addr", "add", f"{server.ipv4}/32", "dev", world_link)
        _ip("-n", names.world, "addr", "add", f"{server.ipv6}/128", "dev", world_link, "nodad")
    # The host reaches these /32s through its default route: the world is its gateway.
    _ip("-n", names.world, "link", "set", world_link, "up")


def exists(names: Namespaces) -> bool:
    result = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    listed = {line.split()[0] for line in result.splitlines() if line.strip()}
    return names.host in listed or names.world in listed
