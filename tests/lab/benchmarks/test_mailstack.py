"""The mail stack's benchmarks (bench.mailstack) and the floor (bench.floor) at tiny size, so that
they cannot rot; their figures are never asserted. They run against the session's lab hosts, one
per spam filter mode, instead of booting their own, and last (tests/conftest.py LAB_ORDER),
because one of them switches the spam filter (and back)."""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest

from bench import backup, floor, mailstack
from infra.lab import deploy, host
from infra.lab.state import LabInfo
from tests.support.lab import main_cf_sum


@pytest.mark.lab
def test_memory_is_measured_for_every_daemon_of_the_mode(lab: LabInfo) -> None:
    figures = mailstack.memory(mailstack.probe(lab))
    daemons = figures["daemons"]
    expected = {"postfix", "dovecot", "unbound", "nginx", "fail2ban"} | (
        {"rspamd", "redis-server"} if lab.overrides.get("spamFilter") == "rspamd" else {"spamd", "opendkim"}
    )
    assert expected <= daemons.keys()
    assert all(d["pss_mib"] > 0 and d["rss_mib"] >= d["pss_mib"] for d in daemons.values())
    assert figures["total_pss_mib"] == pytest.approx(sum(d["pss_mib"] for d in daemons.values()))


@pytest.mark.lab
def test_inbound_latency_and_throughput_count_every_message(lab: LabInfo) -> None:
    mailstack.warm_up(lab)
    latency = mailstack.inbound_latency(lab, 3)
    assert latency["visible_ms"]["n"] == 3
    assert latency["visible_ms"]["p50"] >= latency["smtp_ms"]["p50"] > 0
    profile = mailstack.filter_profile(lab, lab.overrides.get("spamFilter", "spamassassin"), 3)
    assert profile["scan_ms"]["n"] == 3
    level = mailstack.throughput(lab, 2, 6)
    assert level["smtp_source_exit"] == 0 and level["lost"] == 0
    assert level["delivered_msgs_per_s"] > 0 and level["host_cpu_ms_per_msg"] > 0


@pytest.mark.lab
def test_submission_reaches_the_relay_signed(lab: LabInfo) -> None:
    figures = mailstack.submission(lab, 3)
    assert figures["relayed_ms"]["n"] == 3 and figures["dkim_signed"] == 3


@pytest.mark.lab
def test_no_filter_comparison_restores_main_cf(lab: LabInfo) -> None:
    before = main_cf_sum(lab)
    seen: dict[str, Any] = {}

    def measure() -> dict[str, Any]:
        seen["milters"] = host.guest("/usr/sbin/postconf -h smtpd_milters", lab).stdout.strip()
        return mailstack.inbound_latency(lab, 2, seed=3)

    figures = mailstack.without_milters(lab, measure)
    assert seen["milters"] == "" and figures["visible_ms"]["n"] == 2
    assert main_cf_sum(lab) == before
    assert host.guest("/usr/sbin/postconf -h smtpd_milters", lab).stdout.strip() != ""


@pytest.mark.lab
def test_convergence_reloads_nothing_without_a_change_and_only_postfix_for_one_line(lab: LabInfo) -> None:
    figures = mailstack.convergence(lab, switch_to=None)
    assert figures["no_change"]["reloaded"] == [] and figures["no_change"]["changed"] == []
    assert figures["one_postfix_line"]["reloaded"] == ["postfix"]
    assert set(figures["one_postfix_line"]["changed"]) <= {"/etc/postfix/virtual_aliases", "/etc/postfix/sender_logins"}
    assert "/etc/postfix/virtual_aliases" in figures["one_postfix_line"]["changed"]


@pytest.mark.lab
def test_a_spam_filter_switch_under_load_loses_nothing(lab: LabInfo) -> None:
    if lab.overrides.get("spamFilter") == "rspamd":
        pytest.skip("the switch is measured once, from SpamAssassin to rspamd (and back)")
    try:
        figures = mailstack.switch_under_load(lab, "rspamd")
    finally:
        deploy.redeploy()  # back to the session's mode
    assert figures["lost"] == 0 and figures["stored_twice"] == 0
    assert "rspamd" in figures["installed"] and "spamd" in figures["removed_packages"]
    # The new filter answers on its socket before Postfix's new main.cf is in place: mail is
    # accepted throughout the switch.
    assert set(figures["replies"]) == {"250"}, figures["replies"]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("smtp-source") is None,
                    reason="the floor needs root (a network namespace) and Postfix's smtp-source")  # fmt: skip
def test_the_floor_delivers_every_message_at_every_level() -> None:
    figures = floor.measure(5)
    assert [level["sessions"] for level in figures["throughput"]] == list(floor.SESSIONS)
    assert all(level["lost"] == 0 and level["delivered_msgs_per_s"] > 0 for level in figures["throughput"])


@pytest.mark.lab
def test_the_backup_benchmark_gets_every_message_back(lab: LabInfo) -> None:
    figures = backup.measure(lab, 3)
    back = figures["restore"]
    assert back["messages_back"] == back["messages_before"] >= 3
    assert figures["first_run"]["peak_rss_mib"] > 0 and figures["first_run"]["files"] > 0
    assert figures["list"]["snapshots"] >= 1 and figures["list"]["repository_stored_mb"] > 0
