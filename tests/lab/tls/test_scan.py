"""What a TLS scanner sees. testssl, run from the outside world against the lab host on
25, 465, 587, 993 and 443, finds no protocol below TLS 1.2 on submission, IMAP and HTTPS (port
25 keeps older TLS for opportunistic STARTTLS with other servers, but never SSL), no NULL,
anonymous, export or RC4 cipher anywhere, and the certificate for the mail host's name, chained
to the ACME CA's root (pebble's, given to testssl as Let's Encrypt's is in its trust stores).
Scanned in both spam filter modes: each is its own host.

testssl checks protocols (-p), cipher categories (-s), RC4 (-4) and the certificate (-S), not
each cipher one by one; the five scans run side by side. testssl exits non-zero offline, so its
JSON findings are read instead, and kept in .lab-artifacts/testssl/MODE/ for a reader to look at.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from infra.core.facts import PROJECT_DIR
from infra.lab import world
from infra.lab.network import WORLD_NS
from infra.lab.state import LabInfo
from infra.tools.rehearsal import DROPLET_IPV4

pytestmark = [pytest.mark.lab, pytest.mark.reliability]

HOST_NAME = "mail.example.net"  # hostName in Pulumi.dev.yaml
HTTPS_NAME = "mta-sts.example.net"  # what HTTPS clients ask for (MTA-STS policy fetchers)
STARTTLS = {25: "smtp", 587: "smtp"}
PORTS = (25, 465, 587, 993, 443)
MODERN_ONLY = (465, 587, 993, 443)  # submission, IMAP, HTTPS: TLS 1.2 or newer, nothing else
ARTIFACTS = PROJECT_DIR / ".lab-artifacts" / "testssl"
SCAN_TIMEOUT = 240


def scan_argv(port: int, jsonfile: Path) -> list[str]:
    name = HTTPS_NAME if port == 443 else HOST_NAME
    starttls = ["-t", STARTTLS[port]] if port in STARTTLS else []
    return [
        "ip", "netns", "exec", WORLD_NS, "testssl", "--quiet", "--color", "0", "--warnings", "off",
        # The world namespace has no resolver for testssl: the address is given, no lookups made.
        "--nodns", "min", "--ip", DROPLET_IPV4, "--connect-timeout", "10", "--openssl-timeout", "10",
        # Pebble's root stands in for Let's Encrypt's, which testssl's own trust stores carry.
        "--add-ca", str(world.trusted_roots()["mailroom-lab-acme-root"]),
        "-p", "-s", "-4", "-S", *starttls, "--jsonfile", str(jsonfile), f"{name}:{port}",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def scans(lab: LabInfo) -> dict[int, dict[str, dict[str, Any]]]:
    """testssl's findings per port, by id."""
    if shutil.which("testssl") is None:
        pytest.skip("testssl is not installed (Debian package testssl.sh, requirements-lab-debian.txt)")
    kept = ARTIFACTS / lab.overrides.get("spamFilter", "spamassassin")  # one directory per mode
    shutil.rmtree(kept, ignore_errors=True)
    kept.mkdir(parents=True)
    files = {port: kept / f"{port}.json" for port in PORTS}
    running = []
    for port, path in files.items():
        with (kept / f"{port}.txt").open("w") as log:
            running.append(subprocess.Popen(scan_argv(port, path), stdout=log, stderr=subprocess.STDOUT))
    for process in running:
        try:
            process.wait(timeout=SCAN_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
    findings = {}
    for port, path in files.items():
        assert path.exists(), f"testssl wrote no findings for port {port}; see {kept / f'{port}.txt'}"
        found = {f["id"]: f for f in json.loads(path.read_text())}
        problems = [f["finding"] for f in found.values() if f["id"] == "scanProblem"]
        assert not problems and "scanTime" in found, f"the scan of port {port} did not finish: {problems}"
        findings[port] = found
    return findings


def finding(scans: dict[int, dict[str, dict[str, Any]]], port: int, check: str) -> str:
    assert check in scans[port], f"testssl reported no {check} for port {port}"
    return str(scans[port][check]["finding"])


@pytest.mark.parametrize("port", MODERN_ONLY)
def test_submission_imap_and_https_speak_tls_1_2_or_newer_only(scans: dict[int, Any], port: int) -> None:
    old = {p: finding(scans, port, p) for p in ("SSLv2", "SSLv3", "TLS1", "TLS1_1")}
    assert all(f.startswith("not offered") for f in old.values()), f"port {port} offers an old protocol: {old}"
    new = {p: finding(scans, port, p) for p in ("TLS1_2", "TLS1_3")}
    assert any(f.startswith("offered") for f in new.values()), f"port {port} offers neither TLS 1.2 nor 1.3: {new}"


def test_inbound_smtp_never_speaks_ssl(scans: dict[int, Any]) -> None:
    """Port 25 keeps TLS 1.0 and 1.1: other servers' STARTTLS is opportunistic, and refusing an
    old one would make it send in clear text (RFC 7435). SSL is refused there too."""
    old = {p: finding(scans, 25, p) for p in ("SSLv2", "SSLv3")}
    assert all(f.startswith("not offered") for f in old.values()), f"port 25 offers SSL: {old}"
    assert finding(scans, 25, "TLS1_2").startswith("offered")


@pytest.mark.parametrize("port", PORTS)
def test_no_null_anonymous_export_or_rc4_cipher(scans: dict[int, Any], port: int) -> None:
    categories = ("cipherlist_NULL", "cipherlist_aNULL", "cipherlist_EXPORT", "cipherlist_LOW")
    weak = {c: finding(scans, port, c) for c in categories}  # LOW: 64-bit, DES, RC2 and RC4 ciphers
    assert all(f.startswith("not offered") for f in weak.values()), f"port {port} offers weak ciphers: {weak}"
    assert scans[port]["RC4"]["severity"] == "OK", f"port {port}: RC4 {finding(scans, port, 'RC4')}"


def test_every_port_serves_one_certificate_for_the_host_name(scans: dict[int, Any]) -> None:
    for port in PORTS:
        assert finding(scans, port, "cert_commonName") == HOST_NAME
        names = finding(scans, port, "cert_subjectAltName").split()
        assert HOST_NAME in names and HTTPS_NAME in names, f"port {port}: the certificate names {names}"
        trust = finding(scans, port, "cert_trust")
        assert trust.startswith("Ok via SAN"), f"port {port}: the certificate does not match its name: {trust}"
        assert scans[port]["cert_expirationStatus"]["severity"] == "OK", finding(scans, port, "cert_expirationStatus")
        strong = ("EC 256 bits", "EC 384 bits", "RSA 2048 bits", "RSA 3072 bits", "RSA 4096 bits")
        assert scans[port]["cert_keySize"]["finding"] in strong, finding(scans, port, "cert_keySize")
    prints = {port: finding(scans, port, "cert_fingerprintSHA256") for port in PORTS}
    assert len(set(prints.values())) == 1, f"the ports serve different certificates: {prints}"


def test_the_certificate_chain_is_trusted(scans: dict[int, Any]) -> None:
    """The certificate certbot obtained from the ACME CA (pebble, in the lab), with its chain."""
    chains = {port: finding(scans, port, "cert_chain_of_trust") for port in PORTS}
    assert all(c.startswith("passed") for c in chains.values()), f"the certificate chain is not trusted: {chains}"
    issuers = {port: finding(scans, port, "cert_caIssuers") for port in PORTS}
    assert all(i.startswith("Pebble Intermediate CA") for i in issuers.values()), issuers
