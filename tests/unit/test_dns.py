"""The DNS records: one list, checked against a readable table and by real parsers."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterator
from typing import Any

import checkdmarc.dmarc
import dkim.crypto
import dkim.util
import dns.zone
import pytest
import spf

from infra.core.dns import (
    TXT_CHUNK,
    Facts,
    Record,
    dkim_public_key_body,
    mta_sts_id,
    mta_sts_policy,
    records,
    zone_file,
)
from infra.core.settings import Settings, parse_settings
from infra.core.stack import stack_config
from infra.tools.stand_ins import dkim_private_key_pem

FACTS = Facts("203.0.113.10", "2001:db8:10::10", "MIIBIjANBgkq" + "A" * 380 + "IDAQAB", ("tok1", "tok2", "tok3"))

# The dev stack's records for FACTS, as a reader would check them by eye: name, type, TTL, data.
EXPECTED_DEV = """\
mail.example.net. 300 A 203.0.113.10
mail.example.net. 300 AAAA 2001:db8:10::10
example.net. 3600 MX 10 mail.example.net.
example.net. 3600 TXT "v=spf1 mx include:amazonses.com ~all"
mail._domainkey.example.net. 3600 TXT "v=DKIM1; k=rsa; p=MIIBIjANBgkq{A*380}IDAQAB"
_dmarc.example.net. 3600 TXT "v=DMARC1; p=none; rua=mailto:dmarc-reports@example.net; adkim=r; aspf=r; fo=1"
_mta-sts.example.net. 3600 TXT "v=STSv1; id={MTA_STS_ID}"
mta-sts.example.net. 3600 CNAME mail.example.net.
_smtp._tls.example.net. 3600 TXT "v=TLSRPTv1; rua=mailto:tls-reports@example.net"
_submission._tcp.example.net. 3600 SRV 0 1 587 mail.example.net.
_submissions._tcp.example.net. 3600 SRV 0 1 465 mail.example.net.
_imaps._tcp.example.net. 3600 SRV 0 1 993 mail.example.net.
_imap._tcp.example.net. 3600 SRV 0 0 0 .
_pop3._tcp.example.net. 3600 SRV 0 0 0 .
_pop3s._tcp.example.net. 3600 SRV 0 0 0 .
autoconfig.example.net. 3600 CNAME mail.example.net.
autodiscover.example.net. 3600 CNAME mail.example.net.
example.net. 3600 CAA 0 issue "letsencrypt.org"
example.net. 3600 CAA 0 issuewild ";"
example.net. 3600 CAA 0 iodef "mailto:ops@example.org"
tok1._domainkey.example.net. 3600 CNAME tok1.dkim.amazonses.com.
tok2._domainkey.example.net. 3600 CNAME tok2.dkim.amazonses.com.
tok3._domainkey.example.net. 3600 CNAME tok3.dkim.amazonses.com.
bounce.example.net. 3600 MX 10 feedback-smtp.us-east-1.amazonses.com.
bounce.example.net. 3600 TXT "v=spf1 include:amazonses.com ~all"
"""


def settings_for(stack: str = "dev", **overrides: Any) -> Settings:
    return parse_settings(stack_config(stack, overrides))


def table(rs: list[Record]) -> str:
    lines = []
    for r in rs:
        name = r.name if r.name.endswith(".") else r.name + "."
        lines.append(f"{name} {r.ttl} {r.type} {r.rdata()}")
    return "\n".join(lines) + "\n"


def test_dev_records_match_the_expected_table() -> None:
    settings = settings_for()
    # The DKIM value is longer than one TXT string: the table shows it joined.
    shown = table(records(settings, FACTS)).replace('" "', "")
    expected = EXPECTED_DEV.replace("{A*380}", "A" * 380).replace("{MTA_STS_ID}", mta_sts_id(settings))
    assert shown == expected


def test_ses_records_exist_only_with_the_ses_relay() -> None:
    for relay, include in (("smtp2go", "include:spf.smtp2go.com"), ("direct", "")):
        rs = records(settings_for(relay=relay, smtp2goUsername="u"), dataclasses.replace(FACTS, ses_dkim_tokens=()))
        assert not [r for r in rs if "amazonses" in r.value or r.key.startswith("ses-")]
        spf_value = next(r.value for r in rs if r.key == "spf")
        assert spf_value == " ".join(p for p in ("v=spf1 mx", include, "~all") if p)


def test_which_records_exist_depends_on_settings_only() -> None:
    settings = settings_for()
    keys = [(r.key, r.type, r.ttl) for r in records(settings, FACTS)]
    assert keys == [(r.key, r.type, r.ttl) for r in records(settings, Facts.placeholder(settings))]
    assert len({r.key for r in records(settings, FACTS)}) == len(keys)


def test_txt_strings_are_at_most_255_bytes_and_rejoin_to_the_value() -> None:
    long_key = dkim_public_key_body(_public_pem())
    for r in records(settings_for(), Facts("203.0.113.10", "2001:db8::1", long_key, ())):
        if r.type == "TXT":
            assert all(0 < len(s.encode()) <= TXT_CHUNK for s in r.txt_strings())
            assert "".join(r.txt_strings()) == r.value
    dkim_record = next(
        r for r in records(settings_for(), Facts("203.0.113.10", "::1", long_key, ())) if r.key == "dkim"
    )
    assert len(dkim_record.txt_strings()) == 2


def _public_pem() -> str:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(dkim_private_key_pem().encode(), None)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def test_dkim_record_parses_with_dkimpy_and_holds_the_public_key() -> None:
    pem = _public_pem()
    record = next(
        r
        for r in records(settings_for(), Facts("203.0.113.10", "::1", dkim_public_key_body(pem), ()))
        if r.key == "dkim"
    )
    tags = dkim.util.parse_tag_value(record.value.encode())
    assert tags[b"v"] == b"DKIM1" and tags[b"k"] == b"rsa"
    key = dkim.crypto.parse_public_key(base64.b64decode(tags[b"p"]))
    assert key["modulus"].bit_length() == 2048


@pytest.mark.parametrize("stack", ["dev", "prod"])
def test_dmarc_record_parses_with_checkdmarc(stack: str) -> None:
    settings = settings_for(stack)
    record = next(r for r in records(settings, FACTS) if r.key == "dmarc")
    parsed = checkdmarc.dmarc.parse_dmarc_record(record.value, settings.domain, nameservers=["127.0.0.1"], timeout=0.1)
    tags = parsed["tags"]
    assert tags["p"]["value"] == settings.dmarc_policy.value
    assert tags["rua"]["value"][0]["address"] == settings.dmarc_report_address


@pytest.fixture
def zone_dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[tuple[str, str], list[Any]]]:
    """pyspf asks this table instead of the network: our records plus SES's published SPF."""
    answers: dict[tuple[str, str], list[Any]] = {
        ("amazonses.com", "TXT"): [(b"v=spf1 ip4:199.255.192.0/22 ip4:54.240.0.0/18 -all",)],
    }
    for r in records(settings_for(), FACTS):
        name = r.name.rstrip(".")
        if r.type == "TXT":
            answers.setdefault((name, "TXT"), []).append(tuple(s.encode() for s in r.txt_strings()))
        elif r.type in ("A", "AAAA"):
            answers.setdefault((name, r.type), []).append(r.value)
        elif r.type == "MX":
            answers.setdefault((name, "MX"), []).append((r.priority, r.value))

    def lookup(name: str, qtype: str, *args: Any, **kwargs: Any) -> list[Any]:
        return [((name, qtype), data) for data in answers.get((name.rstrip("."), qtype), [])]

    monkeypatch.setattr(spf, "DNSLookup", lookup)
    yield answers


