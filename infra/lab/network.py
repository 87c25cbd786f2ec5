"""The lab's network: the host's namespace and the outside world's, joined by one veth pair.

The host namespace holds the droplet's addresses; the world namespace holds every outside
address the host reaches (the lab DNS, SES, the correspondent's server, pebble, Cloudflare's
API), all in documentation ranges. `in_netns` runs code inside either one.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from infra.lab.state import NAME, LabError, sh
from infra.tools.rehearsal import DROPLET_IPV4, DROPLET_IPV6

HOST_NS, WORLD_NS = f"{NAME}-host", f"{NAME}-world"
HOST_LINK, WORLD_LINK = f"{NAME}-h", f"{NAME}-w"
WORLD_IPV4, WORLD_IPV6 = "203.0.113.1", "2001:db8:10::1"
DNS_IP, SES_IP, REMOTE_IP = "203.0.113.53", "203.0.113.20", "203.0.113.30"
ACME_IP, CLOUDFLARE_IP = "203.0.113.14", "203.0.113.16"  # pebble; the Cloudflare API stand-in
S3_IP = "203.0.113.18"  # the backup bucket's S3 API (moto)
CLOUDFLARE_API = "api.cloudflare.com"  # where certbot's dns-cloudflare plugin sends its calls
REMOTE_DOMAIN = "example.com"  # the outside correspondent's domain, served by the lab DNS
# The benchmarks' bulk sender: Postfix's smtp-source cannot choose its source address, so its
# domain's SPF lists the world's first address (which it sends from) and its mail passes DMARC.
BULK_DOMAIN = f"bulk.{REMOTE_DOMAIN}"

CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run FN in a thread that joined the namespace: the sockets it opens live there."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    box: dict[str, Any] = {}

    def target() -> None:
        with Path(f"/run/netns/{netns}").open() as handle:
            if libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                box["error"] = OSError(ctypes.get_errno(), f"setns {netns}")
                return
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


def check_routes() -> None:
    """Refuse to start if the lab's ranges already route somewhere on this machine."""
    routes = sh("ip", "route").stdout + sh("ip", "-6", "route").stdout
    for prefix in ("203.0.113.", "2001:db8:10:"):
        if prefix in routes:
            raise LabError(f"{prefix}x is already routed on this machine; is another lab running? (lab down)")


def create_network() -> None:
    check_routes()
    for ns in (HOST_NS, WORLD_NS):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "link", "add", HOST_LINK, "type", "veth", "peer", "name", WORLD_LINK)
    sh("ip", "link", "set", HOST_LINK, "netns", HOST_NS)
    sh("ip", "link", "set", WORLD_LINK, "netns", WORLD_NS)
    sh("ip", "-n", HOST_NS, "link", "set", HOST_LINK, "name", "eth0")
    sh("ip", "-n", HOST_NS, "addr", "add", f"{DROPLET_IPV4}/24", "dev", "eth0")
    sh("ip", "-n", HOST_NS, "addr", "add", f"{DROPLET_IPV6}/64", "dev", "eth0", "nodad")
    sh("ip", "-n", HOST_NS, "link", "set", "eth0", "up")
    sh("ip", "-n", HOST_NS, "route", "add", "default", "via", WORLD_IPV4)
    for address in (WORLD_IPV4, DNS_IP, SES_IP, REMOTE_IP, ACME_IP, CLOUDFLARE_IP, S3_IP):
        sh("ip", "-n", WORLD_NS, "addr", "add", f"{address}/24", "dev", WORLD_LINK)
    sh("ip", "-n", WORLD_NS, "addr", "add", f"{WORLD_IPV6}/64", "dev", WORLD_LINK, "nodad")
    sh("ip", "-n", WORLD_NS, "link", "set", WORLD_LINK, "up")
