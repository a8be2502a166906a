"""Observability benchmarks with 1M devices registered: a Prometheus /metrics scrape and the certificate expiry report.

``python -m bench.metrics_bench [--quick]`` prints a result table; ``run(quick)`` returns the rows. Everything goes
through a real ``tessera-hub serve`` over real TLS with an ``admin`` service identity (as bench/api_bench.py).

Setup: a fleet from ``tessera-hub init`` with one enrolled control device; ``serve`` once (the API applies the
metrics count tables, their triggers and the report index), then, the hub stopped, bench/api_bench.py's ``_fill``
adds 1M devices (quick 100k) with an active certificate each (plain SQL: the triggers count every row, which is
part of the fill time). The certificates are then spread like a healthy fleet that renews at 2/3 of a 30-day
lifetime: ages uniform over 0-20 days, and 1 in 1000 failing (ages 20-40 days: past the renewal point, some
expired); 9 in 10 devices online. Then ``serve`` again on that registry.

1. ``GET /metrics``: 200 scrapes (quick 50), one at a time on a keep-alive connection; nearest-rank p50 / p99,
   goal p99 <= 50 ms at 1M. For scale, the same counts as plain GROUP BY / COUNT queries (what the collector did
   before the count tables) are timed on the registry file directly.
2. ``GET /api/v1/reports/expiring?days=14``: the default report (the failing devices only; the window also holds
   ~20% of the fleet that will renew by itself, walked on the covering index) first page of 100, p50 / p99 over
   30 requests (quick 10), goal p99 <= 250 ms; every page to the end (count and time); the first page with
   include_due=true.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.api_bench import ADMIN, Api, _fill, _set_api_port  # noqa: E402
from bench.broker_bench import MQTT_LIMITS, _pct, _row  # noqa: E402
from bench.fleet import LENIENT, HubProcess, enroll, free_port, hub  # noqa: E402

FLEET = "acme"
REPORT = "/api/v1/reports/expiring"
#: the certificates of big-* devices: ages over 0-20 days (1 in 1000: 20-40 days), a 30-day lifetime
_SPREAD = """UPDATE certificates SET not_before = ts(julianday(?) - age(rowid)),
    not_after = ts(julianday(?) - age(rowid) + 30) WHERE device_id LIKE 'big-%'"""


@dataclass
class Settings:
    big_devices: int = 1_000_000
    scrapes: int = 200
    report_requests: int = 30


def _settings(quick: bool) -> Settings:
    return Settings(big_devices=100_000, scrapes=50, report_requests=10) if quick else Settings()


@dataclass
class Report:
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def _make_fleet(tmp: Path, api_port: int) -> tuple[Path, list[tuple[str, str]]]:
    """bench/fleet.py's make_fleet with the API port set before the first command that talks to the API (token
    create is a client of the local hub's API: another hub on the default port must not answer it)."""
    import csv
    import re

    hub_dir = tmp / "hub"
    hub(["init", "--fleet", FLEET], hub_dir)
    _set_api_port(hub_dir, api_port)
    toml = hub_dir / "fleet.toml"
    text = toml.read_text()
    for key, value in (*LENIENT, *MQTT_LIMITS):
        text, count = re.subn(rf"^{key}\s*=.*$", f"{key} = {value}", text, flags=re.M)
        if count != 1:
            raise RuntimeError(f"fleet.toml has no single {key} line to set")
    toml.write_text(text)
    hub(["token", "create", "--count", "1", "--prefix", "ctl", "--out", str(tmp / "tokens.csv")], hub_dir)
    with open(tmp / "tokens.csv", newline="") as fh:
        return hub_dir, [(r["device_id"], r["token"]) for r in csv.DictReader(fh)]


def _ts_sql(jd: float) -> str:
    """A julian day as the registry's timestamp text (hub/registry/store.py `_ts`)."""
    dt = datetime.fromtimestamp((jd - 2440587.5) * 86400, timezone.utc)
    return dt.isoformat(timespec="microseconds")


