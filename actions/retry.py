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

from mxrules.configschema import default
from mxrules.settings import WorkerSettings


@dataclass(frozen=True)
class RetryPolicy:
    window: float = default("worker.retry_window")
    initial_delay: float = default("worker.retry_initial_delay")
    max_delay: float = default("worker.retry_max_delay")

    @classmethod
    def of(cls, settings: WorkerSettings) -> RetryPolicy:
        return cls(settings.retry_window, settings.retry_initial_delay, settings.retry_max_delay)

    def delay(self, attempts: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after the `attempts`-th failure (1, 2, ...)."""
        # The exponent is capped: past ~1024 failures (a long window, a short max_delay)
        # 2.0 ** n would overflow, and the failure could not be recorded at all.
        base = min(self.max_delay, self.initial_delay * 2.0 ** min(max(0, attempts - 1), 64))
        return base / 2 + rand() * base / 2

    def gives_up(self, first_failure: float, now: float, *, permanent: bool = False) -> bool:
        return permanent or now - first_failure >= self.window
