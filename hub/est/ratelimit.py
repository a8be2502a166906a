"""Per-source rate limiting: a token bucket for requests and a sliding budget for failures (clock injected)."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    failures: deque = field(default_factory=deque)


class RateLimiter:
    """`allow(source, now)` spends one request token; `fail(source, now)` records a failed attempt.

    A source is refused while its bucket is empty or while it has `failures_per_minute` failures in the
    last 60 s (so token guessing is slow even when the request rate is generous).
    """

    def __init__(self, rate: float, burst: int, failures_per_minute: int, max_sources: int = 100_000):
        self.rate, self.burst, self.max_failures = rate, burst, failures_per_minute
        self.max_sources = max_sources
        self._lock = threading.Lock()
        self._sources: dict[str, _Bucket] = {}

    def _bucket(self, source: str, now: float) -> _Bucket:
        bucket = self._sources.get(source)
        if bucket is None:
            if len(self._sources) >= self.max_sources:  # bounded memory: forget idle full buckets
                self._sources = {k: b for k, b in self._sources.items() if b.failures or b.tokens < self.burst}
            bucket = self._sources[source] = _Bucket(tokens=float(self.burst), stamp=now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.stamp) * self.rate)
        bucket.stamp = now
        while bucket.failures and bucket.failures[0] <= now - 60.0:
            bucket.failures.popleft()
        return bucket

    def allow(self, source: str, now: float) -> bool:
        with self._lock:
            bucket = self._bucket(source, now)
            if len(bucket.failures) >= self.max_failures or bucket.tokens < 1.0:
                return False
            bucket.tokens -= 1.0
            return True

    def fail(self, source: str, now: float) -> None:
        with self._lock:
            self._bucket(source, now).failures.append(now)
