"""The host's certificate, as production gets it: certbot on the host, DNS-01 through the
Cloudflare API with the program's scoped token, issued by an ACME CA (pebble standing in for
Let's Encrypt), installed and renewed by the program's own script and deploy hook, and served
on every TLS port (25, 465, 587, 993, 443).

What the lab stands in for is only outside the host: api.cloudflare.com
(infra.lab.world.servers, reached by name with a lab CA certificate the host trusts), the ACME
CA (pebble, whose root the host trusts as it trusts Let's Encrypt's), and the DNS pebble
validates against.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from infra.lab import deploy, host, network, state, world
from infra.lab.mail import find, message, send_inbound, served_certificate
from infra.tools.rehearsal import DROPLET_IPV4
from tests.support.lab import LAB_MARKS

pytestmark = LAB_MARKS
NAMES = ("mail.example.net", "mta-sts.example.net", "autoconfig.example.net")  # Pulumi.dev.yaml's host and domain
PORTS = (25, 465, 587, 993, 443)


def api_calls() -> list[dict[str, Any]]:
    calls = state.STATE_DIR / "cloudflare" / "calls.jsonl"
    return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []


def serials(cafile: Path) -> dict[int, int]:
    """The serial number each TLS port serves, each verified against CAFILE and the name asked for."""
    return {
        port: x509.load_der_x509_certificate(
            served_certificate(port, NAMES[1 if port == 443 else 0], cafile)
        ).serial_number
        for port in PORTS
    }


def test_certbot_proved_every_name_over_dns_01_and_cleaned_up(lab: state.LabInfo) -> None:
    calls = api_calls()
    added = [c for c in calls if c["method"] == "POST" and c["path"].endswith("/dns_records")]
    assert len(added) >= len(NAMES) and all(c["status"] == 200 for c in added), added
    looked_up = {c["query"].get("name") for c in calls if c["path"].endswith("/dns_records") and c["method"] == "GET"}
    assert {f"_acme-challenge.{n}" for n in NAMES} <= looked_up
    deleted = [c for c in calls if c["method"] == "DELETE" and c["status"] == 200]
    assert len(deleted) == len(added), "every challenge record certbot added was deleted again"
    assert (state.STATE_DIR / "cloudflare" / "records.zone").read_text() == ""

    listed = host.guest("sudo certbot certificates --cert-name mailroom", lab)
    assert listed.returncode == 0, listed.stderr
    domains = next(line for line in listed.stdout.splitlines() if "Domains:" in line).split()[1:]
    assert sorted(domains) == sorted(NAMES)


@pytest.mark.parametrize("port", [25, 465, 587, 993, 443])
def test_every_tls_port_serves_the_certificate_certbot_obtained(lab: state.LabInfo, port: int) -> None:
    """Verified as a client verifies it: chain to the ACME CA's root (pebble's, in the lab), name."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from infra.lab.mail import served_certificate

    name = "mta-sts.example.net" if port == 443 else "mail.example.net"
    der = served_certificate(port, name, cafile=world.trusted_roots()["mailroom-lab-acme-root"])
    certificate = x509.load_der_x509_certificate(der)
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "mail.example.net"
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    )
    assert set(names) == {"mail.example.net", "mta-sts.example.net", "autoconfig.example.net"}


def test_the_cloudflare_api_answers_only_the_programs_token(lab: state.LabInfo) -> None:
    """So the issuance above proves the token reached certbot: another one gets 403."""
    root = state.STATE_DIR / "pki" / "lab-ca.crt"

    def ask(token: str) -> tuple[int, dict[str, Any]]:
        import ssl

        request = urllib.request.Request(
            f"https://{network.CLOUDFLARE_IP}/client/v4/zones?name=example.net",
            headers={"Authorization": f"Bearer {token}"},
        )
        context = ssl.create_default_context(cafile=str(root))
        context.check_hostname = False  # dialled by address: the world namespace resolves nothing
        try:
            with urllib.request.urlopen(request, context=context, timeout=30) as response:  # noqa: S310 - https, built above
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as refused:
            return refused.code, json.loads(refused.read())

    status, body = network.in_netns(network.WORLD_NS, lambda: ask("not-the-token"))
    assert (status, body["success"]) == (403, False)
    # The program's token, from anywhere but the server: its request-IP condition refuses it.
    token = (state.STATE_DIR / "cloudflare-token").read_text()
    status, body = network.in_netns(network.WORLD_NS, lambda: ask(token))
    assert (status, body["errors"][0]["code"]) == (403, 9109), body
    # From the server, certbot's calls (above) were answered.
    from_server = [c for c in api_calls() if c.get("client") == DROPLET_IPV4]
    assert from_server and all(c["status"] == 200 for c in from_server), from_server


