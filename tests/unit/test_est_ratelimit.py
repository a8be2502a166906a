"""hub.est.ratelimit: request buckets per source; failure budgets per (source, device), per source and hub-wide."""

from __future__ import annotations

from hub.est.ratelimit import RateLimiter


def test_one_device_failing_locks_out_that_device_only():
    rl = RateLimiter(rate=100, burst=100, failures_per_minute=3, source_failures_per_minute=100)
    for i in range(3):
        assert rl.check("10.0.0.1", "dev-a", float(i)) == 0
        rl.fail("10.0.0.1", "dev-a", float(i))
    wait = rl.check("10.0.0.1", "dev-a", 3.0)
    assert wait == 57  # the oldest failure (t=0) leaves the window at t=60
    # the rest of the factory line behind the same address, and dev-a elsewhere, are not affected
    assert rl.check("10.0.0.1", "dev-b", 3.0) == 0
    assert rl.check("10.0.0.2", "dev-a", 3.0) == 0
    assert rl.check("10.0.0.1", "dev-a", 60.5) == 0


def test_the_source_budget_stops_guessing_across_device_ids():
    rl = RateLimiter(rate=100, burst=100, failures_per_minute=5, source_failures_per_minute=10)
    for i in range(10):
        rl.fail("10.0.0.9", f"dev-{i}", 1.0)
    assert rl.check("10.0.0.9", "dev-new", 2.0) == 59
    assert rl.check("10.0.0.8", "dev-new", 2.0) == 0


def test_the_global_budget_refuses_failing_sources_only():
    rl = RateLimiter(rate=100, burst=100, failures_per_minute=5, source_failures_per_minute=5,
                     global_failures_per_minute=6)
    for i in range(6):
        rl.fail(f"10.1.0.{i}", "dev", 0.0)
    assert rl.check("10.1.0.0", "other", 1.0) == 59   # failed recently, and the hub budget is spent
    assert rl.check("10.2.0.1", "dev", 1.0) == 0      # a clean source is still served
    assert rl.check("10.1.0.0", "other", 61.0) == 0


def test_budgets_are_never_below_the_narrower_one():
    rl = RateLimiter(rate=1, burst=1, failures_per_minute=1000, source_failures_per_minute=300,
                     global_failures_per_minute=10)
    assert (rl.max_source_failures, rl.max_global_failures) == (1000, 1000)


def test_request_bucket_and_retry_after():
    rl = RateLimiter(rate=0.5, burst=2, failures_per_minute=5)
    assert rl.admit("s", 0.0) == 0 and rl.admit("s", 0.0) == 0
    assert rl.admit("s", 0.0) == 2          # one token back after 2 s
    assert rl.admit("t", 0.0) == 0
    assert rl.admit("s", 2.0) == 0


def test_memory_is_bounded():
    rl = RateLimiter(rate=1, burst=1, failures_per_minute=2, max_keys=50)
    for i in range(500):
        rl.fail(f"10.3.{i // 256}.{i % 256}", "dev", float(i) / 100)
        rl.admit(f"10.3.{i // 256}.{i % 256}", float(i) / 100)
    assert len(rl._pairs) <= 50 and len(rl._sources) <= 50 and len(rl._buckets) <= 50
