"""When to try a failed action again, and when to give up: a pure policy.

Exponential backoff with "equal jitter" (half the delay fixed, half random),
so a fleet of jobs that failed together does not retry in lockstep; given up
once the action has been failing for longer than the retry window (SES: four
hours), and at once for a permanent failure.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    window: float = 4 * 3600.0
    initial_delay: float = 1.0
    max_delay: float = 600.0

    def delay(self, attempts: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after the `attempts`-th failure (1, 2, ...)."""
        # The exponent is capped: past ~1024 failures (a long window, a short max_delay)
        # 2.0 ** n would overflow, and the failure could not be recorded at all.
        base = min(self.max_delay, self.initial_delay * 2.0 ** min(max(0, attempts - 1), 64))
        return base / 2 + rand() * base / 2

    def gives_up(self, first_failure: float, now: float, *, permanent: bool = False) -> bool:
        return permanent or now - first_failure >= self.window