def test_a_renewed_certificate_is_installed_and_served_on_every_port(lab: state.LabInfo) -> None:
    """What certbot's timer does when the certificate nears expiry, forced: the deploy hook
    installs the new one where Postfix, Dovecot and nginx read it and reloads them."""
    if lab.overrides.get("spamFilter", "spamassassin") != "spamassassin":
        pytest.skip("certificates do not depend on the spam filter: renewal is proven once, in spamassassin mode")
    root = world.trusted_roots()["mailroom-lab-acme-root"]
    before = serials(root)
    assert len(set(before.values())) == 1, f"the ports serve different certificates: {before}"

    renewed = host.guest("sudo certbot renew --force-renewal --no-random-sleep-on-renew", lab)
    assert renewed.returncode == 0, renewed.stdout + renewed.stderr

    after = serials(root)
    assert len(set(after.values())) == 1, f"after renewal the ports serve different certificates: {after}"
    assert set(after.values()) != set(before.values()), "the daemons still serve the old certificate"
    installed = host.guest("sudo openssl x509 -noout -serial -in /etc/mailroom/tls/fullchain.pem", lab)
    assert int(installed.stdout.strip().split("=")[1], 16) == after[993]


@contextlib.contextmanager
def ca_away() -> Iterator[None]:
    """The ACME CA unreachable (its address gone from the world), as during an outage."""
    world = ["ip", "-n", network.WORLD_NS, "addr"]
    address = [f"{network.ACME_IP}/24", "dev", network.WORLD_LINK]
    subprocess.run([*world, "del", *address], check=True)
    try:
        yield
    finally:
        subprocess.run([*world, "add", *address], check=True)


def test_a_host_deployed_while_the_ca_is_away_gets_its_certificate_from_the_daily_retry(lab: state.LabInfo) -> None:
    """A new droplet whose first certificate cannot be had: the deploy still succeeds, every port
    serves the self-signed certificate (mail is never refused for want of one), and the daily
    job the bundle installs obtains the real one once the CA is back."""
    if lab.overrides.get("spamFilter", "spamassassin") != "spamassassin":
        pytest.skip("certificates do not depend on the spam filter: proven once, in spamassassin mode")
    with ca_away():
        steps = {s["name"]: s for s in deploy.replace_host()}
        issued = steps["server-issue-certificate"]
        assert issued["exit"] == 0 and "no Let's Encrypt certificate yet" in issued["stderr"], issued
        for port in PORTS:
            certificate = x509.load_der_x509_certificate(served_certificate(port, NAMES[0]))
            assert certificate.issuer == certificate.subject, f"port {port} serves {certificate.issuer}"
        user = next(iter(lab.passwords))
        msg = message("dana@example.com", user, "while the CA is away")
        send_inbound(msg)
        assert find(user, lab.passwords[user], msg["Message-ID"]) is not None

    job = host.guest("cat /etc/cron.d/mailroom-certificate", lab).stdout
    command = next(line for line in job.splitlines() if line[:1].isdigit()).split(" root ", 1)[1]
    retried = host.guest(f"sudo {command}", lab)
    assert retried.returncode == 0, retried.stderr
    served = serials(world.trusted_roots()["mailroom-lab-acme-root"])
    assert len(set(served.values())) == 1, f"the ports serve different certificates: {served}"
