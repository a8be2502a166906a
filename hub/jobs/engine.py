"""The job policy, pure (no I/O, the clock passed in): rate, per-device timeouts, abort threshold, completion.

Rate: a token bucket per job. It refills at the current rate / 60 tokens a second and holds at most `burst`
tokens: one second's worth, at least 1 (so 30/min sends one device every 2 s, 6000/min at most 100 at once). A
fresh bucket (a new job, or a running job after a hub restart) starts full. A clock that goes back refills nothing.
The current rate is `rate_per_minute`, or with a ramp (AWS IoT Jobs' exponential rollout) `ramp_start` devices a
minute multiplied by `ramp_factor` for every `ramp_every` acked devices, up to `rate_per_minute`: a rollout starts
slowly and speeds up only as devices succeed. `max_in_flight` caps the devices sent and not yet answered (e.g. for
renewals, which each cost the EST server a signature).

Retries: a device that timed out goes back to `queued` while it has had at most `retries` attempts (it is sent
again, with a new command id, when the walk over the queued devices comes round to it); then it is `timed_out`.

Timeouts: a device `sent` at `sent_at` has timed out once `now - sent_at > timeout_s` without an ack.

Abort: the threshold protects the fleet from a bad command, so it counts the devices that RAN the command:
`finished = acked + failed + timed_out`, `failures = failed + timed_out`. A job aborts when
`finished >= min_finished` and `failures > abort_percent % of finished`. `offline` devices do not count either way:
they never received the command (an unreachable part of the fleet says nothing about the command; AWS IoT Jobs'
abort criteria also count FAILED / REJECTED / TIMED_OUT executions only). `min_finished` defaults to
min(total, 10), so two early failures out of a thousand devices do not stop a rollout.

Offline devices: under `fail` a device that is not online when its turn comes is marked `offline` at once (no send,
no token spent); under `wait` it stays `queued` until it is online, or until the job's `deadline` passes: then every
device still queued becomes `offline`. A job is complete when no device is `queued` or `sent`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

#: seconds of sending the bucket holds (burst = max(1, rate per second * BURST_SECONDS))
BURST_SECONDS = 1.0
#: the default minimum number of finished devices before the abort threshold applies
MIN_FINISHED = 10
OFFLINE_POLICIES = ("fail", "wait")
DEVICE_STATES = ("queued", "sent", "acked", "failed", "timed_out", "offline")
JOB_STATES = ("running", "paused", "completed", "aborted", "cancelled")
FINISHED_JOB_STATES = ("completed", "aborted", "cancelled")


@dataclass(frozen=True)
class Spec:
    """What a job's policy needs from its spec."""

    rate_per_minute: float
    timeout_s: float
    abort_percent: float
    offline: str = "fail"
    min_finished: int | None = None  # None: min(total, MIN_FINISHED)
    deadline: datetime | None = None  # `wait` only: no device waits past this
    ramp_start: float | None = None  # devices per minute at first (None: no ramp) ...
    ramp_factor: float = 2.0  # ... times this ...
    ramp_every: int = 10  # ... for every this many acked devices, up to rate_per_minute
    max_in_flight: int | None = None  # devices sent and not yet answered, at most (None: no cap)
    retries: int = 0  # extra attempts for a device that timed out


@dataclass(frozen=True)
class Counts:
    queued: int = 0
    sent: int = 0
    acked: int = 0
    failed: int = 0
    timed_out: int = 0
    offline: int = 0

    @property
    def total(self) -> int:
        return self.queued + self.sent + self.acked + self.failed + self.timed_out + self.offline

    @property
    def ran(self) -> int:
        """Devices that received the command and finished (acked, failed or timed out)."""
        return self.acked + self.failed + self.timed_out

    @property
    def failures(self) -> int:
        return self.failed + self.timed_out

    def as_dict(self) -> dict[str, int]:
        return {s: getattr(self, s) for s in DEVICE_STATES}


@dataclass(frozen=True)
class Bucket:
    tokens: float
    at: datetime


