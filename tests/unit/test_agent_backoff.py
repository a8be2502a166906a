"""Tests for agent.backoff: full-jitter bounds, exponential growth, cap, reset, slow mode and jitter spread."""

from __future__ import annotations

import random
import statistics

import pytest

from agent.backoff import SLOW_BASE, SLOW_CAP, Backoff


class MaxRng(random.Random):
    """Always returns the upper bound, to expose the ceiling."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_delays_within_bounds() -> None:
    b = Backoff(base=0.5, cap=60.0, rng=random.Random(1))
    for attempt in range(40):
        ceiling = min(60.0, 0.5 * 2 ** attempt)
        assert b.ceiling() == ceiling
        assert 0.0 <= b.next() <= ceiling


def test_growth_and_cap() -> None:
    b = Backoff(base=0.5, cap=60.0, rng=MaxRng())
    assert [b.next() for _ in range(10)] == [0.5, 1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_attempt_stops_counting_at_cap() -> None:
    b = Backoff(base=1.0, cap=4.0, rng=MaxRng())
    for _ in range(10_000):
        b.next()
    assert b.attempt == 2 and b.ceiling() == 4.0


def test_reset() -> None:
    b = Backoff(rng=MaxRng())
    for _ in range(5):
        b.next()
    b.reset()
    assert b.attempt == 0 and b.next() == 0.5


def test_slow_mode() -> None:
    b = Backoff.slow(rng=MaxRng())
    assert (b.base, b.cap) == (SLOW_BASE, SLOW_CAP) == (30.0, 900.0)
    assert [b.next() for _ in range(7)] == [30, 60, 120, 240, 480, 900, 900]
    assert Backoff.slow(base=5, cap=100).cap == 100
    assert SLOW_CAP >= 10 * Backoff().cap


def test_jitter_spread_is_uniform() -> None:
    # at the cap every delay is uniform(0, cap): mean cap/2, stdev cap/sqrt(12), covering the whole range
    b = Backoff(base=1.0, cap=8.0, rng=random.Random(20240501))
    for _ in range(3):
        b.next()
    samples = [b.next() for _ in range(20_000)]
    assert all(0.0 <= s <= 8.0 for s in samples)
    assert statistics.fmean(samples) == pytest.approx(4.0, abs=0.1)
    assert statistics.pstdev(samples) == pytest.approx(8.0 / 12 ** 0.5, abs=0.1)
    deciles = [sum(1 for s in samples if k <= s < k + 0.8) for k in [i * 0.8 for i in range(10)]]
    assert all(1800 <= n <= 2200 for n in deciles), deciles
    assert min(samples) < 0.01 and max(samples) > 7.99


def test_independent_instances_desynchronise() -> None:
    # the point of jitter: a fleet reconnecting after a broker restart spreads out
    first = [Backoff(rng=random.Random(seed)).next() for seed in range(100)]
    assert len(set(first)) == 100


def test_seeded_rng_is_deterministic() -> None:
    a, b = Backoff(rng=random.Random(7)), Backoff(rng=random.Random(7))
    assert [a.next() for _ in range(20)] == [b.next() for _ in range(20)]
    assert 0.0 <= Backoff().next() <= 0.5  # default rng


@pytest.mark.parametrize("base, cap", [(0, 1), (-1, 1), (2, 1), (float("inf"), float("inf")), (1, float("nan"))])
def test_bad_parameters(base: float, cap: float) -> None:
    with pytest.raises(ValueError):
        Backoff(base=base, cap=cap)