@pytest.mark.parametrize(
    ("client", "sender_domain", "result"),
    [
        ("203.0.113.10", "example.net", "pass"),  # the server itself (mx)
        ("2001:db8:10::10", "example.net", "pass"),
        ("54.240.0.7", "example.net", "pass"),  # SES, through the include
        ("54.240.0.7", "bounce.example.net", "pass"),  # SES's MAIL FROM domain
        ("198.51.100.99", "example.net", "softfail"),  # anyone else
    ],
)
def test_spf_evaluates_as_receivers_will(zone_dns: Any, client: str, sender_domain: str, result: str) -> None:
    outcome, _ = spf.check2(i=client, s=f"someone@{sender_domain}", h="sender.example")
    assert outcome == result


def test_zone_file_loads_in_dnspython_with_every_record() -> None:
    settings = settings_for("prod")
    text = zone_file(settings, FACTS)
    zone = dns.zone.from_text(text, origin=settings.domain, relativize=False, check_origin=False)
    loaded = sum(len(rdataset) for _, node in zone.nodes.items() for rdataset in node.rdatasets)
    assert loaded == len(records(settings, FACTS))
    mx = zone.find_rdataset(f"{settings.domain}.", "MX")
    assert [str(r.exchange) for r in mx] == [f"{settings.host_name}."]


@pytest.mark.parametrize(
    ("stack", "policy"),
    [
        ("dev", "version: STSv1\nmode: testing\nmx: mail.example.net\nmax_age: 86400\n"),
        ("prod", "version: STSv1\nmode: enforce\nmx: mx1.example.org\nmax_age: 604800\n"),
    ],
)
def test_the_mta_sts_policy_is_the_rfc_8461_text_for_the_stack(stack: str, policy: str) -> None:
    # RFC 8461 §3.2: version, mode, one mx line per MX host, max_age in seconds; CRLF or LF lines.
    assert mta_sts_policy(parse_settings(stack_config(stack, {}))) == policy


def test_mta_sts_id_changes_exactly_when_the_policy_changes() -> None:
    testing, enforce = settings_for(), settings_for(mtaStsMode="enforce")
    assert mta_sts_policy(testing) != mta_sts_policy(enforce)
    assert mta_sts_id(testing) != mta_sts_id(enforce)
    assert mta_sts_id(testing) == mta_sts_id(settings_for(webmail=True))  # unrelated setting
    assert "mode: enforce\n" in mta_sts_policy(enforce)
    assert f"mx: {enforce.host_name}\n" in mta_sts_policy(enforce)


def test_the_caa_record_allows_the_ca_the_certificate_comes_from() -> None:
    def issuer(**overrides: Any) -> str:
        return next(r.rdata() for r in records(settings_for(**overrides), FACTS) if r.key == "caa-issue")

    assert issuer() == '0 issue "letsencrypt.org"'
    other = {"acmeServer": "https://acme.sectigo.com/v2/DV", "caaIssuer": "sectigo.com"}
    assert issuer(**other) == '0 issue "sectigo.com"'
