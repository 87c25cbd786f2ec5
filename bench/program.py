"""Benchmark of the program's import time and its evaluation time under mocks.

Two measurements, each in fresh interpreters (`sys.executable -c ...`), so Python's module
cache is cold on every run (the operating system's file cache is not: files are read warm):

- imports: one fresh process per run imports pulumi, then each provider SDK (with the lazily
  loaded submodules the program uses), then `infra.cloud.program`, then the mock harness
  `infra.tools.rehearsal`, timing each apart: an entry's time is what it adds on top of the entries
  before it (pulumi's own dependencies are counted under pulumi). "total" is their sum.
- evaluation: one fresh process does those imports first (untimed), then calls
  `infra.tools.rehearsal.run_program(stack)` N times per stack, dev then prod, and reports min/median
  of the calls. The first call of each stack is also given apart: it generates the stand-in
  keys (RSA, Ed25519) that later calls reuse, as Pulumi state would, and warms caches.
  The process's peak RSS and the number of resources declared are recorded too.

Both report the time spent in Python's garbage collector (`import_gc_s`, `evaluate_gc`): with
the SDKs loaded the process tracks ~400,000 objects, so each full collection costs a few
tenths of a second and lands in whichever import or call happens to trigger it. That is why
the per-entry import times and the evaluation medians move from run to run; the import total
and the evaluation minimum are the steadier figures.

Run: `.venv/bin/python -m bench.program [--runs N] [--quick] [--out DIR]`. Each run writes
`<out>/<UTC date-time>-program.json` and sets the key "program" (and "machine") of
`<out>/latest.json`, keeping its other keys. No figure is checked against a target here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results"


def bench_parser(module: str, doc: str | None, quick: str) -> argparse.ArgumentParser:
    """A benchmark's command line: its own options are added to --quick (QUICK says what it runs)
    and --out, which every benchmark takes."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{module}", description=(doc or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory (default bench/results)")
    return parser


STACKS = ("dev", "prod")
# What the program imports, in this order; each entry's time excludes the entries before it.
# The provider SDKs load their submodules lazily, on first attribute access: the submodules the
# program uses are listed and loaded here, so that evaluation is timed without them. The
# evaluating process reports how many modules its first call still loaded, should this go stale.
IMPORTS: dict[str, tuple[str, ...]] = {
    "pulumi": ("pulumi",),
    "pulumi_digitalocean": ("pulumi_digitalocean",),
    "pulumi_aws": ("pulumi_aws", "pulumi_aws.iam", "pulumi_aws.sesv2", "pulumi_aws.sns"),
    "pulumi_cloudflare": ("pulumi_cloudflare",),
    "pulumi_command": ("pulumi_command", "pulumi_command.remote"),
    "pulumi_tls": ("pulumi_tls",),
    "pulumi_random": ("pulumi_random",),
    "infra.cloud.program": ("infra.cloud.program", "infra.cloud.zone"),  # infra.cloud.zone: imported by program.build()
    "infra.tools.rehearsal": ("infra.tools.rehearsal",),  # the mock harness, not the program
}
_PROBE = "__mailroom_bench_probe__"  # an attribute no module has: asking for it loads a lazy module

# Run in a fresh interpreter: argv is name=module,module,...; prints {name: seconds} as JSON.
# Also prints the seconds spent in the garbage collector meanwhile, under "gc".
_IMPORT_CHILD = f"""
import gc, importlib, json, sys, time
times = {{}}
gc_start = [0.0, 0.0]
def on_gc(phase, info):
    if phase == "start":
        gc_start[0] = time.perf_counter()
    else:
        gc_start[1] += time.perf_counter() - gc_start[0]
gc.callbacks.append(on_gc)
for arg in sys.argv[1:]:
    name, _, modules = arg.partition("=")
    start = time.perf_counter()
    for module in modules.split(","):
        hasattr(importlib.import_module(module), {_PROBE!r})
    times[name] = time.perf_counter() - start
times["gc"] = gc_start[1]
print(json.dumps(times))
"""


def _import_args() -> list[str]:
    return [f"{name}={','.join(modules)}" for name, modules in IMPORTS.items()]


def _child(code: str, *args: str) -> str:
    """Run Python code in a fresh interpreter at the repository's root; its stdout, or an error."""
    completed = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({completed.returncode}):\n{completed.stderr}")
    return completed.stdout


def _summary(samples: list[float]) -> dict[str, float]:
    return {"min": min(samples), "median": statistics.median(samples)}


class GcTimer:
    """Counts the garbage collector's passes and the time they take, while installed."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.full_collections = 0
        self.full_seconds = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        self.seconds += took
        if info["generation"] == 2:
            self.full_collections += 1
            self.full_seconds += took


def measure_imports(runs: int) -> dict[str, Any]:
    """Per entry (and in total), min and median import seconds over `runs` fresh processes."""
    samples: dict[str, list[float]] = {name: [] for name in (*IMPORTS, "total")}
    gc_samples: list[float] = []
    for _ in range(runs):
        stdout = _child(_IMPORT_CHILD, *_import_args())
        times: dict[str, float] = json.loads(stdout.strip().splitlines()[-1])
        for name in IMPORTS:
            samples[name].append(times[name])
        samples["total"].append(sum(times[name] for name in IMPORTS))
        gc_samples.append(times["gc"])
    return {
        "import_s": {name: _summary(values) for name, values in samples.items()},
        "import_gc_s": _summary(gc_samples),
    }


def evaluate_worker(runs: int, out: str) -> None:
    """In the evaluating process: time run_program per stack, write the figures to `out`."""
    for modules in IMPORTS.values():  # imported ahead, so that the calls time evaluation only
        for module in modules:
            hasattr(importlib.import_module(module), _PROBE)
    from infra.tools.rehearsal import run_program

    calls: dict[str, list[float]] = {}
    resources: dict[str, int] = {}
    before = len(sys.modules)
    gc_timer = GcTimer()
    gc.callbacks.append(gc_timer)
    for stack in STACKS:
        calls[stack] = []
        for _ in range(runs):
            start = time.perf_counter()
            run = run_program(stack)
            calls[stack].append(time.perf_counter() - start)
            resources[stack] = len(run.resources)
    gc.callbacks.remove(gc_timer)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    figures = {
        "calls": calls,
        "resources": resources,
        "peak_rss_mib": peak_kib / 1024,
        "modules_loaded_while_evaluating": len(sys.modules) - before,
        "gc": {
            "seconds": gc_timer.seconds,
            "full_collections": gc_timer.full_collections,
            "full_seconds": gc_timer.full_seconds,
            "objects_tracked": len(gc.get_objects()),
        },
    }
    Path(out).write_text(json.dumps(figures))


def measure_evaluation(runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "evaluation.json"
        code = "import sys\nfrom bench.program import evaluate_worker\nevaluate_worker(int(sys.argv[1]), sys.argv[2])"
        _child(code, str(runs), str(out))
        figures: dict[str, Any] = json.loads(out.read_text())
    calls: dict[str, list[float]] = figures["calls"]
    return {
        "evaluate_s": {stack: _summary(samples) for stack, samples in calls.items()},
        "first_evaluate_s": {stack: samples[0] for stack, samples in calls.items()},
        "resources": figures["resources"],
        "peak_rss_mib": round(figures["peak_rss_mib"], 1),
        "modules_loaded_while_evaluating": figures["modules_loaded_while_evaluating"],
        "evaluate_gc": figures["gc"],
    }


def _proc_field(path: str, key: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key:
                return value.strip()
    except OSError:
        pass
    return "unknown"


def machine(now: dt.datetime) -> dict[str, Any]:
    """What the figures were measured on."""
    mem_kib = _proc_field("/proc/meminfo", "MemTotal").removesuffix(" kB")
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _proc_field("/proc/cpuinfo", "model name"),
        "cpu_count": os.cpu_count(),
        "memory_mib": int(mem_kib) // 1024 if mem_kib.isdigit() else None,
        "date": now.isoformat(timespec="seconds"),
    }


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def record(out_dir: Path, figures: dict[str, Any], now: dt.datetime, name: str = "program") -> Path:
    """Write this run's file and merge its figures into latest.json (other keys kept).

    For the program benchmark FIGURES is its figures, kept under "program"; for another
    benchmark NAME it maps latest.json's keys (e.g. "rspamd", "floor") to their figures."""
    out_dir.mkdir(parents=True, exist_ok=True)
    about = machine(now)
    entries = {"program": figures} if name == "program" else figures
    dated = out_dir / f"{now.strftime('%Y%m%dT%H%M%SZ')}-{name}.json"
    dated.write_text(json.dumps({"machine": about, **_rounded(entries)}, indent=2) + "\n")
    latest_path = out_dir / "latest.json"
    latest: dict[str, Any] = json.loads(latest_path.read_text()) if latest_path.exists() else {}
    latest["machine"] = about
    latest.update(_rounded(entries))
    latest_path.write_text(json.dumps(latest, indent=2) + "\n")
    return dated


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("program", __doc__, "one run of each, for the smoke test")
    parser.add_argument("--runs", type=int, default=5, help="runs per measurement (default 5)")
    args = parser.parse_args(argv)
    runs = 1 if args.quick else args.runs
    if runs < 1:
        parser.error("--runs must be at least 1")

    now = dt.datetime.now(dt.UTC)
    figures = {"runs": runs, **measure_imports(runs), **measure_evaluation(runs)}
    figures = _rounded(figures)
    dated = record(args.out, figures, now)
    print(json.dumps(figures, indent=2))
    print(f"written: {dated}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
