"""The tiers: the pure core imports no Pulumi, no provider SDK and nothing of the shell, the tools
or the lab; and the repository's text speaks of the project, not of the tracker's numbering."""

from __future__ import annotations

import json
import pkgutil
import re
import subprocess
import sys

import pytest

import infra.core
from infra.core.facts import PROJECT_DIR

CORE_MODULES = sorted(m.name for m in pkgutil.iter_modules(infra.core.__path__, "infra.core."))
# What the core must never pull in, directly or through another module.
FORBIDDEN = re.compile(r"^(pulumi($|[._])|infra\.(cloud|tools|lab)($|\.))")


def imported_by(module: str) -> list[str]:
    """Every module a fresh interpreter holds after importing MODULE."""
    probe = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    completed = subprocess.run(
        [sys.executable, "-c", probe], cwd=PROJECT_DIR, capture_output=True, text=True, check=True, timeout=60
    )
    loaded: list[str] = json.loads(completed.stdout)
    return loaded


def test_the_core_has_modules_to_check() -> None:
    assert {"infra.core.settings", "infra.core.modes", "infra.core.render", "infra.core.dns"} <= set(CORE_MODULES)


@pytest.mark.parametrize("module", CORE_MODULES)
def test_a_core_module_imports_no_pulumi_sdk_and_no_outer_tier(module: str) -> None:
    leaked = [m for m in imported_by(module) if FORBIDDEN.match(m)]
    assert not leaked, f"{module} pulls in {leaked}: the core must stay pure (see docs/ARCHITECTURE.md)"


def test_the_check_notices_a_forbidden_import() -> None:
    """The probe itself: a module of the shell does load Pulumi, and the pattern sees it."""
    assert any(FORBIDDEN.match(m) for m in imported_by("infra.cloud.provisioning"))


# Numbering from the tracker (an issue's or a case's number) says nothing to a reader.
TRACKER_TEXT = re.compile(r"\bissue ?#?\d+|\bcases? \d+|\bthe issue's\b", re.IGNORECASE)
TEXT_SUFFIXES = {".py", ".md", ".j2", ".yml", ".yaml", ".toml", ".txt", ".sh", ".cfg", ""}


def tracked_text_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files"], cwd=PROJECT_DIR, capture_output=True, text=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the repository's files cannot be listed")
    names = [n for n in listed.stdout.splitlines() if not n.startswith("bench/results/")]
    return [n for n in names if (PROJECT_DIR / n).suffix in TEXT_SUFFIXES and (PROJECT_DIR / n).is_file()]


def test_no_tracker_numbering_in_code_templates_tests_or_docs() -> None:
    found = [
        f"{name}:{number}: {line.strip()}"
        for name in tracked_text_files()
        for number, line in enumerate((PROJECT_DIR / name).read_text(errors="replace").splitlines(), 1)
        if TRACKER_TEXT.search(line)
    ]
    assert not found, "say what it is, not its number:\n" + "\n".join(found)


def test_the_numbering_pattern_matches_what_it_must() -> None:
    # Built from parts, so that this file's own text holds no numbering.
    for word, rest in (("issue", " 7"), ("cases", " 1-7"), ("Case", " 12: secrets"), ("issue", " #3")):
        assert TRACKER_TEXT.search(f"Benchmarks ({word}{rest})"), word + rest
    assert TRACKER_TEXT.search("the " + "issue's floor")
    for text in ("a known issue with Dovecot", "in case the relay is down", "issues 'STARTTLS'"):
        assert not TRACKER_TEXT.search(text), text
