"""The fleet metrics and the console's registry data on both dialects: the count tables kept by triggers equal a
fresh COUNT(*) after every kind of change, on SQLite and on a real PostgreSQL (pgfixtures); two hubs (two Registry
objects on one PostgreSQL database) writing at once leave them exact; the console's presence history is idempotent.

Every read goes through `Registry.query`; the only dialect-specific SQL here is the catalog lookup of the triggers.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from hub.api import metrics
from hub.api.console import data
from hub.registry.store import DEVICE_STATUSES, Registry, _ts
from tests.integration.pgfixtures import any_registry, pg_server, pg_url, registry_target  # noqa: F401
from tests.unit.test_registry import TTL, Clock, MiniCA, clock, mini_ca  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration
TRIGGERS = {"metrics_devices_insert", "metrics_devices_delete", "metrics_devices_status", "metrics_devices_online",
            "metrics_certs_insert", "metrics_certs_delete", "metrics_certs_leave", "metrics_certs_enter"}


def _triggers(reg: Registry) -> list[str]:
    if reg.dialect == "postgresql":
        rows = reg.query("SELECT tgname AS name FROM pg_trigger WHERE NOT tgisinternal AND tgname LIKE 'metrics%'")
    else:
        rows = reg.query("SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'metrics%'")
    return sorted(r["name"] for r in rows)


def _fresh(reg: Registry) -> tuple[dict[str, int], dict[str, int]]:
    """(the device counts, the active certificates by expiry hour) counted now, without the count tables."""
    counts = {f"status:{r['status']}": int(r["n"])
              for r in reg.query("SELECT status, COUNT(*) AS n FROM devices GROUP BY status")}
    counts["online"] = int(reg.query("SELECT COUNT(*) AS n FROM devices WHERE online = 1")[0]["n"])
    hours = {r["hour"]: int(r["n"]) for r in reg.query(
        "SELECT substr(not_after, 1, 13) AS hour, COUNT(*) AS n FROM certificates WHERE status = 'active' "
        "GROUP BY substr(not_after, 1, 13)")}
    return counts, hours


def _kept(reg: Registry) -> tuple[dict[str, int], dict[str, int]]:
    """The same from the tables the triggers keep (rows counted down to 0 left out, as a fresh count has none),
    after the fold of the pending deltas (PostgreSQL) that every reader of the tables does first."""
    metrics.fold(reg)
    counts = {"online": 0} | {r["key"]: int(r["n"]) for r in reg.query("SELECT key, n FROM metrics_counts") if r["n"]}
    hours = {r["hour"]: int(r["n"]) for r in reg.query("SELECT hour, n FROM metrics_expiry WHERE n != 0")}
    return counts, hours


def _collect(reg: Registry, now, tmp_path: Path) -> dict:
    api = SimpleNamespace(registry=reg, clock=lambda: now, live=SimpleNamespace(admin=None),
                          cfg=SimpleNamespace(crl_dir=tmp_path / "crl"))
    return {f.name: f for f in metrics.FleetCollector(api).collect()}


def _enroll(reg: Registry, ca: MiniCA, now, device_id: str, token: str, days: float) -> None:
    reg.enroll(device_id, token, now, ca.issuer(device_id, now, days))


def test_counts_follow_every_change(any_registry, mini_ca: MiniCA, clock: Clock, tmp_path: Path):  # noqa: F811
    reg, now = any_registry, clock.now
    rows = reg.create_devices_with_tokens([(f"m-{i:02d}", None, None) for i in range(12)], "acme", now, TTL)
    metrics.apply_schema(reg, now)
    assert metrics.apply_schema(reg, now) is False  # twice: the same triggers, once each, no rule added again
    assert _triggers(reg) == sorted(TRIGGERS)
    tokens = dict(rows)
    for i in range(8):  # expiry hours spread over the 7 and 30 day windows and beyond
        _enroll(reg, mini_ca, now, f"m-{i:02d}", tokens[f"m-{i:02d}"], (0.5, 2, 2, 6.99, 7.5, 20, 31, 90)[i])
    old = reg.certificates_of("m-01")[0]["serial"]
    reg.reenroll("m-01", old, now, mini_ca.issuer("m-01", now, 29))  # old: superseded, new one active
    _enroll(reg, mini_ca, now, "m-02", reg.create_token("m-02", now, TTL), 3)  # a token re-enrollment
    for i in (0, 1, 2, 3, 8):
        reg.mark_presence(f"m-{i:02d}", True, now)
    reg.mark_presence("m-03", False, now)
    reg.mark_presence("m-03", False, now)  # already offline: nothing written, nothing counted
    reg.set_status("m-04", "suspended", now, "ops")
    reg.set_status("m-05", "revoked", now, "ops")  # its certificate revoked too
    reg.set_status("m-09", "suspended", now, "ops")
    reg.set_status("m-09", "active", now, "ops")  # never enrolled: back to pending
    reg.decommission("m-00", now, "ops")  # offline, certificate revoked
    with reg.write() as db:  # another writer (the CLI, a migration) changes the rows directly
        db.execute("UPDATE certificates SET not_after = ? WHERE device_id = 'm-06' AND status = 'active'",
                   [_ts(now + timedelta(days=3, hours=5))])
        db.execute("UPDATE devices SET status = 'suspended', online = 0 WHERE id = 'm-02'")  # both at once
        db.execute("DELETE FROM certificates WHERE device_id = 'm-07'")
        db.execute("UPDATE devices SET status = 'pending' WHERE id = 'm-07'")
        db.execute("DELETE FROM tokens WHERE device_id IN ('m-08', 'm-11')")
        db.execute("DELETE FROM devices WHERE id IN ('m-08', 'm-11')")  # m-08 was online
    fresh = _fresh(reg)
    assert _kept(reg) == fresh
    assert fresh[0] == {"status:pending": 3, "status:active": 3, "status:suspended": 2, "status:revoked": 1,
                        "status:decommissioned": 1, "online": 1}  # the test's own arithmetic, for the record
    families = _collect(reg, now, tmp_path)
    assert {s.labels["status"]: s.value for s in families["tessera_devices"].samples if s.value} == \
        {k.split(":", 1)[1]: v for k, v in fresh[0].items() if k != "online"}
    assert families["tessera_devices_online"].samples[0].value == 1
    for days in metrics.EXPIRY_WINDOWS:
        exact = reg.query("SELECT COUNT(*) AS n FROM certificates WHERE status = 'active' AND not_after > ? "
                          "AND not_after <= ?", [_ts(now), _ts(now + timedelta(days=days))])[0]["n"]
        assert metrics.expiring(reg, now, now + timedelta(days=days)) == exact
        assert {s.labels["within"]: s.value for s in families["tessera_certificates_expiring"].samples}[
            f"{days}d"] == exact
        assert data.expiring(reg, now, days) == exact
    assert data.device_counts(reg) == {**{s: fresh[0].get(f"status:{s}", 0) for s in DEVICE_STATUSES},
                                       "online": 1}


def test_counts_are_rebuilt_at_start(any_registry, mini_ca: MiniCA, clock: Clock):  # noqa: F811
    """Counts left wrong by a writer that bypassed the triggers are right again after apply_schema (every start)."""
    reg, now = any_registry, clock.now
    metrics.apply_schema(reg, now)
    rows = reg.create_devices_with_tokens([(f"r-{i}", None, None) for i in range(4)], "acme", now, TTL)
    for device_id, token in rows[:2]:
        _enroll(reg, mini_ca, now, device_id, token, 10)
    metrics.fold(reg)
    with reg.write() as db:
        db.execute("UPDATE metrics_counts SET n = n + 7")
        db.execute("UPDATE metrics_expiry SET n = 0")
    assert _kept(reg) != _fresh(reg)
    metrics.apply_schema(reg, now)
    assert _kept(reg) == _fresh(reg)


def test_two_hubs_writing_at_once_keep_exact_counts(pg_url: str, tmp_path: Path, mini_ca: MiniCA,  # noqa: F811
                                                   clock: Clock):  # noqa: F811
    """Two Registry objects on one PostgreSQL database (two hubs), four threads each: enrollments (the write
    lock taken shared: they run at once), presence changes (autocommit, no lock at all), suspend/resume (the
    write lock exclusive) and scrapes (each folds the pending deltas, so folds race each other and the writers).
    Every change is counted once: the count tables equal a fresh count."""
    now = clock.now
    hubs = [Registry(pg_url, home=tmp_path), Registry(pg_url, home=tmp_path)]
    try:
        starts = [threading.Thread(target=metrics.apply_schema, args=(h, now)) for h in hubs]  # both hubs start
        for t in starts:
            t.start()
        for t in starts:
            t.join(60)
        assert _triggers(hubs[0]) == sorted(TRIGGERS)
        rows = hubs[0].create_devices_with_tokens([(f"c-{i:03d}", None, None) for i in range(60)], "acme", now, TTL)
        barrier, errors, done = threading.Barrier(8), [], threading.Event()

        def guarded(fn, *args) -> None:
            barrier.wait()
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001  (reported by the assertion)
                errors.append(repr(exc))

        def enroll(reg: Registry, part: list[tuple[str, str]]) -> None:
            for n, (device_id, token) in enumerate(part):
                _enroll(reg, mini_ca, now, device_id, token, 7 + n % 3)  # a few shared expiry hours: hot rows

        def presence(reg: Registry, ids: list[str]) -> None:
            for _ in range(5):
                for device_id in ids:
                    reg.mark_presence(device_id, True, now)
                for device_id in ids[::2]:
                    reg.mark_presence(device_id, False, now)

        def suspend_resume(reg: Registry, ids: list[str]) -> None:
            for device_id in ids:
                reg.set_status(device_id, "suspended", now, "ops")
                reg.set_status(device_id, "active", now, "ops")

        def scrape(reg: Registry) -> None:
            while not done.is_set():
                _collect(reg, now, tmp_path)

        ids = [device_id for device_id, _ in rows]
        work = [(enroll, hubs[0], rows[:25]), (enroll, hubs[1], rows[25:50]),
                (presence, hubs[0], ids[:30]), (presence, hubs[1], ids[30:]),
                (suspend_resume, hubs[0], ids[50:55]), (suspend_resume, hubs[1], ids[55:])]
        threads = [threading.Thread(target=guarded, args=w) for w in work]
        scrapers = [threading.Thread(target=guarded, args=(scrape, h)) for h in hubs]
        for t in threads + scrapers:
            t.start()
        for t in threads:
            t.join(120)
        done.set()
        for t in scrapers:
            t.join(60)
        assert errors == []
        fresh = _fresh(hubs[1])
        assert fresh[0]["status:active"] == 50 and fresh[0]["online"] == 30  # the work really ran
        assert sum(fresh[1].values()) == 50
        assert _kept(hubs[0]) == fresh
    finally:
        for h in hubs:
            h.close()


def test_job_metrics_and_jobs_tables_of_another_shape(any_registry, clock: Clock, tmp_path: Path):  # noqa: F811
    reg, now = any_registry, clock.now
    metrics.apply_schema(reg, now)
    assert _collect(reg, now, tmp_path)["tessera_job_devices"].samples == []  # no jobs tables
    with reg.write() as db:  # a shape without per-state counters: the job's devices are counted
        db.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, name TEXT, state TEXT)")
        db.execute("CREATE TABLE job_devices (job_id INTEGER, device_id TEXT, state TEXT)")
        db.execute("INSERT INTO jobs VALUES (1, 'reboot', 'running'), (2, 'old', 'completed')")
        db.execute("INSERT INTO job_devices VALUES (1, 'a', 'acked'), (1, 'b', 'acked'), (1, 'c', 'sent'), "
                   "(2, 'd', 'acked')")
    samples = _collect(reg, now, tmp_path)["tessera_job_devices"].samples
    assert sorted((s.labels["job_id"], s.labels["state"], s.value) for s in samples) == [("1", "acked", 2),
                                                                                     ("1", "sent", 1)]
    with reg.write() as db:  # a shape this code cannot read: no job metrics, the rest of the scrape stands
        db.execute("ALTER TABLE job_devices RENAME COLUMN state TO phase")
    families = _collect(reg, now, tmp_path)
    assert families["tessera_job_devices"].samples == []
    assert families["tessera_devices"].samples  # the scrape went on
    assert reg.query("SELECT COUNT(*) AS n FROM jobs")[0]["n"] == 2  # the connection is fine after the error


def test_console_presence_and_chart(any_registry, clock: Clock):  # noqa: F811
    reg, now = any_registry, clock.now
    data.apply_schema(reg)
    data.apply_schema(reg)  # idempotent
    seen = [{"id": "p-1", "last_seen": _ts(now - timedelta(minutes=m)), "online": m % 2 == 0} for m in range(3)]
    data.record_presence(reg, seen, now)
    data.record_presence(reg, seen[:2] + [{"id": "p-2", "last_seen": _ts(now), "online": True}], now)  # again
    assert reg.query("SELECT COUNT(*) AS n FROM console_presence")[0]["n"] == 4  # each (device, at) once
    assert data.presence_history(reg, "p-1") == [{"at": r["last_seen"], "online": int(r["online"])} for r in seen]
    later = now + data.PRESENCE_KEPT + timedelta(minutes=5)
    data.record_presence(reg, [{"id": "p-3", "last_seen": _ts(later), "online": False}], later)  # old rows pruned
    assert [r["device_id"] for r in reg.query("SELECT device_id FROM console_presence")] == ["p-3"]
    reg.create_devices_with_tokens([("e-1", None, None)], "acme", now, TTL)
    reg.audit("enroll", "denied", now - timedelta(hours=2), device_id="e-1")
    reg.audit("enroll", "ok", now, device_id="e-1")
    reg.audit("reenroll", "ok", now, device_id="e-1")
    chart = data.est_chart(reg, now)
    assert len(chart) == data.CHART_HOURS and chart[-1] == {"hour": _ts(now)[:13], "ok": 2, "denied": 0}
    assert chart[-3] == {"hour": _ts(now - timedelta(hours=2))[:13], "ok": 0, "denied": 1}
    assert sum(p["ok"] + p["denied"] for p in chart) == 3
    assert data.device_counts(reg)["pending"] == 1  # without the metrics schema: indexed counts
