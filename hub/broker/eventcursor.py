"""Where a follower of authz_events is: the last number applied, and the gaps below it that may still fill.

Event numbers are given at INSERT, not at COMMIT. On SQLite writers are serialized, so numbers commit in order.
On a PostgreSQL registry enrolments of several hubs commit at once (a shared write lock), so event n+1 can be
visible before event n commits; a follower that only asked for `seq > last` would never see n. The cursor keeps
such gaps for HOLE_WAIT seconds and asks for them again (a number a rolled-back transaction consumed never fills,
and is forgotten then). Pure: the caller runs the queries and passes the clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

#: A write transaction holds the registry's write lock for milliseconds; 30 s is ample for a late commit.
HOLE_WAIT = 30.0
#: At most this many numbers of one gap are remembered (a gap that wide is a sequence jump, not commits in flight)
MAX_GAP = 1000
#: At most this many gaps are asked for in one query
ASK_AT_ONCE = 500


class EventCursor:
    def __init__(self, seq: int = 0) -> None:
        self.seq = seq
        self.holes: dict[int, float] = {}  # number -> clock time it was first missed

    def queries(self, columns: str) -> list[tuple[str, list[Any]]]:
        """The SELECTs (text, params) that fetch what is new: numbers above `seq`, then the open gaps."""
        out = [(f"SELECT {columns} FROM authz_events WHERE seq > ? ORDER BY seq", [self.seq])]
        if self.holes:
            late = sorted(self.holes)[:ASK_AT_ONCE]
            out.append((f"SELECT {columns} FROM authz_events WHERE seq IN ({', '.join('?' * len(late))})", late))
        return out

    def advance(self, events: Iterable[Mapping[str, Any]], now: float) -> list[Mapping[str, Any]]:
        """Record `events` (the rows of `queries`) as applied; returns them in number order. Call it once the
        caller has acted on them: a pass that failed is asked for again."""
        ordered = sorted(events, key=lambda e: e["seq"])
        seen = {e["seq"] for e in ordered}
        self.holes = {n: t for n, t in self.holes.items() if n not in seen and now - t < HOLE_WAIT}
        expected = self.seq + 1
        for n in sorted(seen):
            if n > self.seq:
                self.holes.update((m, now) for m in range(expected, min(n, expected + MAX_GAP)))
                expected = n + 1
        if ordered:
            self.seq = max(self.seq, ordered[-1]["seq"])
        return ordered
