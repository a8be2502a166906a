"""Fleet API benchmarks: a 10,000-device revoke by selector, and device list latency with 1M devices registered.

``python -m bench.api_bench [--quick]`` prints a result table; ``run(quick)`` returns the rows (dicts: metric,
value, goal, pass; "info" rows only report a number). Everything goes through a real ``tessera-hub serve`` over
real TLS, authenticated with an ``admin`` service identity's client certificate (``tessera-hub identity add``).

Setup (bench/fleet.py): a fleet from ``tessera-hub init`` with lenient rate limits and one ``token create`` device
(a control: enrolled and connected, in no group), the API on a free port (fleet.toml ``[api] port``). A group
``tenk`` of 10,000 devices is made with ``Registry.create_devices_with_tokens`` (one transaction); a handful of
them (1,000, quick 200) are enrolled through EST with their tokens. The hub is stopped and its registry filled with
1M devices (quick 100k) with an active certificate each: bench/broker_bench.py's ``build_big_registry`` (plain
SQL, executemany in one transaction, hub/registry/store.py's column formats), then one in a hundred of them set
suspended (so ``status=active`` is a real filter; a suspended device's certificate is a certificateHold CRL entry:
10k entries). Then ``serve`` starts again on that registry.

1. ``GET /api/v1/devices?status=active&limit=100`` (1000 requests, quick 300) over 4 keep-alive HTTPS
   connections in turn, one at a time; each: request sent to the whole body read (100 devices). Nearest-rank
   p50 / p99, goal p99 <= 50 ms. A connection that had to be reopened is counted (it would not be keep-alive).
2. Revoke by selector ``{"group": "tenk"}``: the enrolled members and the control hold live MQTT v5 sessions
   (raw TLS + CONNECT, bench/broker_bench.py); the dry run must say 10,000; then the confirmed POST. Wall time of
   the confirmed POST (sent to answer read) and time from sending it until every connected member's session is
   cut (the broker's DISCONNECT or the socket closing), goal <= 10 s each ("seconds, not hours"); the control's
   session must survive. The hub's own timings (registry transaction, total) are reported.

``--registry-url URL|auto [--devices N] [--requests R]``: only the device list's registry work (1. without HTTP and
TLS, in-process: ``queries.list_devices`` + the JSON body, sorted by id and by -last_seen) on a PostgreSQL registry
(``auto``: a throwaway durable server, tests/integration/pgfixtures.py) and on SQLite, both filled alike.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import ssl
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.broker_bench import (MQTT_LIMITS, _context, _mqtt_connect, _pct, _row,  # noqa: E402
                                build_big_registry)
from bench.fleet import HOST, Dev, HubProcess, enroll, free_port, hub, make_fleet  # noqa: E402

FLEET = "acme"
GROUP = "tenk"
ADMIN = "bench-admin"
LIST_PATH = "/api/v1/devices?status=active&limit=100"
REVOKE_PATH = "/api/v1/devices/actions/revoke"
SORTED_PATH = "/api/v1/devices?status=active&sort=-last_seen&limit=100"  # most recently seen first


@dataclass
class Settings:
    big_devices: int = 1_000_000
    group: int = 10_000
    connected: int = 1000  # enrolled members of the group with a live session (each one cut is timed)
    requests: int = 1000
    connections: int = 4


def _settings(quick: bool) -> Settings:
    if quick:
        return Settings(big_devices=100_000, connected=200, requests=300)
    return Settings()


@dataclass
class Report:
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0


class Api:
    """HTTPS to the fleet API with the admin identity's certificate; keep-alive connections."""

    def __init__(self, hub_dir: Path, port: int):
        self.port = port
        d = hub_dir / "identities" / ADMIN
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self.ctx.load_verify_locations(cafile=str(hub_dir / "ca" / "root.pem"))
        self.ctx.load_cert_chain(str(d / f"{ADMIN}.pem"), str(d / f"{ADMIN}.key"))

    def connection(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(HOST, self.port, context=self.ctx, timeout=120)

    @staticmethod
    def call(conn: http.client.HTTPSConnection, method: str, path: str, body=None) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        resp = conn.getresponse()
        return resp.status, resp.read()


def _set_api_port(hub_dir: Path, port: int) -> None:
    toml = hub_dir / "fleet.toml"
    text = toml.read_text()
    if "\n# port = 8444\n" not in text:
        raise RuntimeError("fleet.toml has no commented [api] port line to set")
    toml.write_text(text.replace("\n# port = 8444\n", f"\nport = {port}\n", 1))


def _fill(hub_dir: Path, work: Path, devices: int) -> dict:
    """The hub's registry (hub stopped) + `devices` devices with an active certificate, 1 in 100 suspended."""
    reg = hub_dir / "registry.sqlite3"
    big = work / "big.sqlite3"
    built = build_big_registry(reg, big, devices, 0)
    t0 = time.monotonic()
    import sqlite3

    db = sqlite3.connect(big, isolation_level=None)
    try:
        db.execute("BEGIN")
        db.execute("UPDATE devices SET status = 'suspended' WHERE id LIKE 'big-%' AND id LIKE '%42'")
        db.execute("COMMIT")
    finally:
        db.close()
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{reg}{suffix}")
    os.replace(big, reg)
    return {"seconds": built["seconds"] + time.monotonic() - t0, "bytes": reg.stat().st_size}


def bench_list(api: Api, s: Settings, path: str = LIST_PATH) -> dict:
    conns = [api.connection() for _ in range(s.connections)]
    times, reopened, errors = [], 0, []
    try:
        for i in range(s.connections * 5 + s.requests):  # the first 5 per connection: warm-up (handshake, caches)
            conn = conns[i % len(conns)]
            sock = conn.sock
            t0 = time.perf_counter()
            status, body = api.call(conn, "GET", path)
            elapsed = (time.perf_counter() - t0) * 1000
            if i < s.connections * 5:
                continue
            if sock is None or conn.sock is not sock:
                reopened += 1
            page = json.loads(body) if status == 200 else {}
            items = page.get("items", [])
            if status != 200 or len(items) != 100 or any(d["status"] != "active" for d in items):
                errors.append(f"{status} {body[:200]!r}")
            times.append(elapsed)
    finally:
        for c in conns:
            c.close()
    return {"ms": times, "reopened": reopened, "errors": errors}


class Session:
    """A live MQTT v5 session (raw TLS + CONNECT); `cut` is set when the broker ends it."""

    def __init__(self, port: int, cafile: str, dev: Dev):
        self.id = dev.id
        self.sock, _ = _mqtt_connect(port, _context(cafile, dev), dev.id)
        self.sock.settimeout(None)
        self.cut_at: float | None = None
        self.cut = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        try:
            while True:
                data = self.sock.recv(4096)
                if not data or data[0] >> 4 == 14:  # closed, or the broker's DISCONNECT
                    break
        except OSError:
            pass
        self.cut_at = time.monotonic()
        self.cut.set()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def bench_revoke(api: Api, hub_proc: HubProcess, members: list[Dev], control: Dev, n: int) -> dict:
    cafile = str(hub_proc.dir / "ca" / "root.pem")
    sessions = [Session(hub_proc.mqtt_port, cafile, d) for d in members]
    other = Session(hub_proc.mqtt_port, cafile, control)
    conn = api.connection()
    out: dict = {"errors": []}
    try:
        body = {"selector": {"group": GROUP}, "reason": "superseded"}
        status, dry = api.call(conn, "POST", REVOKE_PATH, body)
        if status != 200 or json.loads(dry) != {"matched": n, "dry_run": True}:
            raise RuntimeError(f"dry run: {status} {dry[:300]!r}")
        t0 = time.monotonic()
        status, raw = api.call(conn, "POST", REVOKE_PATH, {**body, "confirm_count": n})
        out["post_s"] = time.monotonic() - t0
        result = json.loads(raw)
        if status != 200 or result.get("changed") != n:
            out["errors"].append(f"confirmed revoke: {status} {raw[:300]!r}")
        out["result"] = result
        for sess in sessions:
            if not sess.cut.wait(max(0.1, t0 + 30 - time.monotonic())):
                out["errors"].append(f"{sess.id}: session not cut within 30 s")
        cuts = [sess.cut_at - t0 for sess in sessions if sess.cut_at is not None]
        out["cut_all_s"] = max(cuts) if len(cuts) == len(sessions) else float("inf")
        out["cut_first_s"] = min(cuts) if cuts else float("inf")
        time.sleep(0.5)
        if other.cut.is_set():
            out["errors"].append(f"the control {control.id} (not in the group) was cut too")
    finally:
        conn.close()
        for sess in (*sessions, other):
            sess.close()
    return out


def measure(quick: bool = False, s: Settings | None = None) -> Report:
    s = s or _settings(quick)
    rep = Report()
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="tessera-api-bench-"))
    hub_proc: HubProcess | None = None
    try:
        from hub.registry.store import Registry

        hub_dir, control_rows = make_fleet(tmp, 1, FLEET, "ctl", MQTT_LIMITS)
        api_port = free_port()
        _set_api_port(hub_dir, api_port)
        reg = Registry(hub_dir / "registry.sqlite3")
        try:
            t0 = time.monotonic()
            tokens = reg.create_devices_with_tokens([(f"tk-{i:05d}", None, [GROUP]) for i in range(s.group)], FLEET,
                                                    datetime.now(timezone.utc), timedelta(days=1))
            made = time.monotonic() - t0
        finally:
            reg.close()
        rep.notes.append(f"group {GROUP}: {s.group} devices with tokens in {made:.1f} s (one transaction)")
        hub_proc = HubProcess(hub_dir)
        hub_proc.start()
        hub(["identity", "add", ADMIN, "--role", "admin"], hub_dir)
        (work := tmp / "devices").mkdir()
        devs = enroll(hub_proc, control_rows + tokens[:s.connected], work)
        control, members = devs[0], devs[1:]
        rep.notes += hub_proc.shutdown()

        size = f"{s.big_devices // 1000}k" if s.big_devices < 1_000_000 else f"{s.big_devices / 1e6:g}M"
        built = _fill(hub_dir, tmp, s.big_devices)
        rep.rows.append(_row(f"fill registry with {size} devices (plain SQL, one transaction) (s)", built["seconds"],
                             "info", None))
        hub_proc = HubProcess(hub_dir)
        t0 = time.monotonic()
        hub_proc.start(timeout=300)
        rep.notes.append(f"registry {built['bytes'] / 1e6:.0f} MB; serve ready on it in {time.monotonic() - t0:.1f} s")
        api = Api(hub_dir, api_port)

        # 1. list latency
        lst = bench_list(api, s)
        ok = not lst["errors"] and not lst["reopened"]
        label = f"GET devices?status=active&limit=100, {size} devices"
        rep.rows.append(_row(f"{label} p50 (ms, n={len(lst['ms'])})", _pct(lst["ms"], 0.5), "info", None))
        p99 = _pct(lst["ms"], 0.99)
        rep.rows.append(_row(f"{label} p99 (ms, n={len(lst['ms'])})", p99, "<= 50 ms", ok and p99 <= 50))
        rep.notes.append(f"list: {s.connections} keep-alive connections, reopened {lst['reopened']}, max "
                         f"{max(lst['ms']):.1f} ms, errors {lst['errors'][:3]}")

        srt = bench_list(api, s, SORTED_PATH)
        p99 = _pct(srt["ms"], 0.99)
        rep.rows.append(_row(f"GET devices?status=active&sort=-last_seen&limit=100 p99 (ms, n={len(srt['ms'])})", p99,
                             "<= 50 ms", not srt["errors"] and p99 <= 50))

        # 2. revoke 10k by selector
        rv = bench_revoke(api, hub_proc, members, control, s.group)
        ok = not rv["errors"]
        rep.rows.append(_row(f"revoke {s.group} by selector (group), {size} registry: confirmed POST (s)",
                             rv.get("post_s", float("inf")), "<= 10 s", ok and rv.get("post_s", 99) <= 10))
        rep.rows.append(_row(f"  POST -> all {len(members)} live sessions cut (s)", rv.get("cut_all_s", float("inf")),
                             "<= 10 s", ok and rv.get("cut_all_s", 99) <= 10))
        t = rv.get("result", {}).get("timings", {})
        rep.rows.append(_row("  hub timings registry_ms (one transaction)", t.get("registry_ms", float("nan")), "info",
                             None))
        rep.rows.append(_row("  hub timings total_ms (+ broker sync, CRL request)", t.get("total_ms", float("nan")),
                             "info", None))
        r = rv.get("result", {})
        rep.notes.append(f"revoke: changed {r.get('changed')}, revoked certificates {r.get('revoked_certificates')}, "
                         f"sessions_cut {r.get('sessions_cut')}, broker_note {r.get('broker_note')}; first cut "
                         f"{rv.get('cut_first_s', float('nan')):.2f} s; errors {rv['errors'][:3]}")
    finally:
        if hub_proc is not None:
            rep.notes += hub_proc.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    rep.wall_s = time.monotonic() - started
    return rep


