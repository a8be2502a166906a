"""Exponential reconnect backoff with "full jitter" (AWS Architecture Blog, "Exponential Backoff And Jitter").

sleep = uniform(0, min(cap, base * 2**attempt)); `Backoff.slow()` is the same with a long cap, for when the
broker or EST server rejected our certificate (revoked/expired) and retrying fast would only add load.
"""

from __future__ import annotations

import math
import random

SLOW_BASE = 30.0
SLOW_CAP = 15 * 60.0


class Backoff:
    """Delays for consecutive failures: `next()` after each failure, `reset()` after a success."""

    def __init__(self, base: float = 0.5, cap: float = 60.0, rng: random.Random | None = None) -> None:
        if not (math.isfinite(base) and base > 0):
            raise ValueError(f"base must be a positive number of seconds, not {base!r}")
        if not (math.isfinite(cap) and cap >= base):
            raise ValueError(f"cap must be a finite number >= base ({base}), not {cap!r}")
        self.base, self.cap = float(base), float(cap)
        self.rng = rng if rng is not None else random.Random()
        self.attempt = 0

    @classmethod
    def slow(cls, base: float = SLOW_BASE, cap: float = SLOW_CAP, rng: random.Random | None = None) -> Backoff:
        """Backoff for a revoked/expired certificate: starts at `base` (30 s) and grows to `cap` (15 min)."""
        return cls(base, cap, rng)

    def ceiling(self) -> float:
        """The upper bound of the next delay: min(cap, base * 2**attempt)."""
        return min(self.cap, self.base * 2.0 ** min(self.attempt, 1000))

    def next(self) -> float:
        """The delay (seconds, in [0, ceiling]) before the next attempt; counts one more failure."""
        delay = self.rng.uniform(0.0, self.ceiling())
        if self.ceiling() < self.cap:  # stop counting once capped: the attempt number cannot overflow
            self.attempt += 1
        return delay

    def reset(self) -> None:
        """Back to the first (shortest) delay, after a successful connection."""
        self.attempt = 0
