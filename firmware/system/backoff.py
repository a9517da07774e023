"""The one backoff helper: capped exponential delays with jitter, for every retry loop in the tree.

Used by the sensor reopen (hw), the MQTT adapter's reconnect, the relay's resend timer, the claim,
the control plane, the ingest and the daemon's supervisor. "Equal jitter": half of each delay is
fixed, half random, so a delay is never 0 (no busy loop) and never above the cap, and a fleet of kits
that lost the broker together does not come back in step.

This module imports nothing from the tree: `hw` may use it.
"""

from __future__ import annotations

import random
import time


def backoff_delay(attempt: int, lo: float, hi: float, rng: random.Random | None = None,
                  spread: float = 0.5) -> float:
    """The delay before retry number `attempt` (0 first): ``cap = min(hi, lo * 2**attempt)``, of which the
    share `spread` is random: between ``cap * (1 - spread)`` and `cap` (0.5, the default, is equal jitter)."""
    cap = min(hi, lo * (2 ** min(max(attempt, 0), 30)))
    return cap * (1 - spread) + (rng or random).uniform(0, cap * spread)


class Backoff:
    """Delays for one retry loop: `next()` after a failure, `reset()` after a success.

    ``ready()``/``wait_s()`` let a caller that polls (rather than sleeps) honour the schedule.
    """

    def __init__(self, lo: float, hi: float, rng: random.Random | None = None,
                 clock: object = time.monotonic) -> None:
        if not 0 < lo <= hi:
            raise ValueError(f"backoff needs 0 < lo <= hi, got lo={lo} hi={hi}")
        self.lo, self.hi = lo, hi
        self.rng = rng
        self._clock = clock
        self.failures = 0
        self._not_before = 0.0

    def next(self) -> float:
        """Record a failure; return how long to wait before the next attempt."""
        delay = backoff_delay(self.failures, self.lo, self.hi, self.rng)
        self.failures += 1
        self._not_before = self._clock() + delay  # type: ignore[operator]
        return delay

    def reset(self) -> None:
        """Record a success: the next failure waits `lo` again."""
        self.failures = 0
        self._not_before = 0.0

    def ready(self) -> bool:
        """True when the delay after the last failure has passed (always after `reset()`)."""
        return self._clock() >= self._not_before  # type: ignore[operator]

    def wait_s(self) -> float:
        """Seconds left before the next attempt is due (0 when ready)."""
        return max(0.0, self._not_before - self._clock())  # type: ignore[operator]