def _fill_registry(reg, devices: int) -> None:
    """`devices` active devices (1 in 100 suspended, a third seen) with one active certificate each, in one write
    transaction of plain SQL (both dialects); then the API's schema (its side tables backfilled)."""
    from hub.api import queries
    from hub.registry import sql
    from hub.registry.store import _ts

    now = datetime(2026, 12, 1, tzinfo=timezone.utc)
    ids = [f"big-{i:07d}" for i in range(devices)]
    with reg.write() as db:
        sql.executemany(db, "INSERT INTO devices (id, fleet, status, labels, groups, created, last_seen, online) "
                        "VALUES (?, ?, ?, '{}', '[\"fleet\"]', ?, ?, 0)",
                        ((d, FLEET, "suspended" if d.endswith("42") else "active", _ts(now),
                          _ts(now - timedelta(seconds=n)) if n % 3 else None) for n, d in enumerate(ids)))
        sql.executemany(db, "INSERT INTO certificates (serial, device_id, subject, not_before, not_after, "
                        "fingerprint_sha256, status, issued_at, pem) VALUES (?, ?, ?, ?, ?, ?, 'active', ?, '')",
                        ((f"{n + 1:040x}", d, f"CN={d}", _ts(now), _ts(now + timedelta(days=90)),
                          os.urandom(32).hex(), _ts(now)) for n, d in enumerate(ids)))
    queries.apply_schema(reg)
    if reg.dialect == sql.POSTGRESQL:
        with reg.write() as db:
            db.execute("ANALYZE devices")  # fresh tables: what autovacuum would do within a minute
            db.execute("ANALYZE certificates")


