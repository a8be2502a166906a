"""Job throughput over a fleet of real agents: ``python -m bench.jobs_bench [--quick]`` (or ``python -m bench jobs``).

The fleet is the one the fleet tests use (tests/integration/fleetfixtures.py: a `tessera-hub serve`, 200 agents,
quick 50, each a `tessera-agent run` process with its key in a SoftHSM token, EST-enrolled, light telemetry). On it,
`ping` jobs over the whole group with a rate the fleet cannot reach (60,000 devices a minute, the API's maximum),
so the figure is what the hub's job runner, the broker and the agents sustain:

- devices/s: the group's size over the time from the confirmed POST /api/v1/jobs (201) until the job reads
  `completed` (polled every 50 ms), and over the hub's own stamps (first sent_at to last finished_at);
- send -> ack latency p50 / p99: finished_at - sent_at of every device (hub stamps: one per runner tick for every
  device sent or acked in it, so the figures move in ~200 ms steps);
- hub CPU ms per device during the job (utime + stime of the `serve` process);
- also the fleet's set-up figures: enrollment (token directories, EST) and agents started to all online.

Every job must complete with every device acked; rows are "info" apart from that check.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)

from bench.fleet import cpu_s  # noqa: E402
from tests.integration.fleetfixtures import GROUP, running_fleet  # noqa: E402

RATE = 60000.0
ROUNDS = 3


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else float("nan")


def _row(metric: str, value, goal: str = "info", ok: bool | None = None) -> dict:
    return {"metric": metric, "value": value, "goal": goal, "pass": ok}


def _stamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _devices(fleet, job_id: int) -> list[dict]:
    items, cursor = [], None
    while True:
        more = f"&cursor={cursor}" if cursor else ""
        page = fleet.api.ok("GET", f"/api/v1/jobs/{job_id}/devices?limit=1000{more}")
        items += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            return items


def one_job(fleet, k: int) -> dict:
    body = {"name": f"bench ping {k}", "command": "ping", "selector": {"group": GROUP}, "rate_per_minute": RATE,
            "timeout_s": 60, "abort_percent": 20, "offline": "fail", "confirm_count": fleet.n}
    hub_cpu0 = cpu_s(fleet.hub.proc.pid)
    t0 = time.monotonic()
    job = fleet.api.ok("POST", "/api/v1/jobs", body, status=201)
    while job["state"] == "running":
        if time.monotonic() - t0 > 300:
            raise RuntimeError(f"job {job['id']} still running after 300 s: {job}")
        time.sleep(0.05)
        job = fleet.api.ok("GET", f"/api/v1/jobs/{job['id']}")
    wall = time.monotonic() - t0
    hub_cpu = cpu_s(fleet.hub.proc.pid) - hub_cpu0
    rows = _devices(fleet, job["id"])
    lat = [(_stamp(r["finished_at"]) - _stamp(r["sent_at"])).total_seconds() * 1000 for r in rows
           if r["sent_at"] and r["finished_at"]]
    span = (max(_stamp(r["finished_at"]) for r in rows if r["finished_at"])
            - min(_stamp(r["sent_at"]) for r in rows if r["sent_at"])).total_seconds()
    return {"ok": job["state"] == "completed" and job["counts"]["acked"] == fleet.n, "job": job, "wall": wall,
            "span": span, "lat": lat, "hub_cpu_ms": hub_cpu * 1000 / fleet.n}


def run(quick: bool = False) -> list[dict]:
    n = 50 if quick else 200
    rounds = 1 if quick else ROUNDS
    base = Path(tempfile.mkdtemp(prefix="tessera-jobs-bench-"))
    out: list[dict] = []
    try:
        with running_fleet(base, n) as fleet:
            t = fleet.times
            out += [_row(f"fleet of {n}: enrollment (tokens + EST) s", t["provision_enroll_s"]),
                    _row(f"fleet of {n}: agents started -> all online s", t["agents_up_s"]),
                    _row(f"fleet of {n}: up in total s", t["fleet_up_s"])]
            results = [one_job(fleet, k) for k in range(rounds)]
            ok = all(r["ok"] for r in results)
            best = max(results, key=lambda r: n / r["wall"])
            lat = [x for r in results for x in r["lat"]]
            out += [_row(f"ping job over {n} agents completed, all acked ({rounds} jobs)", ok, "all", ok),
                    _row("job throughput, create -> completed (devices/s, best)", n / best["wall"]),
                    _row("job throughput, first sent -> last acked (devices/s, best)",
                         n / best["span"] if best["span"] > 0 else float("inf")),
                    _row(f"job send -> ack p50 (ms, n={len(lat)})", _pct(lat, 0.5)),
                    _row(f"job send -> ack p99 (ms, n={len(lat)})", _pct(lat, 0.99)),
                    _row("hub CPU ms per device in a job", min(r["hub_cpu_ms"] for r in results))]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.jobs_bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="50 agents, one job")
    args = ap.parse_args(argv)
    from bench.__main__ import render

    rows = run(args.quick)
    print(render(rows))
    return 0 if all(r["pass"] is not False for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
