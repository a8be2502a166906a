"""Console page loads with 1M devices registered: overview, device list (first page, a deep keyset page, id-prefix
search, a status filter), a device's page and the audit log, over real TLS from a real ``tessera-hub serve``.

``python -m bench.console_bench [--quick]`` prints a result table; ``run(quick)`` returns the rows. The fleet is
bench/metrics_bench.py's (one enrolled control device, then 1M devices filled with the hub stopped, certificates
spread and 9 in 10 online; quick: 100k), the operator its admin identity. Each page: 30 loads (quick 10) on one
keep-alive connection after 3 warm-ups, nearest-rank p50 / p99; goal p99 <= 250 ms for every page (the list page
is one keyset query, whatever the page number; the overview reads trigger-kept counts, never a scan).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.api_bench import ADMIN, Api, _fill  # noqa: E402
from bench.broker_bench import _pct, _row  # noqa: E402
from bench.fleet import HubProcess, enroll, free_port, hub  # noqa: E402
from bench.metrics_bench import Report, _make_fleet, _shape, _timed  # noqa: E402

GOAL_MS = 250.0


@dataclass
class Settings:
    big_devices: int = 1_000_000
    loads: int = 30


def _settings(quick: bool) -> Settings:
    return Settings(big_devices=100_000, loads=10) if quick else Settings()


def _pages(n: int) -> list[tuple[str, str, str]]:
    """(name, path, text the page must contain) for a fleet of n big-* devices."""
    from hub.api.queries import encode_cursor

    deep = f"big-{n * 9 // 10:07d}"  # the page after 90% of the fleet (keyset: as cheap as the first)
    middle = f"big-{n // 2:07d}"
    return [("overview", "/console/", "online now"),
            ("device list, first page", "/console/devices", "big-"),
            ("device list, a page 90% deep", f"/console/devices?cursor={encode_cursor(deep)}", "big-"),
            ("device list, id prefix search", f"/console/devices?id_prefix={middle[:-2]}", middle),
            ("device list, status=suspended", "/console/devices?status=suspended", "suspended"),
            ("device page", f"/console/devices/{middle}", middle),
            ("audit log", "/console/audit", "api.console")]


def _check(expect: str):
    def check(status: int, body: bytes) -> str | None:
        if status != 200:
            return f"{status} {body[:200]!r}"
        return None if expect.encode() in body else f"page without {expect!r}"
    return check


def measure(quick: bool = False, s: Settings | None = None) -> Report:
    s = s or _settings(quick)
    rep = Report()
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="tessera-console-bench-"))
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
        rep.notes.append(f"registry filled with {size} devices in {built['seconds']:.1f} s")
        _shape(hub_dir / "registry.sqlite3", datetime.now(timezone.utc))
        hub_proc = HubProcess(hub_dir)
        hub_proc.start(timeout=300)
        api = Api(hub_dir, api_port)
        conn = api.connection()
        try:
            for name, path, expect in _pages(s.big_devices):
                ms, errors = _timed(api, conn, path, s.loads, _check(expect))
                p99 = _pct(ms, 0.99)
                rep.rows.append(_row(f"console {name}, {size} devices p50 (ms, n={len(ms)})", _pct(ms, 0.5),
                                     "info", None))
                rep.rows.append(_row(f"console {name}, {size} devices p99 (ms, n={len(ms)})", p99,
                                     f"<= {GOAL_MS:.0f} ms", not errors and p99 <= GOAL_MS))
                if errors:
                    rep.notes.append(f"{name}: errors {errors[:3]}")
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
        print(f"[bench console] {note}", file=sys.stderr, flush=True)
    return rep.rows


def main(argv: list[str] | None = None) -> int:
    from bench.broker_bench import print_report

    parser = argparse.ArgumentParser(prog="python -m bench.console_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 100k-device registry, fewer page loads")
    args = parser.parse_args(argv)
    rep = measure(args.quick)
    print_report(rep)
    for note in rep.notes:
        print(f"  {note}")
    return 0 if all(r["pass"] is not False for r in rep.rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
