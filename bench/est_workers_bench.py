"""EST scaling over worker processes: enrollments/s of `serve --est-workers N` divided by `--est-workers 1`.

``python -m bench.est_workers_bench [--quick] [-n N] [--workers N] [--rounds R] [--mode M] [--threads T]``;
``run(quick)`` returns the rows.
Each pass is bench/est_bench.py's load pass on a fresh fleet (tokens are single-use): a real `tessera-hub serve`,
P-256 CSRs and complete requests made before timing, client processes on the SAME cores as the hub
(clients counted: the ratio is what this machine does with everything it runs, not the server alone). Passes
alternate 1, N, 1, N... (`rounds` of each) so a neighbour's load hits both alike; the ratio is of the medians.
The CPU split of each pass (supervisor, EST workers, clients, other processes) is printed and in the rows.
`--nice -10` (root) puts the passes ahead of other
processes of the same scheduling group (sessions in cgroups of their own keep their share: the "others" figure
says how much CPU other processes took).
Two modes (`--mode`): keepalive, each client thread enrolls over one kept-alive TLS connection (as a factory
station does; the server ends one after Limits.keepalive_requests, 100), the goal's figure; new, a new TCP connection
and full TLS handshake per enrollment (the client's handshake then takes about a third of the machine), the second
figure. No TLS resumption in either (checked).
Goal: >= 1.8 with 2 workers on 2 cores, keep-alive. Full: n=2000, 2 rounds per mode, about 4 min; quick: n=300,
1 round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import est_bench as eb  # noqa: E402

GOAL_RATIO = 1.8


def one_pass(workers: int, s: eb.Setup) -> eb.LoadResult:
    with tempfile.TemporaryDirectory(prefix=f"tessera-est-w{workers}-") as tmp_name:
        tmp = Path(tmp_name)
        hub_dir, rows = eb._make_fleet(tmp, s.n)
        cafile = str(hub_dir / "ca" / "root.pem")
        server = eb.HubServer(hub_dir, tmp, 0, workers=workers)
        requests = eb._enroll_requests(rows, server.port, s.keepalive)
        try:
            server.start(cafile)
            load = eb._load_pass([server], cafile, requests, s)
        finally:
            server.stop()
        load.db_certs, load.db_audit_ok = eb._db_counts(hub_dir)
    return load


def _split(ld: eb.LoadResult) -> str:
    main = ld.server_cpu_s - ld.worker_cpu_s
    other = max(0.0, ld.machine_busy * eb.CORES - (ld.server_cpu_s + ld.client_cpu_s) / ld.wall_s)
    return (f"cores busy: supervisor {main / ld.wall_s:.2f}, EST workers {ld.worker_cpu_s / ld.wall_s:.2f}, "
            f"clients {ld.client_cpu_s / ld.wall_s:.2f}, others {other:.2f} (machine {ld.machine_busy * 100:.0f}% "
            f"of {eb.CORES})")


MODES = {"keepalive": "keep-alive (one TLS connection per client thread)",
         "new": "new TCP + full TLS per enrollment"}


#: client threads per process: kept-alive clients cost little, so 24 enrollments in flight (with 12, two workers
#: waited on each other's commits with CPU idle); new connections as the figures before keep-alive (12 in flight)
THREADS = {"keepalive": 12, "new": 6}


def _ratio_rows(mode: str, workers: int, results: dict[int, list[eb.LoadResult]], goal: bool) -> list[dict]:
    label = MODES[mode]
    rate = {k: statistics.median(x.rate for x in v) for k, v in results.items()}
    ratio = rate[workers] / rate[1] if rate[1] else 0.0
    ok = all(x.ok == x.n and x.bad_answers == 0 and x.reused == 0 for v in results.values() for x in v)
    rows = [
        {"metric": f"est enrollments/s, {label}, serve --est-workers 1", "value": rate[1], "goal": "info",
         "pass": True},
        {"metric": f"est enrollments/s, {label}, serve --est-workers {workers}", "value": rate[workers],
         "goal": "info", "pass": True},
        {"metric": f"est enrollments/s {workers} workers / 1 worker, {label} (clients on the same {eb.CORES} cores)",
         "value": ratio, "goal": f">= {GOAL_RATIO}" if goal else "info", "pass": ratio >= GOAL_RATIO if goal else True},
        {"metric": f"est worker passes, {label}: every enrollment OK, no TLS resumption",
         "value": sum(len(v) for v in results.values()), "goal": "all", "pass": ok},
    ]
    one = results[1][-1]
    if one.ok and one.wall_s:
        # what the ratio can be at most here: N workers can at best fill the machine, shared with the clients at
        # their measured CPU per enrollment; one worker did what it did
        srv, cli = one.server_cpu_s / one.ok, one.client_cpu_s / one.ok
        ceiling = (eb.CORES / (srv + cli)) / one.rate
        rows.append({"metric": f"  ceiling of that ratio with clients on the same cores ({cli * 1e3:.2f} ms client, "
                               f"{srv * 1e3:.2f} ms server CPU/enrollment)", "value": ceiling, "goal": "info",
                     "pass": None})
    for k, v in results.items():
        ld = v[-1]
        rows.append({"metric": f"  {k} worker(s): supervisor / workers / clients CPU (cores); enrollments per "
                               "connection",
                     "value": f"{(ld.server_cpu_s - ld.worker_cpu_s) / ld.wall_s:.2f} / "
                              f"{ld.worker_cpu_s / ld.wall_s:.2f} / {ld.client_cpu_s / ld.wall_s:.2f}; "
                              f"{ld.ok / max(1, ld.connections):.0f}",
                     "goal": "info", "pass": None})
    return rows


def measure(quick: bool = False, n: int | None = None, workers: int = 2, rounds: int | None = None,
            verbose: bool = True, modes: tuple[str, ...] = tuple(MODES), threads: int | None = None) -> list[dict]:
    """The ratio for each mode in `modes` (the goal is the first's: keep-alive; new connections are the second
    figure); each mode's passes alternate 1, N, 1, N..."""
    rows = []
    for mode in modes:
        s = eb.Setup(n=n or (300 if quick else 2000), procs=2, threads=threads or THREADS[mode],
                     deadline_s=15.0 if quick else 35.0,
                     keepalive=mode == "keepalive")
        results: dict[int, list[eb.LoadResult]] = {1: [], workers: []}
        for r in range(rounds or (1 if quick else 2)):
            for k in (1, workers):
                t0 = time.perf_counter()
                ld = one_pass(k, s)
                results[k].append(ld)
                if verbose:
                    print(f"[est-workers] {mode}, round {r + 1}, {k} worker(s): {ld.rate:.0f}/s ({ld.ok}/{ld.n} OK, "
                          f"{ld.connections} connections, {ld.workers} worker processes seen, "
                          f"{time.perf_counter() - t0:.0f} s); {_split(ld)}", file=sys.stderr, flush=True)
        rows += _ratio_rows(mode, workers, results, goal=mode == "keepalive")
    return rows


def run(quick: bool = False) -> list[dict]:
    return measure(quick)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.est_workers_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("-n", type=int, help="enrollments per pass (default 2000, quick 300)")
    ap.add_argument("--workers", type=int, default=2, help="the N of N workers / 1 worker (default 2)")
    ap.add_argument("--rounds", type=int, help="passes of each (default 2, quick 1)")
    ap.add_argument("--threads", type=int, help="threads in each of the 2 client processes (default 12 kept alive, "
                    "6 with a new connection each)")
    ap.add_argument("--mode", choices=[*MODES, "both"], default="both",
                    help="keepalive (the goal's figure), new (a new connection per enrollment) or both (default)")
    ap.add_argument("--nice", type=int, default=0, help="run hub and clients at this nice value (e.g. -10 as root: "
                    "ahead of other processes of the same cgroup)")
    args = ap.parse_args(argv)
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # inherited by serve, its workers and the clients
    from bench.__main__ import render

    modes = tuple(MODES) if args.mode == "both" else (args.mode,)
    print(render(measure(args.quick, args.n, args.workers, args.rounds, modes=modes, threads=args.threads)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
