"""The program's benchmark (bench.program) and the results file's bookkeeping, offline; their
figures are never asserted. The mail stack's run on the lab: tests/lab/benchmarks."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

from infra.core.facts import PROJECT_DIR

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