def rate(spec: Spec, counts: Counts | None = None) -> float:
    """Devices per minute now: rate_per_minute, or the ramp's rate for the devices acked so far."""
    if spec.ramp_start is None:
        return spec.rate_per_minute
    steps = (counts.acked if counts is not None else 0) // max(1, spec.ramp_every)
    try:
        ramped = spec.ramp_start * spec.ramp_factor ** min(steps, 10_000)
    except OverflowError:
        ramped = spec.rate_per_minute
    return min(spec.rate_per_minute, ramped)


def burst(spec: Spec, counts: Counts | None = None) -> float:
    return max(1.0, rate(spec, counts) / 60.0 * BURST_SECONDS)


def new_bucket(spec: Spec, now: datetime) -> Bucket:
    """A full bucket."""
    return Bucket(burst(spec), now)


def refill(bucket: Bucket, spec: Spec, now: datetime, counts: Counts | None = None) -> Bucket:
    elapsed = max(0.0, (now - bucket.at).total_seconds())
    return Bucket(min(burst(spec, counts), bucket.tokens + elapsed * rate(spec, counts) / 60.0),
                  max(now, bucket.at))


def allowance(bucket: Bucket) -> int:
    """How many devices may be sent now."""
    return int(math.floor(bucket.tokens + 1e-9))


def spend(bucket: Bucket, n: int) -> Bucket:
    if n > allowance(bucket):
        raise ValueError(f"cannot spend {n} tokens out of {bucket.tokens:.3f}")
    return replace(bucket, tokens=bucket.tokens - n)


def timed_out_before(spec: Spec, now: datetime) -> datetime:
    """Devices sent before this time without an ack have timed out."""
    return now - timedelta(seconds=spec.timeout_s)


def has_timed_out(spec: Spec, sent_at: datetime, now: datetime) -> bool:
    return sent_at < timed_out_before(spec, now)


def retry(spec: Spec, attempts: int) -> bool:
    """Whether a device that timed out after `attempts` sends is queued again."""
    return attempts <= spec.retries


def min_finished(spec: Spec, counts: Counts) -> int:
    return spec.min_finished if spec.min_finished is not None else min(counts.total, MIN_FINISHED)


def abort_reason(spec: Spec, counts: Counts) -> str | None:
    """Why the job must abort now, or None."""
    ran = counts.ran
    if ran == 0 or ran < min_finished(spec, counts):
        return None
    if counts.failures * 100.0 > spec.abort_percent * ran:
        return (f"{counts.failures} of {ran} finished devices failed or timed out "
                f"({counts.failures * 100.0 / ran:.0f}% > {spec.abort_percent:g}%)")
    return None


def offline_action(spec: Spec, online: bool) -> str:
    """What to do with a queued device whose turn it is: 'send', 'offline' (mark it, no send) or 'wait'."""
    if online:
        return "send"
    return "offline" if spec.offline == "fail" else "wait"


def deadline_passed(spec: Spec, now: datetime) -> bool:
    return spec.deadline is not None and now >= spec.deadline


def is_complete(counts: Counts) -> bool:
    return counts.queued == 0 and counts.sent == 0


@dataclass(frozen=True)
class Decision:
    """One tick of a running job: `abort` (a reason) or `complete` end it; else send up to `send` devices, and
    when `expire_queued` mark every queued device `offline` (the deadline passed)."""

    send: int = 0
    abort: str | None = None
    complete: bool = False
    expire_queued: bool = False


def decide(spec: Spec, counts: Counts, bucket: Bucket, now: datetime) -> Decision:
    """What a running job does now, given its counts after this tick's acks and timeouts were applied."""
    reason = abort_reason(spec, counts)
    if reason is not None:
        return Decision(abort=reason)
    if is_complete(counts):
        return Decision(complete=True)
    if deadline_passed(spec, now):
        return Decision(expire_queued=counts.queued > 0)
    room = counts.queued
    if spec.max_in_flight is not None:
        room = min(room, max(0, spec.max_in_flight - counts.sent))
    return Decision(send=min(allowance(bucket), room))
