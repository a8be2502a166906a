"""Run every Tessera benchmark and print one table: ``python -m bench [--quick] [hsm est est-workers broker agent api]``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# child processes (hsm.tokeninit, bench children) import the repository too
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)

MODULES = {"hsm": "bench.hsm_bench", "est": "bench.est_bench", "est-workers": "bench.est_workers_bench",
           "broker": "bench.broker_bench",
           "agent": "bench.agent_bench", "api": "bench.api_bench", "crl": "bench.crl_bench",
           "metrics": "bench.metrics_bench", "jobs": "bench.jobs_bench", "console": "bench.console_bench",
           "registry-pg": "bench.registry_pg_bench", "tokens": "bench.token_bench",
           "rabbitmq": "bench.rabbitmq_bench", "hubs-pg": "bench.hubs_pg_bench",
           "metrics-pg": "bench.metrics_pg_bench"}


def fmt(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if float(value).is_integer() and abs(value) >= 1:
        return f"{value:.0f}"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"


def render(rows: list[dict]) -> str:
    header = ("metric", "value", "goal", "result")
    table = [(r["metric"], f"{fmt(r['value'])}{(' ' + r['unit']) if r.get('unit') else ''}", r.get("goal") or "",
              {True: "pass", False: "FAIL", None: ""}[r.get("pass")]) for r in rows]
    widths = [max(len(str(x[i])) for x in [header, *table]) for i in range(4)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in table]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("names", nargs="*", metavar="NAME",
                    help=f"benchmarks to run: {', '.join(MODULES)} (default: all)")
    ap.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in MODULES]
    if unknown:
        ap.error(f"unknown benchmark {', '.join(unknown)} (choose from {', '.join(MODULES)})")
    started = time.perf_counter()
    rows: list[dict] = []
    failed = []
    for name in args.names or list(MODULES):
        t0 = time.perf_counter()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        try:
            rows += importlib.import_module(MODULES[name]).run(quick=args.quick)
        except Exception:
            failed.append(name)
            traceback.print_exc()
            rows.append({"metric": f"{name} benchmark", "value": "error", "goal": "", "pass": False})
        print(f"[bench] {name} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print(f"Tessera benchmarks, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs"
          f"{' (quick)' if args.quick else ''}")
    print(render(rows))
    print(f"total {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