def _age(rowid: int) -> float:
    return (20 + (rowid % 20011) / 1000.0) if rowid % 1000 == 7 else (rowid % 20011) / 1000.0


def _shape(registry: Path, now: datetime) -> dict:
    """Spread the big devices' certificates and presence (hub stopped; the count triggers follow)."""
    t0 = time.monotonic()
    db = sqlite3.connect(registry, isolation_level=None)
    try:
        db.create_function("ts", 1, _ts_sql, deterministic=True)
        db.create_function("age", 1, _age, deterministic=True)
        db.execute("BEGIN")
        db.execute(_SPREAD, [now.isoformat(), now.isoformat()])
        db.execute("UPDATE devices SET online = 1, last_seen = ? WHERE id LIKE 'big-%' AND id NOT LIKE '%3'",
                   [now.isoformat(timespec="microseconds")])
        db.execute("COMMIT")
    finally:
        db.close()
    return {"seconds": time.monotonic() - t0}


def _naive_scrape_ms(registry: Path, now: datetime) -> float:
    """The counts as full GROUP BY / COUNT queries over the indexes (no count tables), one run, in ms."""
    from datetime import timedelta

    from hub.registry.store import _ts

    db = sqlite3.connect(f"file:{registry}?mode=ro", uri=True)
    try:
        t0 = time.perf_counter()
        db.execute("SELECT status, COUNT(*) FROM devices GROUP BY status").fetchall()
        db.execute("SELECT COUNT(*) FROM devices WHERE online = 1").fetchall()
        for days in (7, 30):
            db.execute("SELECT COUNT(*) FROM certificates WHERE status = 'active' AND not_after > ? AND "
                       "not_after <= ?", [_ts(now), _ts(now + timedelta(days=days))]).fetchall()
        return (time.perf_counter() - t0) * 1000
    finally:
        db.close()


def _timed(api: Api, conn, path: str, n: int, check) -> tuple[list[float], list[str]]:
    times, errors = [], []
    for i in range(n + 3):  # 3 warm-up requests
        t0 = time.perf_counter()
        status, body = api.call(conn, "GET", path)
        ms = (time.perf_counter() - t0) * 1000
        problem = check(status, body)
        if problem:
            errors.append(problem)
        if i >= 3:
            times.append(ms)
    return times, errors


def _metrics_check(expected_active: int):
    def check(status: int, body: bytes) -> str | None:
        if status != 200:
            return f"{status} {body[:200]!r}"
        text = body.decode()
        line = next((ln for ln in text.splitlines() if ln.startswith('tessera_devices{status="active"}')), "")
        if not line or int(float(line.split()[-1])) != expected_active:
            return f"active count {line!r}, expected {expected_active}"
        return None
    return check


def _report_check(status: int, body: bytes) -> str | None:
    if status != 200:
        return f"{status} {body[:200]!r}"
    page = json.loads(body)
    if any(i["verdict"] == "renewal_due" for i in page["items"]) or not page["items"]:
        return f"unexpected page: {len(page['items'])} items"
    return None


