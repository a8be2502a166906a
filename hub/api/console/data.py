"""The console's reads that the JSON API has no route for: overview counts, the enroll chart, presence history, the
last telemetry of each device. Every query is bounded by an index (no full scan on a page load at 1M devices).

- counts by status / online: the `metrics_counts` table hub/api/metrics.py keeps by triggers (O(1)); the expiry
  windows: `metrics.expiring` (hourly buckets); both fall back to indexed counts where the metrics schema is absent;
- enrollments and denials over 24 h: `audit(action, id)` ranges for the EST actions, bounded below by the first
  row id of the window (`audit(at)`);
- presence history: `console_presence`, one row per presence change the console's feed saw (hub/api/console/feed.py
  follows `devices(last_seen)`), pruned after PRESENCE_KEPT;
- last telemetry: kept in memory (`TelemetryTap`, the newest payload of up to TAP_DEVICES devices) since the hub
  started; the registry stores no telemetry.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from datetime import datetime, timedelta
from typing import Any, Callable

from hub.registry import sql as dbsql
from hub.registry.store import DEVICE_STATUSES, Registry, _ts

CONSOLE_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS console_presence (device_id TEXT NOT NULL, at TEXT NOT NULL,
        online INTEGER NOT NULL, PRIMARY KEY (device_id, at)) WITHOUT ROWID""",
    """CREATE INDEX IF NOT EXISTS console_presence_at ON console_presence(at)""",
)
#: The same on PostgreSQL (no WITHOUT ROWID: the primary key is a btree beside the heap there).
PG_CONSOLE_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS console_presence (device_id TEXT NOT NULL, at TEXT NOT NULL,
        online INTEGER NOT NULL, PRIMARY KEY (device_id, at))""",
    CONSOLE_SCHEMA[1],
)
PRESENCE_KEPT = timedelta(days=30)
TAP_DEVICES = 10_000
TAP_BYTES = 4096
EST_ACTIONS = ("enroll", "reenroll")
CHART_HOURS = 24


def apply_schema(registry: Registry) -> None:
    pg = registry.dialect == dbsql.POSTGRESQL
    with registry.write() as db:
        for statement in PG_CONSOLE_SCHEMA if pg else CONSOLE_SCHEMA:
            db.execute(statement)
    from hub.api import auditroutes

    auditroutes.apply_schema(registry)  # audit(action, id), audit(at): the chart and the audit page use them


def _has_table(registry: Registry, name: str) -> bool:
    if registry.dialect == dbsql.POSTGRESQL:
        return bool(registry.query("SELECT 1 AS one FROM pg_catalog.pg_tables WHERE schemaname = current_schema() "
                                   "AND tablename = ?", [name]))
    return bool(registry.query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", [name]))


def device_counts(registry: Registry) -> dict[str, int]:
    """{'pending': n, ..., 'online': n}: from metrics_counts (kept by triggers), else one indexed count each."""
    if _has_table(registry, "metrics_counts"):
        from hub.api.metrics import fold

        fold(registry)  # PostgreSQL: the triggers' pending deltas into the count tables
        counts = {r["key"]: r["n"] for r in registry.query("SELECT key, n FROM metrics_counts")}
        out = {s: int(counts.get(f"status:{s}", 0)) for s in DEVICE_STATUSES}
        out["online"] = int(counts.get("online", 0))
        return out
    out = {s: registry.query("SELECT COUNT(*) AS n FROM devices WHERE status = ?", [s])[0]["n"]
           for s in DEVICE_STATUSES}
    out["online"] = registry.query("SELECT COUNT(*) AS n FROM devices WHERE online = 1")[0]["n"]
    return out


def expiring(registry: Registry, now: datetime, days: int) -> int:
    try:
        from hub.api.metrics import expiring as bucketed
        from hub.api.metrics import fold

        if _has_table(registry, "metrics_expiry"):
            fold(registry)
            return bucketed(registry, now, now + timedelta(days=days))
    except ImportError:
        pass
    return registry.query("SELECT COUNT(*) AS n FROM certificates WHERE status = 'active' AND not_after > ? "
                          "AND not_after <= ?", [_ts(now), _ts(now + timedelta(days=days))])[0]["n"]


def est_chart(registry: Registry, now: datetime, hours: int = CHART_HOURS) -> list[dict[str, Any]]:
    """[{hour: '2027-01-31T05', ok: n, denied: n}] for the last `hours` hours, oldest first (enroll + reenroll)."""
    start = (now - timedelta(hours=hours - 1)).replace(minute=0, second=0, microsecond=0)
    first = registry.query("SELECT id FROM audit WHERE at >= ? ORDER BY at LIMIT 1", [_ts(start)])
    buckets = {_ts(start + timedelta(hours=h))[:13]: {"ok": 0, "denied": 0} for h in range(hours)}
    if first:
        marks = ",".join("?" for _ in EST_ACTIONS)
        rows = registry.query(f"SELECT substr(at, 1, 13) AS hour, outcome, COUNT(*) AS n FROM audit "
                              f"WHERE action IN ({marks}) AND id >= ? GROUP BY hour, outcome",
                              [*EST_ACTIONS, first[0]["id"]])
        for r in rows:
            if r["hour"] in buckets and r["outcome"] in ("ok", "denied"):
                buckets[r["hour"]][r["outcome"]] += r["n"]
    return [{"hour": h, **v} for h, v in buckets.items()]


def chart_bars(points: list[dict[str, Any]], width: int = 480, height: int = 120) -> dict[str, Any]:
    """SVG geometry for a two-series bar chart (ok up, denied stacked on top), computed here: the page needs no
    script and no inline style for it."""
    top = max([p["ok"] + p["denied"] for p in points] + [1])
    slot = width / max(len(points), 1)
    bars = []
    for i, p in enumerate(points):
        ok_h = p["ok"] / top * (height - 14)
        den_h = p["denied"] / top * (height - 14)
        x = round(i * slot + 1, 1)
        bars.append({"x": x, "w": round(max(slot - 2, 1), 1), "ok_y": round(height - ok_h, 1),
                     "ok_h": round(ok_h, 1), "den_y": round(height - ok_h - den_h, 1), "den_h": round(den_h, 1),
                     "label": f"{p['hour'][11:13]}:00 UTC: {p['ok']} ok, {p['denied']} denied"})
    return {"width": width, "height": height, "top": top, "bars": bars,
            "first": points[0]["hour"][11:13] + ":00" if points else "", "total_ok": sum(p["ok"] for p in points),
            "total_denied": sum(p["denied"] for p in points)}


def crl_age(cfg, now: datetime, cache: dict) -> dict[str, Any] | None:
    """The device CRL's lastUpdate / nextUpdate and age in seconds (parsed again only when the file changes)."""
    try:
        from hub.api.metrics import CRL_FILES, _CrlTimes
    except ImportError:
        return None
    times = cache.setdefault("crl", _CrlTimes()).get(cfg.crl_dir / CRL_FILES["device"])
    if times is None:
        return None
    last, nxt = times
    return {"last_update": _ts(last), "age_s": int((now - last).total_seconds()),
            "next_update": _ts(nxt) if nxt else None, "overdue": bool(nxt and nxt < now)}