def measure_registry(url: str, devices: int, requests: int) -> list[dict]:
    """GET /devices?status=active&limit=100's registry work in-process (queries.list_devices, as the handler
    calls it, + the JSON body; no HTTP, no TLS) on a registry of `devices` devices: on `url` ('auto': a throwaway
    durable PostgreSQL server) and on SQLite, for the ratio. Rows: p50/p99 per dialect and sort."""
    from hub.api import queries
    from hub.registry.store import Registry

    rows = []
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tessera-api-bench-")))
        if url == "auto":
            from tests.integration.pgfixtures import pg_running

            server = stack.enter_context(pg_running(durable=True))
            url = server.url(server.create_database("apibench"))
        for name, target in (("postgresql", url), ("sqlite", work / "sqlite" / "registry.sqlite3")):
            home = work / name
            home.mkdir()
            reg = Registry(target, home=home)
            stack.callback(reg.close)
            t0 = time.monotonic()
            _fill_registry(reg, devices)
            print(f"[bench api] {name}: {devices} devices filled in {time.monotonic() - t0:.1f} s", file=sys.stderr)
            sel = queries.Selector(status="active")
            for sort in ("id", "-last_seen"):
                times = []
                for _ in range(requests):
                    t = time.perf_counter()
                    items, cursor = queries.list_devices(reg, sel, 100, None, sort)
                    json.dumps({"items": items, "next_cursor": cursor})
                    times.append((time.perf_counter() - t) * 1000)
                assert len(items) == 100 and cursor
                for q in (0.5, 0.99):
                    rows.append(_row(f"{name} list status=active sort={sort} limit=100 (registry, "
                                     f"{devices} devices) p{int(q * 100)} ms", _pct(times, q), "info", None))
    return rows


def run(quick: bool = False) -> list[dict]:
    """Run the benchmark; rows {"metric", "value", "goal", "pass"} (pass is None for "info" rows)."""
    rep = measure(quick)
    for note in rep.notes:
        print(f"[bench api] {note}", file=sys.stderr, flush=True)
    return rep.rows


def main(argv: list[str] | None = None) -> int:
    from bench.broker_bench import print_report

    parser = argparse.ArgumentParser(prog="python -m bench.api_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 100k-device registry, fewer requests")
    parser.add_argument("--registry-url", help="only the device list's registry work, in-process, on this "
                        "PostgreSQL registry ('auto': a throwaway server) and on SQLite (no hub, HTTP or TLS)")
    parser.add_argument("--devices", type=int, default=100_000, help="with --registry-url: devices registered")
    parser.add_argument("--requests", type=int, default=300, help="with --registry-url: requests per sort")
    args = parser.parse_args(argv)
    if args.registry_url:
        t0 = time.monotonic()
        rep = Report(rows=measure_registry(args.registry_url, args.devices, args.requests))
        rep.wall_s = time.monotonic() - t0
        print_report(rep)
        return 0
    rep = measure(args.quick)
    print_report(rep)
    return 0 if all(r["pass"] is not False for r in rep.rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
