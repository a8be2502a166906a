"""hub/broker/eventcursor.py: a follower of authz_events sees an event that commits after a higher-numbered one."""

from __future__ import annotations

from hub.broker.eventcursor import HOLE_WAIT, MAX_GAP, EventCursor


def ev(*seqs: int) -> list[dict]:
    return [{"seq": n, "principal": f"d{n}"} for n in seqs]


def test_in_order_events_leave_no_gap():
    c = EventCursor(0)
    assert [e["seq"] for e in c.advance(ev(2, 1, 3), 0.0)] == [1, 2, 3]
    assert c.seq == 3 and c.holes == {} and len(c.queries("seq")) == 1


def test_an_event_committed_late_is_asked_for_and_applied_once():
    c = EventCursor(10)
    c.advance(ev(11, 13), 0.0)  # 12 is still in flight
    assert c.seq == 13 and set(c.holes) == {12}
    (_, above), (sql, late) = c.queries("seq, principal")
    assert above == [13] and late == [12] and "seq IN (?)" in sql
    c.advance(ev(12), 1.0)  # it committed
    assert c.holes == {} and c.seq == 13


def test_a_gap_that_never_fills_is_forgotten_after_the_wait():
    c = EventCursor(0)
    c.advance(ev(3), 0.0)
    assert set(c.holes) == {1, 2}
    c.advance((), HOLE_WAIT - 1)
    assert set(c.holes) == {1, 2}
    c.advance((), HOLE_WAIT + 1)
    assert c.holes == {}


def test_a_wide_jump_is_not_remembered_number_by_number():
    c = EventCursor(0)
    c.advance(ev(10 * MAX_GAP), 0.0)
    assert len(c.holes) == MAX_GAP and c.seq == 10 * MAX_GAP


def test_the_start_cursor_asks_only_above_it():
    (sql, params), = EventCursor(42).queries("seq")
    assert "seq > ?" in sql and params == [42]