def active_jobs(registry: Registry, limit: int = 5) -> list[dict[str, Any]]:
    if not _has_table(registry, "jobs"):
        return []
    from hub.jobs import store

    items, _ = store.list_jobs(registry, limit)
    return items


# --- presence history -------------------------------------------------------------------------------------------

def record_presence(registry: Registry, rows: list[dict[str, Any]], now: datetime) -> None:
    """Presence changes the feed saw (device_id, at, online), one transaction; rows older than PRESENCE_KEPT go."""
    if not rows:
        return
    with registry.write() as db:
        dbsql.executemany(db, "INSERT INTO console_presence (device_id, at, online) VALUES (?, ?, ?) "
                          "ON CONFLICT DO NOTHING", [(r["id"], r["last_seen"], int(r["online"])) for r in rows])
        db.execute("DELETE FROM console_presence WHERE at < ?", [_ts(now - PRESENCE_KEPT)])


def presence_history(registry: Registry, device_id: str, limit: int = 50) -> list[dict[str, Any]]:
    if not _has_table(registry, "console_presence"):  # the feed never ran on this registry
        return []
    return registry.query("SELECT at, online FROM console_presence WHERE device_id = ? ORDER BY at DESC LIMIT ?",
                          [device_id, limit])


# --- last telemetry ---------------------------------------------------------------------------------------------

class TelemetryTap:
    """The newest telemetry payload of each device (LRU, TAP_DEVICES devices, TAP_BYTES each), fed by chaining the
    admin MQTT session's `on_device_message` (the hub's own subscription; nothing new on the broker)."""

    def __init__(self) -> None:
        self._last: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._lock = threading.Lock()

    def attach(self, live, clock: Callable[[], datetime]) -> None:
        admin = getattr(live, "admin", None)
        if admin is None or getattr(admin.on_device_message, "_console_tap", False):
            return
        inner = admin.on_device_message

        def tapped(device_id: str, kind: str, payload: bytes) -> None:
            if kind == "telemetry":
                self.put(device_id, payload, clock())
            inner(device_id, kind, payload)

        tapped._console_tap = True  # type: ignore[attr-defined]
        admin.on_device_message = tapped

    def put(self, device_id: str, payload: bytes, now: datetime) -> None:
        text = payload[:TAP_BYTES].decode("utf-8", "replace")
        with self._lock:
            self._last[device_id] = (_ts(now), text)
            self._last.move_to_end(device_id)
            while len(self._last) > TAP_DEVICES:
                self._last.popitem(last=False)

    def get(self, device_id: str) -> dict[str, str] | None:
        with self._lock:
            hit = self._last.get(device_id)
        return {"at": hit[0], "payload": hit[1]} if hit else None
