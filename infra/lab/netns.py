"""Code that must run inside one of the lab's network namespaces."""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def call_in(netns: str, fn: Callable[[], T]) -> T:
    """Run FN in a thread that joined the namespace: the sockets it opens live there."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    box: dict[str, Any] = {}

    def target() -> None:
        with Path(f"/run/netns/{netns}").open() as handle:
            if libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                box["error"] = OSError(ctypes.get_errno(), f"setns {netns}")
                return
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value
