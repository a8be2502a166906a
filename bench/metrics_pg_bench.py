"""The fleet metrics on a PostgreSQL registry: what the tally triggers cost writers, and what a scrape costs.

`python -m bench.metrics_pg_bench [--quick]` (not yet in bench/__main__.py MODULES). A durable PostgreSQL of its own
(fsync and synchronous_commit on; tests/integration/pgfixtures.py), the registry schema, the API's indexes
(hub/api/queries.py) and then:

1. fill: N devices (1M, quick 100k; 9 in 10 active and online) and an active certificate each (expiries spread
   over 30 days), plain `INSERT ... SELECT FROM generate_series` in one transaction, once into a database that has
   the metrics triggers (hub/api/metrics.py PG_METRICS_SCHEMA: every row also appends its delta rows) and once
   into one without; then `metrics.apply_schema` on the second (what the first `serve` start does: the triggers,
   the recount, the expiry buckets rebuilt), and again (a later start).
2. scrape: the first `FleetCollector.collect()` after the fill (it folds the fill's 3N deltas), then p50 / p99
   over 200 runs (quick 50; the registry-backed gauges of /metrics, without HTTP) before and after a VACUUM of the
   delta tables (until then each fold's DELETE walks the fill's dead delta rows; autovacuum frees them within a
   minute), beside the same numbers as plain GROUP BY / COUNT queries over the indexes (median of 5).
3. enrollments/s of two hubs (processes, bench/registry_pg_bench.py's `_measure`) on a database with the triggers
   and on one without (each enrollment appends 3 deltas: status:pending -1, status:active +1, its expiry hour).

A run at 1M here (2 shared cores, 2026-12-03): fill 59 s with the triggers / 55 s without; apply_schema 1.3 s
first, 0.57 s later; the first collect() 3.7 s (2.9M deltas folded); collect() p50 62 ms before the vacuum,
4.2 ms after (p99 72 ms, a loaded machine); the GROUP BY / COUNT equivalent 694 ms; 2 hubs 173 vs 191
enrollments/s (within this machine's run-to-run noise: the quick run had 239 vs 226).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.registry_pg_bench import T0, _measure  # noqa: E402

_TS = """to_char((?::timestamptz + make_interval(secs => {secs})) AT TIME ZONE 'UTC',
    'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')"""
_DEVICES = """INSERT INTO devices (id, fleet, status, labels, groups, created, last_seen, online)
    SELECT 'big-' || lpad(i::text, 7, '0'), 'bench', CASE WHEN i % 10 = 0 THEN 'pending' ELSE 'active' END,
        '{}', '[]', ?, ?, CASE WHEN i % 10 = 0 THEN 0 ELSE 1 END FROM generate_series(1, ?) AS g(i)"""
_CERTS = f"""INSERT INTO certificates (serial, device_id, subject, not_before, not_after, fingerprint_sha256, status,
        issued_at, pem)
    SELECT to_hex(i), 'big-' || lpad(i::text, 7, '0'), 'CN=big', ?, {_TS.format(secs='(i::bigint * 7919) % 2592000')},
        'f', 'active', ?, 'pem' FROM generate_series(1, ?) AS g(i)"""
_PLAIN = ("SELECT status, COUNT(*) AS n FROM devices GROUP BY status",
          "SELECT COUNT(*) AS n FROM devices WHERE online = 1")
_PLAIN_EXPIRY = "SELECT COUNT(*) AS n FROM certificates WHERE status = 'active' AND not_after > ? AND not_after <= ?"


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))]


def _fill(reg, n: int) -> float:
    from hub.registry.store import _ts

    at = _ts(T0)
    start = time.perf_counter()
    with reg.write() as db:
        db.execute(_DEVICES, [at, at, n])
        db.execute(_CERTS, [at, at, at, n])
    return time.perf_counter() - start


def _registry(server, name: str, home: Path):
    from hub.api import queries
    from hub.registry.store import Registry

    reg = Registry(server.url(server.create_database(name)), home=home)
    queries.apply_schema(reg)
    return reg


def run(quick: bool = False) -> list[dict]:
    from hub.api import metrics
    from hub.registry.store import _ts
    from tests.integration.pgfixtures import pg_running

    n, scrapes, enrolls = (100_000, 50, 300) if quick else (1_000_000, 200, 2000)
    rows: list[dict] = []

    def row(metric: str, value: float, unit: str = "") -> None:
        rows.append({"metric": metric, "value": value, "unit": unit, "goal": "", "pass": None})

    with tempfile.TemporaryDirectory(prefix="tessera-metricsbench-") as tmp, pg_running(durable=True) as server:
        home = Path(tmp)
        with_triggers = _registry(server, "fill_triggers", home)
        metrics.apply_schema(with_triggers, T0)
        fill_t = _fill(with_triggers, n)
        plain = _registry(server, "fill_plain", home)
        fill_p = _fill(plain, n)
        start = time.perf_counter()
        metrics.apply_schema(plain, T0)
        apply_s = time.perf_counter() - start
        start = time.perf_counter()
        metrics.apply_schema(plain, T0)  # a later start: the recount, the buckets' total checked
        again_s = time.perf_counter() - start
        plain.close()
        row(f"fill {n} devices + certificates, with the metrics triggers", fill_t, "s")
        row(f"fill {n} devices + certificates, without", fill_p, "s")
        row("metrics.apply_schema, first start after the fill (triggers, recount, buckets built)", apply_s, "s")
        row("metrics.apply_schema, a later start (recount, buckets checked)", again_s, "s")

        api = SimpleNamespace(registry=with_triggers, clock=lambda: T0, live=SimpleNamespace(admin=None),
                              cfg=SimpleNamespace(crl_dir=home / "crl"))
        collector = metrics.FleetCollector(api)
        start = time.perf_counter()
        list(collector.collect())
        row(f"the first collect() after the fill (folds {3 * n - n // 10} deltas)",
            time.perf_counter() - start, "s")

        def scrape(when: str) -> None:
            times = []
            for _ in range(scrapes):
                start = time.perf_counter()
                families = list(collector.collect())
                times.append(time.perf_counter() - start)
            got = {f.name: f for f in families}
            active = next(s.value for s in got["tessera_devices"].samples if s.labels["status"] == "active")
            if active != n - n // 10:  # the figure is of a scrape that counts right
                raise RuntimeError(f"tessera_devices{{status=active}} is {active}, not {n - n // 10}")
            row(f"collect() at {n} devices, {when}, p50", _pct(times, 50) * 1000, "ms")
            row(f"collect() at {n} devices, {when}, p99", _pct(times, 99) * 1000, "ms")

        # the fold's DELETE walks the delta tables' dead rows until (auto)vacuum frees them
        scrape("before the delta tables are vacuumed")
        db = with_triggers._db()  # noqa: SLF001  (VACUUM runs outside a transaction: the autocommit connection)
        for table in ("metrics_counts_delta", "metrics_expiry_delta"):
            db.execute(f"VACUUM {table}")  # what autovacuum does within autovacuum_naptime (1 min)
        scrape("vacuumed")
        plain_times = []
        for _ in range(5):
            start = time.perf_counter()
            for sql in _PLAIN:
                with_triggers.query(sql)
            for days in metrics.EXPIRY_WINDOWS:
                with_triggers.query(_PLAIN_EXPIRY, [_ts(T0), _ts(T0 + timedelta(days=days))])
            plain_times.append(time.perf_counter() - start)
        row(f"the same as GROUP BY / COUNT queries at {n} devices, median", statistics.median(plain_times) * 1000,
            "ms")
        with_triggers.close()

        def enrollments(name: str, triggers: bool) -> float:
            reg = _registry(server, name, home)
            if triggers:
                metrics.apply_schema(reg, T0)
            where = reg.url
            reg.close()
            return _measure(where, home, 2, enrolls)

        row("enrollments/s, 2 hubs, with the metrics triggers", enrollments("enroll_triggers", True), "/s")
        row("enrollments/s, 2 hubs, without", enrollments("enroll_plain", False), "/s")
    return rows


def main(argv: list[str] | None = None) -> int:
    from bench.__main__ import render

    parser = argparse.ArgumentParser(prog="python -m bench.metrics_pg_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k devices, 50 scrapes, 300 enrollments")
    args = parser.parse_args(argv)
    print(render(run(quick=args.quick)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
