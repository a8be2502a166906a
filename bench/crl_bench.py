"""CRL publication and hub start-up at scale: 200k devices, 100k of them with a revoked certificate.

``python -m bench.crl_bench [--quick]`` prints a result table; ``run(quick)`` returns the rows. A fleet from
``tessera-hub init`` (bench/fleet.py) with one device enrolled over EST (its certificate row is the template), the
hub stopped, its registry filled by bench/broker_bench.py's ``build_big_registry`` (plain SQL, one transaction):
200k devices (quick 20k) with an active certificate each, and an older revoked (keyCompromise) certificate for
the first 100k (quick 10k). Then, in this process, on that registry and the fleet's CA:

1. the CRL's registry query (``device_crl_entries``: revoked and unexpired, plus held certificates), wall time;
2. building and signing the device CRL from those entries (``FleetCA.build_crl``), wall time; goal <= 5 s at 100k
   entries (cryptography's ``add_revoked_certificate`` copies the builder each time: 17 s at 100k before the
   entries went in through the constructor);
3. ``publish_crl`` end to end (query, build, sign, DER + PEM written, parsed back and checked, swapped in);

and ``tessera-hub serve`` from start to "hub ready" on it, twice: the first start also creates the API's indexes
on the big registry once; the second is every later start (goal <= 2 s: start-up must not depend on the number
of revoked certificates, the CRL is published in the background). During the second, that CRL over plain HTTP
(hub/serve/crlhttp.py): the first GET (the file read, parsed and hashed once), then GET and conditional GET (304)
latencies one at a time and GETs a second from 16 clients at once (one connection per request, as the listener
serves them).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.broker_bench import _row, build_big_registry  # noqa: E402
from bench.fleet import HOST, HubProcess, enroll, make_fleet  # noqa: E402

FLEET = "crlbench"


def _replace_registry(hub_dir: Path, work: Path, devices: int, revoked: int) -> dict:
    reg = hub_dir / "registry.sqlite3"
    big = work / "big.sqlite3"
    built = build_big_registry(reg, big, devices, revoked)
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{reg}{suffix}")
    os.replace(big, reg)
    return built


def _timed_start(hub_dir: Path, while_up=None) -> float:
    proc = HubProcess(hub_dir)
    t0 = time.monotonic()
    try:
        proc.start(timeout=600)
        took = time.monotonic() - t0
        if while_up is not None:
            while_up(proc)
        return took
    finally:
        proc.shutdown()


def _http_crl(port: int, headers: dict[str, str] | None = None) -> tuple[float, int, bytes, str]:
    import http.client

    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    t0 = time.perf_counter()
    conn.request("GET", "/crl/device.crl", headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    took = time.perf_counter() - t0
    conn.close()
    return took, resp.status, body, resp.getheader("ETag") or ""


def _http_crl_rows(proc, entries: str, quick: bool) -> list[dict]:
    """The published CRL over plain HTTP from the running hub: first GET, GET and 304 p50/p99, GETs/s at 16."""
    from concurrent.futures import ThreadPoolExecutor

    took, status, body, etag = _http_crl(proc.crl_port)
    if status != 200 or body != (proc.dir / "crl" / "device.crl").read_bytes():
        raise RuntimeError(f"the HTTP CRL is not the published one (status {status})")
    n = 50 if quick else 200
    gets = sorted(_http_crl(proc.crl_port)[0] for _ in range(n))
    cond = sorted(_http_crl(proc.crl_port, {"If-None-Match": etag})[0] for _ in range(n))
    if _http_crl(proc.crl_port, {"If-None-Match": etag})[1] != 304:
        raise RuntimeError("a conditional GET with the current ETag is not a 304")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda _: _http_crl(proc.crl_port), range(4 * n)))
    rate = 4 * n / (time.perf_counter() - t0)
    mb = len(body) / 1e6
    return [_row(f"HTTP CRL ({entries}, {mb:.1f} MB) first GET (ms)", took * 1000, "info", None),
            _row("HTTP CRL GET p50 (ms)", gets[n // 2] * 1000, "info", None),
            _row("HTTP CRL GET p99 (ms)", gets[int(n * 0.99)] * 1000, "info", None),
            _row("HTTP CRL conditional GET (304) p50 (ms)", cond[n // 2] * 1000, "info", None),
            _row("HTTP CRL conditional GET (304) p99 (ms)", cond[int(n * 0.99)] * 1000, "info", None),
            _row("HTTP CRL GETs/s, 16 clients", rate, "info", None)]


def measure(quick: bool = False) -> tuple[list[dict], list[str]]:
    devices, revoked = (20_000, 10_000) if quick else (200_000, 100_000)
    size = f"{devices // 1000}k devices / {revoked // 1000}k revoked"
    rows, notes = [], []
    tmp = Path(tempfile.mkdtemp(prefix="tessera-crl-bench-"))
    try:
        hub_dir, tokens = make_fleet(tmp, 1, FLEET, "tpl")
        proc = HubProcess(hub_dir)
        proc.start()
        try:
            (work := tmp / "devices").mkdir()
            enroll(proc, tokens, work)
        finally:
            notes += proc.shutdown()
        built = _replace_registry(hub_dir, tmp, devices, revoked)
        notes.append(f"registry filled in {built['seconds']:.1f} s ({built['bytes'] / 1e6:.0f} MB)")

        from hub.ca.authority import load_ca
        from hub.ca.revocation import CRL_LIFETIME, device_crl_entries, publish_crl
        from hub.registry.store import Registry

        registry = Registry(hub_dir / "registry.sqlite3")
        ca = load_ca(hub_dir / "ca")
        try:
            now = datetime.now(timezone.utc)
            t0 = time.monotonic()
            entries = device_crl_entries(registry, now)
            t_query = time.monotonic() - t0
            t0 = time.monotonic()
            crl = ca.build_crl(entries, now, crl_number=2, next_update=CRL_LIFETIME)
            t_build = time.monotonic() - t0
            if len(crl) != revoked:
                raise RuntimeError(f"CRL has {len(crl)} entries, expected {revoked}")
            t0 = time.monotonic()
            publish_crl(ca, registry, hub_dir / "crl", now)
            t_publish = time.monotonic() - t0
        finally:
            ca.close()
            registry.close()
        rows.append(_row(f"CRL registry query, {size} (s)", t_query, "info", None))
        rows.append(_row(f"CRL build + sign, {revoked // 1000}k entries (s)", t_build, "<= 5 s", t_build <= 5))
        rows.append(_row(f"publish_crl end to end, {revoked // 1000}k entries (s)", t_publish, "info", None))
        first = _timed_start(hub_dir)
        http_rows: list[dict] = []
        again = _timed_start(hub_dir, lambda p: http_rows.extend(_http_crl_rows(p, f"{revoked // 1000}k entries",
                                                                                 quick)))
        rows.append(_row(f"serve start -> ready, {size}, first start (indexes built) (s)", first, "info", None))
        rows.append(_row(f"serve start -> ready, {size}, later starts (s)", again, "<= 2 s", again <= 2))
        rows += http_rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows, notes


def run(quick: bool = False) -> list[dict]:
    """Run the benchmark; rows {"metric", "value", "goal", "pass"} (pass is None for "info" rows)."""
    rows, notes = measure(quick)
    for note in notes:
        print(f"[bench crl] {note}", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.crl_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20k devices / 10k revoked")
    args = parser.parse_args(argv)
    for r in run(args.quick):
        verdict = "-" if r["pass"] is None else ("yes" if r["pass"] else "NO")
        print(f"{r['metric']:<70} {r['value']:>10.3f}  {r['goal']:<8} {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
