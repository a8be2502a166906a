"""Tests for agent.renewal: the renewal decision across a certificate's lifetime with a fake clock, and edges;
the rate limit on `renew` commands."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from agent.renewal import RenewalDecision, decide, next_check_delay, renew_command_refusal

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc)
DAY = timedelta(days=1)


class Clock:
    """A fake clock: tests move time by hand."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def advance(self, delta: timedelta) -> datetime:
        self.now += delta
        return self.now


def test_walk_through_a_30_day_certificate() -> None:
    nb, na = T0, T0 + 30 * DAY
    clock = Clock(T0 - timedelta(hours=1))
    seen = []
    while clock.now < na + DAY:
        d = decide(nb, na, clock.now)
        assert d.renew_at == T0 + 20 * DAY and d.expires_at == na
        seen.append((clock.now, d.action))
        clock.advance(timedelta(hours=6))
    actions = [a for _, a in seen]
    # contiguous phases, in order
    assert actions == sorted(actions, key=["not_yet_valid", "none", "renew", "expired"].index)
    assert {a for _, a in seen} == {"not_yet_valid", "none", "renew", "expired"}
    assert all(a == "none" for t, a in seen if nb <= t < nb + 20 * DAY)
    assert all(a == "renew" for t, a in seen if nb + 20 * DAY <= t < na)


def test_exact_boundaries() -> None:
    nb, na = T0, T0 + 3 * DAY
    renew_at = T0 + 2 * DAY
    assert decide(nb, na, nb - timedelta(microseconds=1)).action == "not_yet_valid"
    assert decide(nb, na, nb).action == "none"
    assert decide(nb, na, renew_at - timedelta(microseconds=1)).action == "none"
    assert decide(nb, na, renew_at).action == "renew"
    assert decide(nb, na, na - timedelta(microseconds=1)).action == "renew"
    assert decide(nb, na, na).action == "expired"


def test_fraction_parameter() -> None:
    nb, na = T0, T0 + 10 * DAY
    assert decide(nb, na, T0, fraction=0.5).renew_at == T0 + 5 * DAY
    assert decide(nb, na, T0, fraction=1.0).renew_at == na - timedelta(minutes=1)  # min_margin applies
    for bad in (0, -0.1, 1.01):
        with pytest.raises(ValueError, match="fraction"):
            decide(nb, na, T0, fraction=bad)


@pytest.mark.parametrize("lifetime, renew_after", [
    # long enough: fraction decides
    (timedelta(minutes=30), timedelta(minutes=20)),
    (timedelta(minutes=3), timedelta(minutes=2)),
    # min_margin pulls renewal earlier, but never before the midpoint
    (timedelta(minutes=2), timedelta(minutes=1)),
    (timedelta(seconds=90), timedelta(seconds=45)),
    (timedelta(seconds=30), timedelta(seconds=15)),
    (timedelta(seconds=1), timedelta(milliseconds=500)),
])
def test_short_lifetimes(lifetime: timedelta, renew_after: timedelta) -> None:
    d = decide(T0, T0 + lifetime, T0)
    assert d.renew_at == T0 + renew_after
    assert d.action == "none"
    assert decide(T0, T0 + lifetime, T0 + renew_after).action == "renew"


def test_30_second_certificate_with_fake_clock() -> None:
    nb, na = T0, T0 + timedelta(seconds=30)
    clock = Clock(nb)
    d = decide(nb, na, clock.now)
    assert d.action == "none" and next_check_delay(d, clock.now) == 15.0
    clock.advance(timedelta(seconds=15))
    d = decide(nb, na, clock.now)
    assert d.action == "renew" and next_check_delay(d, clock.now) == 0.0
    clock.advance(timedelta(seconds=15))
    assert decide(nb, na, clock.now).action == "expired"


def test_min_margin_bigger_margins() -> None:
    nb, na = T0, T0 + 10 * DAY
    d = decide(nb, na, T0, min_margin=timedelta(days=4))
    assert d.renew_at == T0 + 6 * DAY
    d = decide(nb, na, T0, min_margin=timedelta(days=8))
    assert d.renew_at == T0 + 5 * DAY  # capped at the midpoint
    assert decide(nb, na, T0, min_margin=timedelta(0)).renew_at == nb + (na - nb) * (2 / 3)
    with pytest.raises(ValueError, match="min_margin"):
        decide(nb, na, T0, min_margin=timedelta(seconds=-1))


@pytest.mark.parametrize("na", [T0, T0 - timedelta(seconds=1)])
def test_zero_and_negative_lifetime_is_expired(na: datetime) -> None:
    for now in (T0 - DAY, T0, T0 + DAY):
        d = decide(T0, na, now)
        assert d.action == "expired"
        assert "no validity period" in d.reason
        assert next_check_delay(d, now) == 0.0


