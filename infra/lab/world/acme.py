"""pebble (Debian package) as the lab's ACME certificate authority, in the world namespace.

It validates challenges for real: http-01 on the host's port 80 and tls-alpn-01 on 443,
resolving names through the lab DNS, and dns-01 through the same DNS (the lab publishes TXT
records by rewriting its zone file, which the DNS server re-reads). Its API is served over
TLS with a lab CA certificate for ACME_NAME; the root that signs what it issues is made anew
at every start and is fetched from its management port, so the host can trust it.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.request
from pathlib import Path

from infra.lab.network import in_netns
from infra.lab.world.pki import IssuedCertificate

# Not under .test: unbound (the host's resolver) answers NXDOMAIN for that special-use TLD.
ACME_NAME = "acme.example.com"
CAA_DOMAIN = "example.com"  # what the lab CA would publish for CAA (pebble checks no CAA)
ACME_PORT, MANAGEMENT_PORT = 14000, 15000
HTTP_01_PORT, TLS_ALPN_01_PORT = 80, 443
# Pebble's defaults sleep up to 15 s before validating and reject 5 % of nonces to exercise
# clients' retries; the lab wants quick, deterministic issuance.
ENVIRONMENT = {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}


def directory_url() -> str:
    return f"https://{ACME_NAME}:{ACME_PORT}/dir"


def write_config(path: Path, listen: str, tls: IssuedCertificate) -> Path:
    config = {
        "pebble": {
            "listenAddress": f"{listen}:{ACME_PORT}",
            "managementListenAddress": f"{listen}:{MANAGEMENT_PORT}",
            "certificate": str(tls.certificate),
            "privateKey": str(tls.key),
            "httpPort": HTTP_01_PORT,
            "tlsPort": TLS_ALPN_01_PORT,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
    }
    path.write_text(json.dumps(config, indent=2))
    return path


def argv(config: Path, dns_server: str) -> list[str]:
    return ["env", *(f"{k}={v}" for k, v in ENVIRONMENT.items()), "pebble", "-config", str(config),
            "-dnsserver", f"{dns_server}:53"]  # fmt: skip


def fetch_root(netns: str, address: str, lab_ca: Path, target: Path, timeout: float = 30) -> Path:
    """Pebble's issuing root, from its management API (verified against the lab CA)."""
    context = ssl.create_default_context(cafile=str(lab_ca))
    context.check_hostname = False  # reached by address: the management port has no lab name

    def get() -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(
                    f"https://{address}:{MANAGEMENT_PORT}/roots/0", context=context, timeout=5
                ) as response:
                    return bytes(response.read())
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    target.write_bytes(in_netns(netns, get))
    return target
