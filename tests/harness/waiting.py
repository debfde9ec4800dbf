"""Polling for a condition with a deadline, for tests that watch real processes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 30,
               interval: float = 0.05) -> Any:
    """Return the predicate's first true value; TimeoutError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(interval)