def test_naive_datetimes_rejected() -> None:
    naive = datetime(2030, 1, 1)
    with pytest.raises(ValueError, match="not_before must be timezone-aware"):
        decide(naive, T0 + DAY, T0)
    with pytest.raises(ValueError, match="not_after"):
        decide(T0, naive, T0)
    with pytest.raises(ValueError, match="now"):
        decide(T0, T0 + DAY, naive)
    d = decide(T0, T0 + DAY, T0)
    with pytest.raises(ValueError, match="now"):
        next_check_delay(d, naive)
    with pytest.raises(TypeError):
        decide("2030-01-01", T0, T0)  # type: ignore[arg-type]


def test_other_timezones_normalised_to_utc() -> None:
    plus2 = timezone(timedelta(hours=2))
    nb = T0.astimezone(plus2)
    d = decide(nb, nb + 3 * DAY, (T0 + 2 * DAY).astimezone(timezone(timedelta(hours=-5))))
    assert d.action == "renew"
    assert d.renew_at == T0 + 2 * DAY and d.renew_at.tzinfo == timezone.utc
    assert d.expires_at.tzinfo == timezone.utc


def test_reasons_are_informative() -> None:
    nb, na = T0, T0 + 3 * DAY
    assert "renew at 2030-01-03T12:00:00+00:00" in decide(nb, na, T0).reason
    assert "renewal due" in decide(nb, na, T0 + 2 * DAY).reason
    assert "expired at 2030-01-04T12:00:00+00:00" in decide(nb, na, na).reason
    assert "clock" in decide(nb, na, T0 - timedelta(seconds=10)).reason


def test_next_check_delay() -> None:
    nb, na = T0, T0 + 30 * DAY
    d = decide(nb, na, T0)
    assert next_check_delay(d, T0) == 3600.0  # capped by max_delay
    assert next_check_delay(d, T0, max_delay=timedelta(days=30)) == 20 * 86400.0
    near = T0 + 20 * DAY - timedelta(seconds=90)
    assert next_check_delay(decide(nb, na, near), near) == 90.0
    # stale decision (renew_at already passed): never negative
    assert next_check_delay(d, T0 + 21 * DAY) == 0.0
    assert next_check_delay(decide(nb, na, T0 + 25 * DAY), T0 + 25 * DAY) == 0.0  # renew now
    assert next_check_delay(decide(nb, na, na), na) == 0.0  # expired: act now
    early = T0 - timedelta(minutes=5)
    assert next_check_delay(decide(nb, na, early), early) == 3600.0  # not yet valid: re-check within max_delay
    with pytest.raises(ValueError):
        next_check_delay(d, T0, max_delay=timedelta(0))


def test_decision_is_frozen() -> None:
    d = decide(T0, T0 + DAY, T0)
    assert isinstance(d, RenewalDecision)
    with pytest.raises(AttributeError):
        d.action = "renew"  # type: ignore[misc]


# -- renew_command_refusal: the rate limit on `renew` commands ------------------------------------------------------

class Monotonic:
    """A fake monotonic clock (seconds)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def test_renew_commands_across_time() -> None:
    clock, last, answers = Monotonic(), None, []
    for step in (0, 1, 299.5, 299.4, 0.1, 0.01, 600, 0):
        clock.advance(step)
        refused = renew_command_refusal(last, clock.now, 600)
        if refused is None:
            last = clock.now   # the agent records an accepted renewal
        answers.append(refused)
    assert answers == [None, "renewal rate limited; next allowed in 599 s",
                       "renewal rate limited; next allowed in 300 s", "renewal rate limited; next allowed in 1 s",
                       None, "renewal rate limited; next allowed in 600 s", None,
                       "renewal rate limited; next allowed in 600 s"]


@pytest.mark.parametrize("last, now, interval, expected", [
    (None, 0.0, 600, None),                                      # never renewed by command
    (100.0, 700.0, 600, None),                                   # exactly the interval: allowed
    (100.0, 699.999, 600, "renewal rate limited; next allowed in 1 s"),   # rounded up, never "0 s"
    (100.0, 100.0, 600, "renewal rate limited; next allowed in 600 s"),
    (100.0, 50.0, 600, "renewal rate limited; next allowed in 600 s"),    # clock went back: no time passed
    (100.0, 100.0, 0, None),                                     # 0 disables the limit
    (100.0, 130.0, 45.5, "renewal rate limited; next allowed in 16 s"),
])
def test_renew_command_refusal(last, now, interval, expected) -> None:
    assert renew_command_refusal(last, now, interval) == expected


@pytest.mark.parametrize("interval", [-1, float("nan"), float("inf")])
def test_renew_command_refusal_rejects_bad_intervals(interval) -> None:
    with pytest.raises(ValueError, match="min_interval"):
        renew_command_refusal(None, 0.0, interval)
