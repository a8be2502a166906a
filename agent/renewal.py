"""Certificate renewal policy (certbot-style, pure): when to renew a certificate and how long to sleep until then.

Renew once `fraction` of the lifetime has passed, but keep at least `min_margin` before expiry when the
lifetime allows it; `min_margin` never moves renewal before the lifetime's midpoint, so very short
certificates (seconds to minutes, as in tests) renew at mid-life instead of in a tight loop.

A `renew` command from the fleet is rate limited (`renew_command_refusal`): each renewal costs a signature by the
fleet CA and a registry write, and a rotation a new token key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Literal

Action = Literal["none", "renew", "expired", "not_yet_valid"]


@dataclass(frozen=True)
class RenewalDecision:
    """`action`: "none" (keep the certificate), "renew" (renew now), "expired" (re-enroll: mTLS renewal is
    no longer possible) or "not_yet_valid" (now < not_before: the clock is behind or the certificate is
    future-dated). `renew_at` / `expires_at` are UTC."""

    action: Action
    renew_at: datetime
    expires_at: datetime
    reason: str


def _utc(name: str, value: datetime) -> datetime:
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (got naive {value.isoformat()})")
    return value.astimezone(timezone.utc)


def decide(not_before: datetime, not_after: datetime, now: datetime, fraction: float = 2 / 3,
           min_margin: timedelta = timedelta(minutes=1)) -> RenewalDecision:
    """Decide what to do with a certificate valid [not_before, not_after] at `now` (all tz-aware).

    renew_at = min(not_before + fraction*lifetime, max(not_after - min_margin, not_before + lifetime/2)).
    Raises ValueError for naive datetimes, fraction outside (0, 1] or a negative min_margin.
    """
    nb, na, now = _utc("not_before", not_before), _utc("not_after", not_after), _utc("now", now)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], not {fraction!r}")
    if min_margin < timedelta(0):
        raise ValueError("min_margin must not be negative")
    lifetime = na - nb
    if lifetime <= timedelta(0):
        return RenewalDecision("expired", na, na, f"certificate has no validity period "
                                                  f"(not_after {na.isoformat()} <= not_before {nb.isoformat()})")
    renew_at = min(nb + lifetime * fraction, max(na - min_margin, nb + lifetime / 2))
    if now >= na:
        return RenewalDecision("expired", renew_at, na, f"certificate expired at {na.isoformat()}")
    if now < nb:
        return RenewalDecision("not_yet_valid", renew_at, na,
                               f"certificate not valid until {nb.isoformat()} ({(nb - now).total_seconds():.0f}s "
                               "from now): is the clock right?")
    left = (na - now).total_seconds()
    if now >= renew_at:
        return RenewalDecision("renew", renew_at, na, f"renewal due since {renew_at.isoformat()}; {left:.0f}s left")
    return RenewalDecision("none", renew_at, na, f"renew at {renew_at.isoformat()}; {left:.0f}s left")


def next_check_delay(decision: RenewalDecision, now: datetime, max_delay: timedelta = timedelta(hours=1)) -> float:
    """Seconds to sleep before deciding again: 0 for "renew" and "expired" (act now), otherwise until
    `renew_at` but never more than `max_delay` (so clock jumps and replaced certificates are noticed)."""
    now = _utc("now", now)
    if max_delay <= timedelta(0):
        raise ValueError("max_delay must be positive")
    if decision.action in ("renew", "expired"):
        return 0.0
    return max(0.0, min((decision.renew_at - now).total_seconds(), max_delay.total_seconds()))


def renew_command_refusal(last_at: float | None, now: float, min_interval: float) -> str | None:
    """None when a command-triggered renewal may start at `now`, else the failed ack's error
    "renewal rate limited; next allowed in N s" (N rounded up).

    `last_at` is when the previous command-triggered renewal was accepted (None: never), `now` the same clock
    (monotonic seconds); a clock that went backwards counts as no time passed. `min_interval` 0 disables the limit.
    Raises ValueError for a negative or non-finite `min_interval`.
    """
    if not (math.isfinite(min_interval) and min_interval >= 0):
        raise ValueError(f"min_interval must be a finite number of seconds >= 0, not {min_interval!r}")
    if last_at is None:
        return None
    wait = min_interval - max(0.0, now - last_at)
    if wait <= 0:
        return None
    return f"renewal rate limited; next allowed in {max(1, math.ceil(wait))} s"
