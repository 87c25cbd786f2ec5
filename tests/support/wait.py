"""One way to wait in a test: poll a predicate until it holds, or fail saying what never came."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, interval: float, what: str) -> T:
    """PREDICATE's first truthy value, asked for every INTERVAL seconds for up to TIMEOUT seconds
    (and once more at the end). Otherwise an AssertionError naming WHAT and the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s (last seen: {value!r})")
        time.sleep(interval)
