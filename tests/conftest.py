"""Shared fixtures: the program evaluated offline once per stack and settings, then reused."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from infra.offline import OfflineRun, run_program

_RUNS: dict[str, OfflineRun] = {}


def offline_run(stack: str = "dev", **overrides: Any) -> OfflineRun:
    """The program for a stack (plus overrides) evaluated under mocks; cached for the session."""
    key = json.dumps([stack, overrides], sort_keys=True)
    if key not in _RUNS:
        _RUNS[key] = run_program(stack, overrides)
    return _RUNS[key]


@pytest.fixture
def offline() -> Callable[..., OfflineRun]:
    return offline_run
