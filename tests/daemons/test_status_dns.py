"""The status check's DNS, address and blocklist lines against a real DNS server (dnslib, the
lab's) on loopback serving the program's own zone export: all ok on the program's records, and
each fault planted in the zone gives its failing line with the fix."""

from __future__ import annotations

import base64
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import dns.reversename
import pytest
from cryptography.hazmat.primitives import serialization

from infra.core.dns import Facts, records, zone_file
from infra.core.settings import Settings, parse_settings
from infra.core.stack import stack_config
from infra.tools import check
from infra.tools.stand_ins import dkim_private_key_pem

IPV4, IPV6 = "198.51.100.10", "2001:db8::10"


def public_base64(pem: str) -> str:
    key = serialization.load_pem_private_key(pem.encode(), None).public_key()
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()


# The signer's key, as the program generates it; its public half is what records() publishes.
DKIM_PEM = dkim_private_key_pem()
FACTS = Facts(IPV4, IPV6, public_base64(DKIM_PEM), ("tokena", "tokenb", "tokenc"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def settings() -> Settings:
    return parse_settings(stack_config("dev", {"relay": "direct"}))


@pytest.fixture
def zone(tmp_path: Path, settings: Settings) -> Iterator[tuple[Path, int]]:
    """The program's zone export plus the droplet's PTRs, served on loopback; the file is re-read on change."""
    from dnslib.server import DNSLogger, DNSServer

    from infra.lab.world.servers import ReloadingZone

    path = tmp_path / "zone.db"
    ptrs = [f"{dns.reversename.from_address(a)} 300 IN PTR {settings.host_name}." for a in (IPV4, IPV6)]
    path.write_text(zone_file(settings, FACTS) + "\n".join(ptrs) + "\n")
    port = free_port()
    server = DNSServer(ReloadingZone(path), address="127.0.0.1", port=port, logger=DNSLogger("-request,-reply"))
    server.start_thread()
    yield path, port
    server.stop()


def target(settings: Settings, port: int) -> check.Target:
    return check.Target(settings, IPV4, IPV6, resolver="127.0.0.1", resolver_port=port, timeout=3)


def records_results(settings: Settings, port: int) -> list[check.Result]:
    expected = check.expected_records(target(settings, port), FACTS.dkim_public_key)
    return list(check.status.check_records(expected, check._resolver(target(settings, port))))


def failing(results: list[check.Result]) -> list[tuple[str, str, str, str]]:
    return [(r.status, r.name, r.detail, r.fix) for r in results if r.status != check.OK]


def plant(path: Path, edit: str, *, remove: str = "") -> None:
    lines = path.read_text().splitlines()
    if remove:  # a line whose words (tabs or spaces between them) hold REMOVE
        assert any(remove in " ".join(line.split()) for line in lines), remove
        lines = [line for line in lines if remove not in " ".join(line.split())]
    path.write_text("\n".join([*lines, edit]) + "\n")
    stamp = path.stat().st_mtime_ns + 1_000_000
    os.utime(path, ns=(stamp, stamp))  # the server re-reads on a changed mtime


def test_the_programs_own_records_are_all_ok(zone: tuple[Path, int], settings: Settings) -> None:
    results = records_results(settings, zone[1])
    assert failing(results) == []
    # One line per (name, type) the program manages on Cloudflare, every such record among them.
    assert {r.name for r in results} == {f"{r.type} {r.name}" for r in records(settings, FACTS) if r.hosted}


def test_a_removed_record_fails_with_the_record_to_set(zone: tuple[Path, int], settings: Settings) -> None:
    path, port = zone
    plant(path, "", remove="IN MX")
    [(status, name, detail, fix)] = failing(records_results(settings, port))
    assert (status, name) == ("failure", "MX example.net")
    assert detail == "10 mail.example.net. expected (absent)"
    assert "set the record `example.net MX 10 mail.example.net.` at Cloudflare" in fix


def test_a_changed_record_fails_showing_what_it_has(zone: tuple[Path, int], settings: Settings) -> None:
    path, port = zone
    plant(path, '_dmarc.example.net. 300 IN TXT "v=DMARC1; p=none"', remove="_dmarc")
    [(status, name, detail, _)] = failing(records_results(settings, port))
    assert (status, name) == ("failure", "TXT _dmarc.example.net")
    assert detail.endswith('(it has "v=DMARC1; p=none")')


def test_a_second_spf_record_is_drift_other_txt_at_the_apex_is_the_owners(
    zone: tuple[Path, int], settings: Settings
) -> None:
    path, port = zone
    plant(path, 'example.net. 300 IN TXT "google-site-verification=abc"')
    assert failing(records_results(settings, port)) == []
    plant(path, 'example.net. 300 IN TXT "v=spf1 include:_spf.google.com ~all"')
    [(status, name, detail, fix)] = failing(records_results(settings, port))
    assert (status, name) == ("failure", "TXT example.net")
    assert "a second SPF record makes SPF fail for every message (permerror)" in detail
    assert fix.startswith('delete `example.net TXT "v=spf1 include:_spf.google.com ~all"` at Cloudflare')


def test_a_stray_mx_is_drift(zone: tuple[Path, int], settings: Settings) -> None:
    path, port = zone
    plant(path, "example.net. 300 IN MX 20 old-mail.example.org.")
    [(status, name, detail, _)] = failing(records_results(settings, port))
    assert (status, name, detail) == (
        "failure",
        "MX example.net",
        "an extra record 20 old-mail.example.org.: the program does not declare it",
    )


def test_spf_passes_for_the_droplet_and_fails_when_it_is_left_out(zone: tuple[Path, int], settings: Settings) -> None:
    path, port = zone
    [line] = check.spf_checks(target(settings, port))
    assert (line.status, line.detail.split(" (")[0]) == ("ok", "pass for the droplet")
    plant(path, 'example.net. 300 IN TXT "v=spf1 -all"', remove="v=spf1")
    [line] = check.spf_checks(target(settings, port))
    assert line.status == "failure" and "gets SPF fail" in line.detail


def test_a_missing_ipv6_ptr_fails_naming_the_droplets_name(zone: tuple[Path, int], settings: Settings) -> None:
    path, port = zone
    assert failing(check.address_checks(target(settings, port))) == []
    plant(path, "", remove=str(dns.reversename.from_address(IPV6)))
    [(status, name, detail, fix)] = failing(check.address_checks(target(settings, port)))
    assert (status, name) == ("failure", "IPv6 PTR")
    assert detail.startswith(f"{IPV6} points back to none, not mail.example.net")
    assert "the droplet must be named mail.example.net" in fix


def test_a_listed_address_fails_and_spamhaus_error_answers_are_not_listings(
    zone: tuple[Path, int], settings: Settings
) -> None:
    path, port = zone
    assert failing(check.blocklist_checks(target(settings, port))) == []
    plant(path, "10.100.51.198.zen.spamhaus.org. 300 IN A 127.0.0.2")
    plant(path, "example.net.dbl.spamhaus.org. 300 IN A 127.255.255.254")
    lines = {r.name: r for r in check.blocklist_checks(target(settings, port))}
    listed = lines[f"IPv4 {IPV4} on Spamhaus ZEN"]
    assert (listed.status, listed.detail) == ("failure", "listed (127.0.0.2)")
    assert "https://check.spamhaus.org/" in listed.fix
    public = lines["example.net on the Spamhaus DBL"]
    assert public.status == "warning"
    assert (
        public.detail
        == "not known: Spamhaus answered the query came through a public resolver, which Spamhaus does not answer"
    )
    assert lines[f"IPv6 {IPV6} on Spamhaus ZEN"].status == "ok"


def test_a_dead_resolver_is_a_failure_not_a_pass(settings: Settings) -> None:
    [line] = records_results(settings, free_port())
    assert line.status == "failure"
    assert line.detail == "the resolver gave no answer (server failure or timeout); no other record was checked"


def test_the_report_groups_grades_and_sets_the_exit_status() -> None:
    status = check.status
    results = [
        status.Result("server", "queue", "ok", "0 queued"),
        status.Result("dns", "MX example.net", "failure", "absent", "set it"),
        status.Result("tls", "port 25", "warning", "10 days left", "renew"),
    ]
    text = status.report(results)
    assert text.splitlines()[0].startswith("FAILURE  dns")
    assert "fix: set it" in text and text.rstrip().endswith("1 failure(s), 1 warning(s), 1 ok")
    assert status.exit_code(results) == 2 and status.exit_code(results[::2]) == 1 and status.exit_code(results[:1]) == 0
    # The daily mail: only what changed, then what disappeared.
    after = [results[0], status.Result("dns", "MX example.net", "ok", "as declared")]
    assert status.changed_lines(results, after) == [after[1].line(), "GONE     tls        port 25"]
    assert status.changed_lines(after, after) == []


def test_thresholds_grade_figures() -> None:
    graded = check.status.graded
    assert graded("tls", "c", 30, (21, 7), "d", "f").status == "ok"
    assert graded("tls", "c", 10, (21, 7), "d", "f").status == "warning"
    assert graded("tls", "c", 5, (21, 7), "d", "f").status == "failure"
    assert graded("server", "q", 30, (1, 24), "d", "f", low_is_bad=False).status == "failure"
    memory = check.status.check_memory("MemTotal: 1000 kB\nMemAvailable: 40 kB\nSwapTotal: 100 kB\nSwapFree: 90 kB\n")
    assert [r.status for r in memory] == ["failure", "ok"]


def signed_probe(tmp_path: Path, settings: Settings, pem: str = DKIM_PEM) -> str:
    """What `status.py server` signs with the key file the signer uses."""
    key = tmp_path / "dkim.key"
    key.write_text(pem)
    config = {"domain": settings.domain, "host": settings.host_name, "dkim_selector": settings.dkim_selector}
    return str(check.status.dkim_signed_sample({**config, "dkim_key": str(key)}))


def test_a_fresh_dkim_signature_verifies_and_fails_on_a_key_not_the_signers(
    zone: tuple[Path, int], settings: Settings, tmp_path: Path
) -> None:
    path, port = zone
    resolver = check._resolver(target(settings, port))
    where = f"{settings.dkim_selector}._domainkey.example.net"
    line = check.status.check_dkim_signature(signed_probe(tmp_path, settings), resolver)
    assert (line.status, line.detail) == (
        "ok",
        f"a fresh signature by the server's key verifies with the key at {where}",
    )
    # The signer got a new key, DNS still has the old one: what a receiver sees is a bad signature.
    line = check.status.check_dkim_signature(signed_probe(tmp_path, settings, dkim_private_key_pem()), resolver)
    assert line.status == "failure"
    assert line.detail.startswith(f"a message signed by the server's key does not verify with {where}: ")
    assert line.detail.endswith(": the signature does not match the published key")
    assert "`python -m infra zone`" in line.fix
    # No key published at all.
    plant(path, "", remove=f"{settings.dkim_selector}._domainkey")
    line = check.status.check_dkim_signature(signed_probe(tmp_path, settings), resolver)
    assert line.status == "failure" and line.detail.endswith(f": missing public key: {where}.")


def test_dmarc_is_read_as_a_receiver_does(zone: tuple[Path, int], settings: Settings) -> None:
    path, port = zone
    line = check.dmarc_check(target(settings, port))
    assert line.status == "ok"
    assert line.detail == (
        f"p={settings.dmarc_policy.value}, reports to mailto:{settings.dmarc_report_address}; "
        "DKIM aligns (d=example.net); SPF aligns (MAIL FROM example.net)"
    )
    plant(path, '_dmarc.example.net. 300 IN TXT "v=DMARC1; p=none"')
    line = check.dmarc_check(target(settings, port))
    assert line.status == "failure"
    assert line.detail.startswith("2 DMARC records (receivers then ignore all) at _dmarc.example.net")


def test_dmarc_states_the_alignment_of_sess_mail_from(zone: tuple[Path, int]) -> None:
    ses = parse_settings(stack_config("dev", {"relay": "ses"}))
    line = check.dmarc_check(target(ses, zone[1]))
    assert line.detail.endswith("SPF aligns through SES's MAIL FROM bounce.example.net (relaxed)")


def test_a_dkim_key_left_at_another_selector_is_a_warning(zone: tuple[Path, int], settings: Settings) -> None:
    path, port = zone
    assert check.stray_selector_checks(target(settings, port)) == []
    plant(path, 'default._domainkey.example.net. 300 IN TXT "v=DKIM1; k=rsa; p=MIIBIjANBgkq"')
    plant(path, 'mail._domainkey.example.net. 300 IN TXT "v=DKIM1; p="')  # a revoked key is harmless
    [line] = check.stray_selector_checks(target(settings, port))
    assert (line.status, line.name) == ("warning", "TXT default._domainkey.example.net")
    assert "delete `default._domainkey.example.net TXT` at Cloudflare" in line.fix
