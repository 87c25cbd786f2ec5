"""The mail stack's benchmarks (bench.mailstack, bench.floor) at tiny size, so they cannot rot.

They run against the session's lab host (one per spam filter mode) instead of booting their
own; the figures are never asserted, only that each benchmark produces them, sensibly shaped,
and loses no mail.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest

from bench import floor, mailstack
from infra.lab import control
from infra.lab.control import LabInfo

pytestmark = [pytest.mark.lab]


def test_memory_is_measured_for_every_daemon_of_the_mode(lab: LabInfo) -> None:
    figures = mailstack.memory(mailstack.probe(lab))
    daemons = figures["daemons"]
    expected = {"postfix", "dovecot", "unbound", "nginx", "fail2ban"} | (
        {"rspamd", "redis-server"} if lab.overrides.get("spamFilter") == "rspamd" else {"spamd", "opendkim"}
    )
    assert expected <= daemons.keys()
    assert all(d["pss_mib"] > 0 and d["rss_mib"] >= d["pss_mib"] for d in daemons.values())
    assert figures["total_pss_mib"] == pytest.approx(sum(d["pss_mib"] for d in daemons.values()))


def test_inbound_latency_and_throughput_count_every_message(lab: LabInfo) -> None:
    mailstack.warm_up(lab)
    latency = mailstack.inbound_latency(lab, 3)
    assert latency["visible_ms"]["n"] == 3
    assert latency["visible_ms"]["p50"] >= latency["smtp_ms"]["p50"] > 0
    level = mailstack.throughput(lab, 2, 6)
    assert level["smtp_source_exit"] == 0 and level["lost"] == 0
    assert level["delivered_msgs_per_s"] > 0 and level["host_cpu_ms_per_msg"] > 0


def test_submission_reaches_the_relay_signed(lab: LabInfo) -> None:
    figures = mailstack.submission(lab, 3)
    assert figures["relayed_ms"]["n"] == 3 and figures["dkim_signed"] == 3


def test_no_filter_comparison_restores_main_cf(lab: LabInfo) -> None:
    before = control.guest("sudo md5sum /etc/postfix/main.cf", lab).stdout
    seen: dict[str, Any] = {}

    def measure() -> dict[str, Any]:
        seen["milters"] = control.guest("/usr/sbin/postconf -h smtpd_milters", lab).stdout.strip()
        return mailstack.inbound_latency(lab, 2, seed=3)

    figures = mailstack.without_milters(lab, measure)
    assert seen["milters"] == "" and figures["visible_ms"]["n"] == 2
    assert control.guest("sudo md5sum /etc/postfix/main.cf", lab).stdout == before
    assert control.guest("/usr/sbin/postconf -h smtpd_milters", lab).stdout.strip() != ""


def test_convergence_reloads_nothing_without_a_change_and_only_postfix_for_one_line(lab: LabInfo) -> None:
    figures = mailstack.convergence(lab, switch_to=None)
    assert figures["no_change"]["reloaded"] == [] and figures["no_change"]["changed"] == []
    assert "postfix" in figures["one_postfix_line"]["reloaded"]
    assert "/etc/postfix/main.cf" in figures["one_postfix_line"]["changed"]


def test_a_spam_filter_switch_under_load_loses_nothing(lab: LabInfo) -> None:
    if lab.overrides.get("spamFilter") == "rspamd":
        pytest.skip("the switch is measured once, from SpamAssassin to rspamd (and back)")
    try:
        figures = mailstack.switch_under_load(lab, "rspamd")
    finally:
        control.redeploy()  # back to the session's mode
    assert figures["lost"] == 0 and figures["stored_twice"] == 0
    assert "rspamd" in figures["installed"] and "spamd" in figures["removed_packages"]
    assert "250" in figures["replies"]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("smtp-source") is None,
                    reason="the floor needs root (a network namespace) and Postfix's smtp-source")  # fmt: skip
def test_the_floor_delivers_every_message_at_every_level() -> None:
    figures = floor.measure(5)
    assert [level["sessions"] for level in figures["throughput"]] == list(floor.SESSIONS)
    assert all(level["lost"] == 0 and level["delivered_msgs_per_s"] > 0 for level in figures["throughput"])
