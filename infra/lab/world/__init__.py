"""The outside world as the lab's side sees it: its certificates, its zone, its processes.

The stand-ins themselves run in the world namespace (`infra.lab.world.servers`: DNS, SES,
Cloudflare's API; pebble as the ACME CA, `infra.lab.world.acme`); the certificates they serve
come from the lab CA (`infra.lab.world.pki`), which the host trusts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import dns.reversename

from infra.core import backup
from infra.core.dns import zone_file
from infra.core.facts import ses_smtp_endpoint
from infra.core.settings import Settings
from infra.lab.network import (
    ACME_IP,
    BULK_DOMAIN,
    CLOUDFLARE_API,
    CLOUDFLARE_IP,
    DNS_IP,
    REMOTE_DOMAIN,
    REMOTE_IP,
    S3_IP,
    SES_IP,
    WORLD_IPV4,
    WORLD_NS,
)
from infra.lab.state import STATE_DIR, secret_file
from infra.lab.world import acme
from infra.lab.world.pki import IssuedCertificate, LabCA
from infra.tools.rehearsal import DROPLET_IPV4, DROPLET_IPV6, OfflineRun


def s3_names(settings: Settings) -> list[str]:
    """The names restic's S3 client (minio-go) may reach the bucket by: the endpoint, and for
    Amazon's the dual-stack one, each also with the bucket as a subdomain (virtual-host style)."""
    endpoint = backup.endpoint(settings)
    hosts = [endpoint]
    if endpoint.startswith("s3."):
        hosts.append(endpoint.replace("s3.", "s3.dualstack.", 1))
    return [*hosts, *(f"{settings.backup_bucket}.{h}" for h in hosts)]


def make_certificates(run: OfflineRun) -> dict[str, IssuedCertificate]:
    """A lab CA (the host trusts it, as a droplet trusts public CAs) and a certificate for each
    outside server the host reaches by name."""
    ca = LabCA(STATE_DIR / "pki")
    return {
        "ses": ca.issue("ses", [ses_smtp_endpoint(run.settings.ses_region)]),
        "cloudflare": ca.issue("cloudflare", [CLOUDFLARE_API]),
        "acme": ca.issue("acme", [acme.ACME_NAME], [ACME_IP]),
        "s3": ca.issue("s3", s3_names(run.settings)),
    }


def trusted_roots() -> dict[str, Path]:
    """What the host trusts besides its distribution's roots: the lab CA, and pebble's root
    (standing in for Let's Encrypt's, which ca-certificates carries)."""
    pki = STATE_DIR / "pki"
    return {"mailroom-lab-ca": pki / "lab-ca.crt", "mailroom-lab-acme-root": pki / "pebble-root.crt"}


def lab_zone(run: OfflineRun) -> str:
    """Exactly the program's records for the lab's facts, plus the few outside names."""
    facts = run.facts()
    s = run.settings
    outside = [
        # The stand-in root: the host's unbound primes from it (a root with no NS is lame to it).
        ". 3600 IN NS lab-root.",
        f"lab-root. 3600 IN A {DNS_IP}",
        f"{ses_smtp_endpoint(s.ses_region)}. 300 IN A {SES_IP}",
        f"{CLOUDFLARE_API}. 300 IN A {CLOUDFLARE_IP}",
        *(f"{name}. 300 IN A {S3_IP}" for name in s3_names(s)),
        f"{acme.ACME_NAME}. 300 IN A {ACME_IP}",
        f"{REMOTE_DOMAIN}. 300 IN A {REMOTE_IP}",
        f"{REMOTE_DOMAIN}. 300 IN MX 10 mx.{REMOTE_DOMAIN}.",
        f"mx.{REMOTE_DOMAIN}. 300 IN A {REMOTE_IP}",
        f'{REMOTE_DOMAIN}. 300 IN TXT "v=spf1 ip4:{REMOTE_IP} -all"',
        f'_dmarc.{REMOTE_DOMAIN}. 300 IN TXT "v=DMARC1; p=reject"',
        f"{BULK_DOMAIN}. 300 IN A {WORLD_IPV4}",
        f'{BULK_DOMAIN}. 300 IN TXT "v=spf1 ip4:{WORLD_IPV4} -all"',
        f'amazonses.com. 300 IN TXT "v=spf1 ip4:{SES_IP} -all"',
        # DigitalOcean names both of the droplet's addresses after it.
        f"{dns.reversename.from_address(DROPLET_IPV4)} 300 IN PTR {s.host_name}.",
        f"{dns.reversename.from_address(DROPLET_IPV6)} 300 IN PTR {s.host_name}.",
        f"{dns.reversename.from_address(REMOTE_IP)} 300 IN PTR mx.{REMOTE_DOMAIN}.",
    ]
    return zone_file(s, facts) + "\n".join(outside) + "\n"


