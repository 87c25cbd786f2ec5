"""Autoconfig: the document mail clients fetch to set themselves up names the mail host and its
IMAPS and submission ports."""

from __future__ import annotations

from infra.lab import state
from tests.support.lab import LAB_MARKS
from tests.support.web import https_get

pytestmark = LAB_MARKS


def test_autoconfig_names_the_host_and_its_ports(lab: state.LabInfo) -> None:
    import xml.etree.ElementTree as ET

    status, body = https_get("autoconfig.example.net", "/mail/config-v1.1.xml")
    assert status == 200
    document = ET.fromstring(body)  # noqa: S314 - our own server's answer, in the lab
    servers = {(s.findtext("hostname"), s.findtext("port")) for s in document.iter() if s.tag.endswith("Server")}
    assert servers == {("mail.example.net", "993"), ("mail.example.net", "465"), ("mail.example.net", "587")}
