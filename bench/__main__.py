"""Run Tessera benchmarks and print a table: ``python -m bench [keygen|sign|tls ...] [options]``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# hsm.tokeninit starts `python -m hsm.tokeninit`: make the repository importable there too.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)

from bench import hsm_bench  # noqa: E402

GOAL_RATIO = 1.05


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:9.3f}"


def print_table(results: list[hsm_bench.Result]) -> None:
    width = max(len(r.name) for r in results)
    print(f"{'benchmark':<{width}}  {'n':>5}  {'median ms':>9}  {'p90 ms':>9}  {'min ms':>9}  note")
    print("-" * (width + 50))
    for r in results:
        print(f"{r.name:<{width}}  {len(r.samples):>5}  {_ms(r.median)}  {_ms(r.p90)}  {_ms(min(r.samples))}  {r.note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run: keygen, sign, tls (default: all)")
    parser.add_argument("--keygen-n", type=int, default=5, help="key generations per key type (default 5)")
    parser.add_argument("--sign-n", type=int, default=300, help="signatures per key (default 300)")
    parser.add_argument("--handshakes", type=int, default=200, help="handshakes per client key (default 200)")
    parser.add_argument("--tls", choices=["1.2", "1.3"], default="1.3", help="TLS version (default 1.3)")
    args = parser.parse_args(argv)
    known = ["keygen", "sign", "tls"]
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)} (choose from {', '.join(known)})")
    names = args.names or known

    started = time.perf_counter()
    results: list[hsm_bench.Result] = []
    ratio = None
    if "keygen" in names:
        results += hsm_bench.bench_keygen(args.keygen_n)
    if "sign" in names:
        results += hsm_bench.bench_sign(args.sign_n)
    if "tls" in names:
        tls = hsm_bench.bench_tls(args.handshakes, args.tls)
        ratio = hsm_bench.tls_ratio(tls)
        overhead_ms = (tls[0].median - tls[1].median) * 1000
        results += tls
    print_table(results)
    if ratio is not None:
        verdict = "met" if ratio <= GOAL_RATIO else "NOT met"
        print(f"\nTLS handshake time ratio token/file (medians): {ratio:.3f}  (goal <= {GOAL_RATIO}: {verdict}); "
              f"token key adds {overhead_ms:.3f} ms per handshake")
    print(f"total wall time {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
