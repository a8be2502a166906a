"""hub.est.denials: at most one audit row per (action, source, reason) a minute, counts adding up."""

from __future__ import annotations

from datetime import datetime, timezone

from hub.est.denials import DenialAudit, row_count


class FakeRegistry:
    def __init__(self):
        self.rows = []

    def audit(self, action, outcome, now, actor="hub", device_id=None, detail="", source=None):
        self.rows.append({"action": action, "outcome": outcome, "actor": actor, "device_id": device_id,
                          "detail": detail, "source": source})


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def make():
    reg, clock = FakeRegistry(), Clock()
    return reg, clock, DenialAudit(reg, clock=lambda: datetime(2026, 1, 1, tzinfo=timezone.utc), monotonic=clock)


def test_first_denial_is_written_at_once_as_before():
    reg, clock, agg = make()
    agg.denied("enroll", "10.0.0.1", "bad_csr", "not a CSR", "dev-1")
    assert reg.rows == [{"action": "enroll", "outcome": "denied", "actor": "dev-1", "device_id": "dev-1",
                         "detail": "bad_csr: not a CSR", "source": "10.0.0.1"}]


def test_a_flood_is_one_row_a_minute_and_the_counts_add_up():
    reg, clock, agg = make()
    for i in range(500):
        agg.denied("enroll", "10.0.0.1", "bad_csr", "not a CSR", f"dev-{i % 3}")
        clock.t += 0.25                      # 125 s in all
        agg.flush()
    agg.denied("tls", "10.0.0.1", "bad_client_cert", "client certificate refused")
    agg.close()
    enroll = [r for r in reg.rows if r["action"] == "enroll"]
    assert len(enroll) == 4                  # immediate, then one per minute, then the rest at close
    assert sum(row_count(r["detail"]) for r in enroll) == 500
    assert enroll[1]["detail"] == "bad_csr: not a CSR (x239 in 60 s)" and enroll[1]["device_id"] is None
    assert enroll[1]["actor"] == "anonymous"
    assert [r["detail"] for r in reg.rows if r["action"] == "tls"] == ["bad_client_cert: client certificate refused"]


def test_keys_are_separate_and_a_quiet_window_ends_the_aggregation():
    reg, clock, agg = make()
    agg.denied("enroll", "10.0.0.1", "bad_csr", "m")
    agg.denied("enroll", "10.0.0.2", "bad_csr", "m")
    agg.denied("enroll", "10.0.0.1", "weak_key", "m")
    assert len(reg.rows) == 3
    clock.t += 61
    agg.flush()
    assert len(reg.rows) == 3                # nothing counted: no row, the window just ends
    agg.denied("enroll", "10.0.0.1", "bad_csr", "m")
    assert len(reg.rows) == 4 and reg.rows[-1]["detail"] == "bad_csr: m"


def test_too_many_keys_share_one():
    reg, clock, agg = make()
    agg.max_keys = 10
    for i in range(100):
        agg.denied("connection", f"10.9.0.{i}", "too_many_connections", "m")
    agg.close()
    assert len(reg.rows) == 12 and sum(row_count(r["detail"]) for r in reg.rows) == 100
    assert reg.rows[-1]["source"] is None