def _world_process(name: str, argv: list[str]) -> subprocess.Popen[bytes]:
    log = (STATE_DIR / f"{name}.log").open("wb")
    return subprocess.Popen(["ip", "netns", "exec", WORLD_NS, *argv], stdout=subprocess.DEVNULL, stderr=log)


def state_value(run: OfflineRun, name: str, key: str) -> str:
    """A secret as the stack's state holds it (the stand-in cloud's answer), or "" with no such resource."""
    found = [r for r in run.resources if r.name == name]
    return str(found[0].state[key]) if found else ""


def start_world(run: OfflineRun, certificates: Mapping[str, IssuedCertificate]) -> tuple[str, str]:
    """DNS, SES, the Cloudflare API, pebble and the backup bucket's S3, each on its own world address."""
    zone = STATE_DIR / "zone.db"
    zone.write_text(lab_zone(run))
    module = [sys.executable, "-m", "infra.lab.world.servers"]
    api_dir = STATE_DIR / "cloudflare"
    processes = {"dns": _world_process("dns", [*module, "dns", str(zone), DNS_IP, str(api_dir / "records.zone")])}
    ses_user = str(run.outputs.get("sesSmtpUsername", ""))
    ses = certificates["ses"]
    # The SMTP user's policy as the program declares it: the stand-in refuses what it refuses.
    policies = [r.inputs["policy"] for r in run.resources if r.name == "ses-smtp-send"]
    policy = STATE_DIR / "ses-policy.json"
    policy.write_text(policies[0] if policies else '{"Statement": []}')
    processes["ses"] = _world_process("ses", [
        *module, "ses", str(STATE_DIR / "ses"), SES_IP, ses_smtp_endpoint(run.settings.ses_region), ses_user,
        str(secret_file("ses-password", state_value(run, "ses-smtp-key", "sesSmtpPasswordV4"))),
        str(ses.certificate), str(ses.key), str(policy),
    ])  # fmt: skip
    api = certificates["cloudflare"]
    # certbot's token may be used only from where its condition says, as Cloudflare enforces it.
    tokens = run.of_type("cloudflare:index/apiToken:ApiToken")
    token_networks = STATE_DIR / "cloudflare-token-networks.json"
    condition = tokens[0].inputs.get("condition", {}) if tokens else {}
    token_networks.write_text(json.dumps(condition.get("requestIp", {}).get("ins", [])))
    processes["cloudflare"] = _world_process("cloudflare", [
        *module, "cloudflare", str(api_dir), CLOUDFLARE_IP, run.settings.domain,
        str(secret_file("cloudflare-token", state_value(run, "zone-certbot-token", "value"))),
        str(api.certificate), str(api.key), str(token_networks),
    ])  # fmt: skip
    if backup.enabled(run.settings):
        s3 = certificates["s3"]
        # The server's key and its policy as the program declares them (S3 only: a Spaces key has
        # no policy): the stand-in lets that key do what the policy allows and nothing else.
        policies = [r.inputs["policy"] for r in run.resources if r.name == "backup-user-policy"]
        keys = [r for r in run.resources if r.name == "backup-key"]
        guard = []
        if policies and keys:
            server_key = {"id": keys[0].id, "secret": keys[0].state["secret"], "policy": policies[0]}
            guard = [str(secret_file("s3-server-key.json", json.dumps(server_key))), str(STATE_DIR / "s3-owner.json")]
        processes["s3"] = _world_process("s3", [
            *module, "s3", S3_IP, backup.endpoint(run.settings), run.settings.backup_bucket,
            run.settings.backup_region, str(s3.certificate), str(s3.key), *guard,
        ])  # fmt: skip
    config = acme.write_config(STATE_DIR / "pebble.json", ACME_IP, certificates["acme"])
    processes["acme"] = _world_process("acme", acme.argv(config, DNS_IP))
    (STATE_DIR / "world.json").write_text(json.dumps({k: p.pid for k, p in processes.items()}))
    acme.fetch_root(WORLD_NS, ACME_IP, STATE_DIR / "pki/lab-ca.crt", trusted_roots()["mailroom-lab-acme-root"])
    return ses_user, str(zone)


def stop_world() -> None:
    """Stop the world's processes and what they started; safe to call twice."""
    world = STATE_DIR / "world.json"
    if world.exists():
        for pid in json.loads(world.read_text()).values():
            subprocess.run(["pkill", "-TERM", "-P", str(pid)], check=False)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        world.unlink()