def measure(quick: bool = False, s: Settings | None = None) -> Report:
    s = s or _settings(quick)
    rep = Report()
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="tessera-metrics-bench-"))
    hub_proc: HubProcess | None = None
    try:
        api_port = free_port()
        hub_dir, control_rows = _make_fleet(tmp, api_port)
        hub_proc = HubProcess(hub_dir)
        hub_proc.start()
        hub(["identity", "add", ADMIN, "--role", "admin"], hub_dir)
        (work := tmp / "devices").mkdir()
        enroll(hub_proc, control_rows, work)
        rep.notes += hub_proc.shutdown()
        hub_proc = None

        size = f"{s.big_devices // 1000}k" if s.big_devices < 1_000_000 else f"{s.big_devices / 1e6:g}M"
        built = _fill(hub_dir, tmp, s.big_devices)
        rep.rows.append(_row(f"fill registry with {size} devices, count triggers on (s)", built["seconds"], "info",
                             None))
        now = datetime.now(timezone.utc)
        shaped = _shape(hub_dir / "registry.sqlite3", now)
        rep.notes.append(f"certificates spread and presence set in {shaped['seconds']:.1f} s (triggers on)")
        registry = hub_dir / "registry.sqlite3"
        with contextlib.closing(sqlite3.connect(registry)) as db:
            expected_active = db.execute("SELECT COUNT(*) FROM devices WHERE status = 'active'").fetchone()[0]
        naive = [_naive_scrape_ms(registry, now) for _ in range(3)]
        rep.rows.append(_row(f"  the same counts as GROUP BY / COUNT queries, {size} (ms, best of 3)", min(naive),
                             "info", None))

        hub_proc = HubProcess(hub_dir)
        t0 = time.monotonic()
        hub_proc.start(timeout=300)
        rep.notes.append(f"serve ready on the {size} registry in {time.monotonic() - t0:.1f} s")
        api = Api(hub_dir, api_port)
        conn = api.connection()
        try:
            ms, errors = _timed(api, conn, "/metrics", s.scrapes, _metrics_check(expected_active))
            p99 = _pct(ms, 0.99)
            rep.rows.append(_row(f"GET /metrics, {size} devices p50 (ms, n={len(ms)})", _pct(ms, 0.5), "info", None))
            rep.rows.append(_row(f"GET /metrics, {size} devices p99 (ms, n={len(ms)})", p99, "<= 50 ms",
                                 not errors and p99 <= 50))
            rep.notes.append(f"metrics: errors {errors[:3]}")

            ms, errors = _timed(api, conn, f"{REPORT}?days=14&limit=100", s.report_requests, _report_check)
            p99 = _pct(ms, 0.99)
            rep.rows.append(_row(f"expiry report days=14 first page, {size} p50 (ms, n={len(ms)})", _pct(ms, 0.5),
                                 "info", None))
            rep.rows.append(_row(f"expiry report days=14 first page, {size} p99 (ms, n={len(ms)})", p99,
                                 "<= 250 ms", not errors and p99 <= 250))
            rep.notes.append(f"report: errors {errors[:3]}")

            t0 = time.perf_counter()
            listed, pages, cursor = 0, 0, None
            while True:
                status, body = api.call(conn, "GET", f"{REPORT}?days=14&limit=1000"
                                                      + (f"&cursor={cursor}" if cursor else ""))
                if status != 200:
                    raise RuntimeError(f"report page: {status} {body[:200]!r}")
                page = json.loads(body)
                listed, pages, cursor = listed + len(page["items"]), pages + 1, page["next_cursor"]
                if cursor is None:
                    break
            rep.rows.append(_row(f"  every page of it ({listed} devices, {pages} pages) (s)",
                                 time.perf_counter() - t0, "info", None))
            ms, _ = _timed(api, conn, f"{REPORT}?days=14&limit=100&include_due=true", 3,
                           lambda status, body: None if status == 200 else f"{status}")
            rep.rows.append(_row("  include_due=true first page (ms, median of 3)", sorted(ms)[1], "info", None))
        finally:
            conn.close()
    finally:
        if hub_proc is not None:
            rep.notes += hub_proc.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    rep.wall_s = time.monotonic() - started
    return rep


def run(quick: bool = False) -> list[dict]:
    """Run the benchmark; rows {"metric", "value", "goal", "pass"} (pass is None for "info" rows)."""
    rep = measure(quick)
    for note in rep.notes:
        print(f"[bench metrics] {note}", file=sys.stderr, flush=True)
    return rep.rows


def main(argv: list[str] | None = None) -> int:
    from bench.broker_bench import print_report

    parser = argparse.ArgumentParser(prog="python -m bench.metrics_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 100k-device registry, fewer requests")
    args = parser.parse_args(argv)
    rep = measure(args.quick)
    print_report(rep)
    return 0 if all(r["pass"] is not False for r in rep.rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
