"""EST rate limits: a request bucket per source, failure budgets per (source, device), per source and hub-wide.

Clocks are passed in (`now`, monotonic seconds). The budgets count failures in a sliding 60 s window:

* per (source, device id): `failures_per_minute` -- guessing one device's token is slow, and a device that keeps
  failing locks out only itself, not the factory line behind the same NAT address;
* per source: `source_failures_per_minute` -- one address guessing across many device ids (generous: a factory
  line or a reverse proxy is one source);
* hub-wide: `global_failures_per_minute` -- while it is spent, sources with a failure in the window are refused
  (a spread-out guesser is slowed down) and sources without one are still served.

Only real failures count: the caller never reports a 401 challenge (no credentials sent yet) or a 429.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass

WINDOW = 60.0


@dataclass
class _Bucket:
    tokens: float
    stamp: float


def _retry(seconds: float) -> int:
    """Whole seconds for a Retry-After header (at least 1)."""
    return max(1, math.ceil(seconds))


class RateLimiter:
    """`admit(source, now)` spends a request token; `check(source, device, now)` looks at the failure budgets;
    `fail(source, device, now)` records a failure. admit and check return 0 when allowed, else the seconds after
    which the request may be retried (for Retry-After)."""

    def __init__(self, rate: float, burst: int, failures_per_minute: int,
                 source_failures_per_minute: int | None = None, global_failures_per_minute: int | None = None,
                 max_keys: int = 100_000):
        self.rate, self.burst, self.max_failures = rate, burst, failures_per_minute
        # a budget below the narrower one would make that one meaningless: per source >= per pair, hub >= source
        self.max_source_failures = max(source_failures_per_minute or 10 * failures_per_minute, failures_per_minute)
        self.max_global_failures = max(global_failures_per_minute or 100 * failures_per_minute,
                                       self.max_source_failures)
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}
        # failure times, oldest first; a full deque (maxlen = budget) means the budget is spent
        self._pairs: dict[tuple[str, str | None], deque] = {}
        self._sources: dict[str, deque] = {}
        self._global: deque = deque(maxlen=max(1, self.max_global_failures))

    # --- requests ---------------------------------------------------------------------------------------------
    def admit(self, source: str, now: float) -> int:
        with self._lock:
            bucket = self._buckets.get(source)
            if bucket is None:
                if len(self._buckets) >= self.max_keys:  # bounded memory: forget full (idle) buckets
                    self._buckets = {k: b for k, b in self._buckets.items()
                                     if b.tokens + (now - b.stamp) * self.rate < self.burst}
                    if len(self._buckets) >= self.max_keys:
                        self._buckets.pop(next(iter(self._buckets)))
                bucket = self._buckets[source] = _Bucket(tokens=float(self.burst), stamp=now)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
            if bucket.tokens < 1.0:
                return _retry((1.0 - bucket.tokens) / self.rate if self.rate > 0 else WINDOW)
            bucket.tokens -= 1.0
            return 0

    # --- failures ---------------------------------------------------------------------------------------------
    @staticmethod
    def _trim(times: deque | None, now: float) -> deque | None:
        while times and times[0] <= now - WINDOW:
            times.popleft()
        return times

    def check(self, source: str, device: str | None, now: float) -> int:
        with self._lock:
            pair = self._trim(self._pairs.get((source, device)), now)
            if pair and len(pair) >= self.max_failures:
                return _retry(pair[0] + WINDOW - now)
            mine = self._trim(self._sources.get(source), now)
            if mine and len(mine) >= self.max_source_failures:
                return _retry(mine[0] + WINDOW - now)
            everyone = self._trim(self._global, now)
            if mine and len(everyone) >= self.max_global_failures:
                return _retry(min(everyone[0], mine[-1]) + WINDOW - now)
            return 0

    def fail(self, source: str, device: str | None, now: float) -> None:
        with self._lock:
            if len(self._pairs) >= self.max_keys or len(self._sources) >= self.max_keys:
                self._prune(now)
            key = (source, device)
            if key not in self._pairs:
                self._pairs[key] = deque(maxlen=max(1, self.max_failures))
            if source not in self._sources:
                self._sources[source] = deque(maxlen=max(1, self.max_source_failures))
            for times in (self._pairs[key], self._sources[source], self._global):
                times.append(now)

    def _prune(self, now: float) -> None:
        """Bounded memory: drop keys without failures in the window, then the oldest keys if still too many."""
        for table in (self._pairs, self._sources):
            for key in [k for k, times in table.items() if not self._trim(times, now)]:
                del table[key]
            while len(table) >= self.max_keys:
                table.pop(next(iter(table)))
