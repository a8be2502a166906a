"""On a PostgreSQL registry two enrolments commit at once, so authz event n+1 can be visible before event n: the
follower's cursor (hub/broker/eventcursor.py) must still deliver n once it commits (a `seq > last` follower never
would), on the real server."""

from __future__ import annotations

import threading
from datetime import datetime, timezone

import pytest

from hub.broker.eventcursor import EventCursor
from hub.registry.store import Registry
from tests.integration.pgfixtures import pg_server, pg_url  # noqa: F401

pytestmark = pytest.mark.integration
NOW = datetime(2026, 12, 3, tzinfo=timezone.utc)


def read(registry: Registry, cursor: EventCursor, clock: float) -> list[str | None]:
    rows = [r for sql, params in cursor.queries("seq, principal") for r in registry.query(sql, params)]
    return [r["principal"] for r in cursor.advance(rows, clock)]


def test_an_event_committed_after_a_higher_one_still_reaches_the_follower(pg_url, tmp_path):  # noqa: F811
    registry = Registry(pg_url, home=tmp_path)
    try:
        cursor = EventCursor(registry.authz_seq())
        first_in, release = threading.Event(), threading.Event()

        def slow_enrolment() -> None:  # takes the lower number, commits last (the shared lock of enrolments)
            with registry._write(late_lock=True) as db:
                registry.authz_event(db, "slow", "re-enrolled", NOW)
                first_in.set()
                release.wait(10)

        t = threading.Thread(target=slow_enrolment)
        t.start()
        assert first_in.wait(10)
        with registry._write(late_lock=True) as db:
            registry.authz_event(db, "fast", "re-enrolled", NOW)
        assert read(registry, cursor, 0.0) == ["fast"]  # the slow one is not committed yet
        assert cursor.holes, "the gap below 'fast' is not remembered"
        release.set()
        t.join(10)
        assert read(registry, cursor, 1.0) == ["slow"]
        assert read(registry, cursor, 2.0) == [] and not cursor.holes
    finally:
        registry.close()
