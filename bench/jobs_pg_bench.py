"""The job runner's registry side on SQLite and on PostgreSQL with two hubs: ``python -m bench.jobs_pg_bench [--quick]``.

No broker and no agents (bench/jobs_bench.py has those): a recorder stands in for LiveHub.send_command, so the
figures are what the runner's SQL costs. One job over N online devices at a rate nothing reaches (the runner's own
limit is SCAN devices a tick); runners ticked back to back on the real clock until the job completes:

- SQLite: one runner (trivially the leader); its acks go back to it;
- PostgreSQL (a durable throwaway server, tests/integration/pgfixtures.py): two runners on two Registry objects
  over one database, as two hubs: the lease holder sends, every ack goes to the OTHER hub (the follower applies it).

Rows: devices/s (created -> completed), and the idle cost of a tick without jobs (ms): the leader's (renewal
every RENEW s) and the follower's (one read of the lease row). All "info".
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hub.api import queries  # noqa: E402
from hub.api.queries import Selector  # noqa: E402
from hub.jobs import schema, store  # noqa: E402
from hub.jobs.leader import Lease  # noqa: E402
from hub.jobs.runner import JobRunner  # noqa: E402
from hub.registry.store import Registry  # noqa: E402


def now() -> datetime:
    return datetime.now(timezone.utc)


class Recorder:
    def __init__(self, registry: Registry):
        self.registry, self.sent, self.n = registry, [], 0

    def send_command(self, device_id, command, args, actor="cli"):
        self.n += 1
        cid = f"{id(self):x}-{self.n}"
        self.sent.append((device_id, cid))
        return cid


def _fill(reg: Registry, n: int) -> None:
    queries.apply_schema(reg)
    schema.apply_schema(reg)
    t = now()
    for start in range(0, n, 5000):
        reg.create_devices_with_tokens([(f"d-{i:06d}", {}, ["g"]) for i in range(start, min(n, start + 5000))],
                                       "acme", t, timedelta(days=1))
    with reg.write() as db:
        db.execute("UPDATE devices SET online = 1, last_seen = ?", [store.ts(t)])


def _run(regs: list[Registry], n: int) -> tuple[float, float, float]:
    hubs = [Recorder(r) for r in regs]
    runners = [JobRunner(h, settle=0.0, lease=Lease(h.registry, holder=f"bench-{k}")) for k, h in enumerate(hubs)]
    spec = {"name": "bench", "command": "ping", "args": {}, "rate_per_minute": 6e7, "timeout_s": 600,
            "abort_percent": 50, "offline": "fail", "min_finished": None, "deadline": None,
            "selector": {"group": "g"}}
    t0 = time.perf_counter()
    job_id = store.create_job(regs[0], spec, Selector.parse({"group": "g"}), n, "bench", now())["id"]
    while store.get_job(regs[0], job_id)["state"] == "running":
        for r in runners:
            r.tick()
        for k, h in enumerate(hubs):  # every ack reaches the other hub (or the only one)
            other = runners[(k + 1) % len(runners)]
            for device_id, cid in h.sent:
                other.on_ack(device_id, {"id": cid, "ok": True, "result": {}})
            h.sent.clear()
    rate = n / (time.perf_counter() - t0)
    idle = []
    for r in runners:
        t1 = time.perf_counter()
        for _ in range(200):
            r.tick()
        idle.append((time.perf_counter() - t1) / 200 * 1000)
    leader = next(k for k, r in enumerate(runners) if r.lease.trivial or r.lease.until is not None)
    for r in runners:
        r.stop()
    return rate, idle[leader], idle[1 - leader] if len(idle) > 1 else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2,000 devices instead of 20,000")
    args = p.parse_args(argv)
    n = 2000 if args.quick else 20000
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        reg = Registry(Path(tmp) / "registry.sqlite3")
        try:
            _fill(reg, n)
            rate, lead, _ = _run([reg], n)
            rows += [("sqlite, 1 hub: devices/s", f"{rate:.0f}"), ("sqlite: idle tick, ms", f"{lead:.2f}")]
        finally:
            reg.close()
    from tests.integration.pgfixtures import pg_running

    with pg_running(durable=True) as server, tempfile.TemporaryDirectory() as tmp:
        url = server.url(server.create_database())
        regs = [Registry(url, home=tmp), Registry(url, home=tmp)]
        try:
            _fill(regs[0], n)
            rate, lead, follow = _run(regs, n)
            rows += [("postgresql, 2 hubs (acks to the follower): devices/s", f"{rate:.0f}"),
                     ("postgresql: idle tick of the leader, ms", f"{lead:.2f}"),
                     ("postgresql: idle tick of the follower, ms", f"{follow:.2f}")]
        finally:
            for r in regs:
                r.close()
    width = max(len(m) for m, _ in rows)
    print(f"jobs on the registry, {n} devices, {now():%Y-%m-%d}")
    for metric, value in rows:
        print(f"  {metric:<{width}}  {value:>8}  info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
