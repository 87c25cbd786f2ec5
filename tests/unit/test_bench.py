"""The benchmarks run at tiny size, so that they cannot rot; their figures are never asserted.

The mail stack's (bench.mailstack) run against the session's lab hosts, one per spam filter
mode, instead of booting their own; they are here, after tests/lab and tests/reliability in
pytest's order, because one of them switches the spam filter (and back)."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import floor, mailstack
from infra.core.facts import PROJECT_DIR
from infra.lab import control
from infra.lab.control import LabInfo

REPO = PROJECT_DIR


def test_program_benchmark_quick(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(REPO / "bench" / "program.py"), "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr

    dated = list(tmp_path.glob("*-program.json"))
    assert len(dated) == 1
    latest = json.loads((tmp_path / "latest.json").read_text())
    assert json.loads(dated[0].read_text()) == {"machine": latest["machine"], "program": latest["program"]}

    machine = latest["machine"]
    assert {"platform", "python", "cpu_model", "cpu_count", "memory_mib", "date"} <= machine.keys()

    program = latest["program"]
    imports = program["import_s"]
    assert {
        "pulumi",
        "pulumi_digitalocean",
        "pulumi_aws",
        "pulumi_cloudflare",
        "pulumi_command",
        "pulumi_tls",
        "pulumi_random",
        "infra.cloud.program",
        "total",
    } <= imports.keys()
    for figure in imports.values():
        assert figure["min"] > 0 and figure["median"] > 0
    for stack in ("dev", "prod"):
        assert program["evaluate_s"][stack]["min"] > 0
        assert program["evaluate_s"][stack]["median"] > 0
        assert program["resources"][stack] > 40
    assert program["peak_rss_mib"] > 0


def test_latest_keeps_other_benchmarks(tmp_path: Path) -> None:
    from bench.program import record

    (tmp_path / "latest.json").write_text(json.dumps({"rspamd": {"pss_mib": 1.0}, "program": {"old": True}}))
    record(tmp_path, {"new": True}, dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC))
    latest = json.loads((tmp_path / "latest.json").read_text())
    assert latest["rspamd"] == {"pss_mib": 1.0}
    assert latest["program"] == {"new": True}
    assert (tmp_path / "20260102T030405Z-program.json").exists()


def test_a_mail_stack_run_sets_its_keys_and_keeps_the_programs(tmp_path: Path) -> None:
    from bench.program import record

    (tmp_path / "latest.json").write_text(json.dumps({"program": {"kept": True}, "rspamd": {"pss_mib": 1.0}}))
    figures = {"rspamd": {"pss_mib": 190.123456789, "throughput": [{"lost": 0, "rate": 1.23456789}]}, "floor": {}}
    record(tmp_path, figures, dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC), name="mailstack")
    latest = json.loads((tmp_path / "latest.json").read_text())
    assert latest["program"] == {"kept": True}
    assert latest["rspamd"] == {"pss_mib": 190.123457, "throughput": [{"lost": 0, "rate": 1.234568}]}
    dated = json.loads((tmp_path / "20260102T030405Z-mailstack.json").read_text())
    assert dated.keys() == {"machine", "rspamd", "floor"}


# --- the mail stack on the lab -------------------------------------------------------------------


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
    before = control.guest("sudo md5sum /etc/postfix/main.cf", lab).stdout
    seen: dict[str, Any] = {}

    def measure() -> dict[str, Any]:
        seen["milters"] = control.guest("/usr/sbin/postconf -h smtpd_milters", lab).stdout.strip()
        return mailstack.inbound_latency(lab, 2, seed=3)

    figures = mailstack.without_milters(lab, measure)
    assert seen["milters"] == "" and figures["visible_ms"]["n"] == 2
    assert control.guest("sudo md5sum /etc/postfix/main.cf", lab).stdout == before
    assert control.guest("/usr/sbin/postconf -h smtpd_milters", lab).stdout.strip() != ""


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
        control.redeploy()  # back to the session's mode
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
