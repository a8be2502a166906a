"""hub/jobs/engine.py, the pure job policy, on a fake clock: rate (token bucket), timeouts, the abort rule, offline
policies, deadline and completion."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from hub.jobs import engine
from hub.jobs.engine import Bucket, Counts, Spec

T0 = datetime(2027, 1, 1, tzinfo=timezone.utc)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def spec(**kw) -> Spec:
    return Spec(**{"rate_per_minute": 60, "timeout_s": 30, "abort_percent": 20, **kw})


def run_bucket(s: Spec, seconds: float, step: float = 0.2) -> list[float]:
    """Simulate ticks every `step` s for `seconds`, sending whatever is allowed; the send times."""
    bucket = engine.new_bucket(s, T0)
    sent, t = [], 0.0
    while t <= seconds + 1e-9:
        bucket = engine.refill(bucket, s, at(t))
        n = engine.allowance(bucket)
        bucket = engine.spend(bucket, n)
        sent += [round(t, 3)] * n
        t += step
    return sent


# --- rate -------------------------------------------------------------------------------------------------------

def test_rate_30_per_minute_sends_one_device_every_two_seconds():
    sent = run_bucket(spec(rate_per_minute=30), 10.0)
    assert sent == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]


def test_rate_over_a_minute_is_the_rate_plus_the_burst():
    s = spec(rate_per_minute=600)  # 10/s: burst 10
    assert engine.burst(s) == 10
    sent = run_bucket(s, 60.0)
    assert len(sent) == 600 + 10  # a minute's worth after the first burst
    assert sent.count(0.0) == 10  # the burst, then 2 per 200 ms tick
    assert sent.count(1.0) == 2


def test_burst_is_small_at_least_one_and_a_second_worth():
    assert engine.burst(spec(rate_per_minute=1)) == 1
    assert engine.burst(spec(rate_per_minute=6000)) == 100


def test_an_idle_bucket_does_not_save_more_than_the_burst():
    s = spec(rate_per_minute=120)  # 2/s
    bucket = engine.refill(Bucket(0, T0), s, at(3600))
    assert engine.allowance(bucket) == 2


def test_clock_going_back_refills_nothing():
    s = spec(rate_per_minute=60)
    bucket = engine.refill(Bucket(0.5, at(10)), s, at(5))
    assert bucket.tokens == 0.5 and bucket.at == at(10)
    assert engine.allowance(engine.refill(bucket, s, at(10.5))) == 1


def test_spending_more_than_allowed_is_refused():
    with pytest.raises(ValueError):
        engine.spend(Bucket(1.5, T0), 2)


def test_decide_sends_no_more_than_queued_or_allowed():
    s = spec(rate_per_minute=600)
    full = engine.new_bucket(s, T0)
    assert engine.decide(s, Counts(queued=3), full, T0).send == 3
    assert engine.decide(s, Counts(queued=50), full, T0).send == 10
    assert engine.decide(s, Counts(queued=50), Bucket(0.4, T0), T0).send == 0


# --- timeouts ---------------------------------------------------------------------------------------------------

def test_a_sent_device_times_out_after_timeout_s():
    s = spec(timeout_s=30)
    assert not engine.has_timed_out(s, at(0), at(30))
    assert engine.has_timed_out(s, at(0), at(30.001))
    assert engine.timed_out_before(s, at(100)) == at(70)


# --- abort ------------------------------------------------------------------------------------------------------

def test_abort_when_failures_pass_the_threshold_of_finished_devices():
    s = spec(abort_percent=20)
    assert engine.abort_reason(s, Counts(queued=90, acked=8, failed=2)) is None  # 20% is not more than 20%
    reason = engine.abort_reason(s, Counts(queued=89, acked=8, failed=2, timed_out=1))
    assert reason is not None and "3 of 11" in reason and "27%" in reason
    assert engine.decide(s, Counts(queued=89, acked=8, failed=2, timed_out=1), engine.new_bucket(s, T0), T0).abort


def test_no_abort_before_the_minimum_number_of_finished_devices():
    s = spec(abort_percent=10)
    assert engine.abort_reason(s, Counts(queued=991, failed=9)) is None  # min(1000, 10) = 10 finished needed
    assert engine.abort_reason(s, Counts(queued=990, failed=10)) is not None
    small = Counts(queued=2, failed=2)  # total 4: all 4 must finish
    assert engine.min_finished(s, small) == 4 and engine.abort_reason(s, small) is None
    assert engine.abort_reason(s, Counts(failed=3, acked=1)) is not None


def test_min_finished_is_configurable():
    s = spec(abort_percent=50, min_finished=2)
    assert engine.abort_reason(s, Counts(queued=100, failed=1)) is None
    assert engine.abort_reason(s, Counts(queued=100, failed=2)) is not None


def test_offline_devices_do_not_count_towards_the_abort_rule():
    s = spec(abort_percent=0, min_finished=1)
    assert engine.abort_reason(s, Counts(queued=5, offline=50, acked=1)) is None
    assert engine.abort_reason(s, Counts(queued=5, offline=50, acked=1, timed_out=1)) is not None


def test_abort_percent_100_never_aborts():
    s = spec(abort_percent=100, min_finished=1)
    assert engine.abort_reason(s, Counts(failed=10)) is None


def test_a_finished_job_over_the_threshold_is_aborted_not_completed():
    s = spec(abort_percent=20)
    d = engine.decide(s, Counts(failed=3), engine.new_bucket(s, T0), T0)
    assert d.abort and not d.complete


# --- offline policies -------------------------------------------------------------------------------------------

def test_offline_policy_fail_marks_offline_and_wait_waits():
    assert engine.offline_action(spec(offline="fail"), online=False) == "offline"
    assert engine.offline_action(spec(offline="wait"), online=False) == "wait"
    for policy in engine.OFFLINE_POLICIES:
        assert engine.offline_action(spec(offline=policy), online=True) == "send"


def test_wait_deadline_expires_the_queued_devices():
    s = spec(offline="wait", deadline=at(60))
    bucket = engine.new_bucket(s, T0)
    before = engine.decide(s, Counts(queued=3, acked=1), bucket, at(59))
    assert before.send == 1 and not before.expire_queued
    after = engine.decide(s, Counts(queued=3, acked=1), bucket, at(60))
    assert after.expire_queued and after.send == 0
    assert not engine.deadline_passed(spec(offline="wait"), at(10 ** 6))  # no deadline: waits for ever


# --- completion -------------------------------------------------------------------------------------------------

def test_complete_when_nothing_is_queued_or_sent():
    s = spec()
    bucket = engine.new_bucket(s, T0)
    assert engine.decide(s, Counts(acked=4, offline=1, failed=0), bucket, T0).complete
    assert not engine.decide(s, Counts(acked=4, sent=1), bucket, T0).complete
    assert not engine.decide(s, Counts(acked=4, queued=1), bucket, T0).complete
    assert engine.decide(s, Counts(), bucket, T0).complete  # a job over no device


def test_counts_total_and_dict():
    c = Counts(queued=1, sent=2, acked=3, failed=4, timed_out=5, offline=6)
    assert c.total == 21 and c.ran == 12 and c.failures == 9
    assert list(c.as_dict()) == list(engine.DEVICE_STATES)


# --- ramp, in-flight cap, retries ---------------------------------------------------------------------------------

def test_ramp_starts_slow_and_speeds_up_with_acked_devices():
    s = spec(rate_per_minute=600, ramp_start=6, ramp_factor=2, ramp_every=5)
    assert [engine.rate(s, Counts(acked=n)) for n in (0, 4, 5, 10, 15, 20, 25, 1000)] == \
        [6, 6, 12, 24, 48, 96, 192, 600]
    assert engine.rate(s) == 6 and engine.burst(s) == 1
    assert engine.rate(spec(rate_per_minute=60)) == 60  # no ramp
    assert engine.rate(spec(rate_per_minute=60, ramp_start=1, ramp_factor=10, ramp_every=1),
                       Counts(acked=10 ** 9)) == 60  # no overflow


def test_ramp_refills_at_the_current_rate():
    s = spec(rate_per_minute=600, ramp_start=6, ramp_factor=10, ramp_every=1)
    slow = engine.refill(Bucket(0, T0), s, at(1), Counts())
    fast = engine.refill(Bucket(0, T0), s, at(1), Counts(acked=2))  # 600/min: 10/s
    assert engine.allowance(slow) == 0 and engine.allowance(fast) == 10


def test_max_in_flight_caps_the_devices_sent_and_unanswered():
    s = spec(rate_per_minute=6000, max_in_flight=3)
    full = engine.new_bucket(s, T0)
    assert engine.decide(s, Counts(queued=50), full, T0).send == 3
    assert engine.decide(s, Counts(queued=50, sent=2), full, T0).send == 1
    assert engine.decide(s, Counts(queued=50, sent=3), full, T0).send == 0


def test_retries_after_a_timeout():
    assert not engine.retry(spec(), 1)  # no retries by default
    s = spec(retries=2)
    assert engine.retry(s, 1) and engine.retry(s, 2) and not engine.retry(s, 3)


# --- the API's input rules (hub/api/jobinput.py, pure) ------------------------------------------------------------

def test_job_spec_input_refuses_bad_values_with_the_field_named():
    from hub.api.jobinput import parse_spec
    from hub.api.queries import BadRequest

    ok = parse_spec({"name": "n", "command": "ping"})
    assert ok["rate_per_minute"] == 60 and ok["offline"] == "fail" and ok["retries"] == 0 and ok["ramp"] is None
    assert parse_spec({"selector": {}}, dry_run=True)["command"] == "ping"  # a dry run needs only the selector
    for body, param in (({"command": "ping"}, "name"), ({"name": "n"}, "command"),
                        ({"name": " n", "command": "ping"}, "name"),
                        ({"name": "n", "command": "ping", "rate_per_minute": 10 ** 400}, "rate_per_minute"),
                        ({"name": "n", "command": "ping", "timeout_s": float("nan")}, "timeout_s"),
                        ({"name": "n", "command": "ping", "abort_percent": True}, "abort_percent"),
                        ({"name": "n", "command": "ping", "args": {"x": float("inf")}}, "args"),
                        ({"name": "n", "command": "ping", "args": {"x": "y" * 9000}}, "args"),
                        ({"name": "n", "command": "ping", "retries": 11}, "retries"),
                        ({"name": "n", "command": "ping", "ramp": {"factor": 2}}, "ramp"),
                        ({"name": "n", "command": "ping", "ramp": {"start_per_minute": 1, "factor": 1}}, "factor"),
                        ({"name": "n", "command": "ping", "offline": "wait", "deadline": "2030-01-01"}, "deadline")):
        with pytest.raises(BadRequest) as exc:
            parse_spec(body)
        assert exc.value.param == param, (body, exc.value)
