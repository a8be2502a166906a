"""Registry enrollments per second: two hubs on one PostgreSQL registry vs one hub on the SQLite registry.

`python -m bench registry-pg` (or `python -m bench.registry_pg_bench [--quick]`). A "hub" here is a process with
its own `Registry` doing what an EST enrollment does to the registry (`Registry.enroll`: the token checked, then
in one write transaction checked again and spent, the device made active, the certificate recorded, the audit row
chained), for tokens of its own, as fast as it can. The certificates are made before the clock starts, so the
figure is the registry's, not the signature's (the whole EST path, real `serve` processes: bench/hubs_pg_bench.py).
Both registries are durable: SQLite in WAL mode as the hub opens it,
PostgreSQL with fsync and synchronous_commit on (a server of its own, tests/integration/pgfixtures.py).

Rows: SQLite 1 hub, PostgreSQL 1 hub, PostgreSQL 2 hubs (enrollments/s over the wall time from the first start to
the last end), and the ratio 2-hub PostgreSQL / 1-hub SQLite (info: every PostgreSQL write transaction takes one
advisory lock, the audit chain's single order, so two hubs are one writer at a time like SQLite's processes).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)


def _certs(device_ids: list[str]) -> list:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca = ec.generate_private_key(ec.SECP256R1())
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    out = []
    for device_id in device_ids:
        key = ec.generate_private_key(ec.SECP256R1())
        out.append(x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                                        device_id)]))
                   .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(T0 - timedelta(minutes=5)).not_valid_after(T0 + timedelta(days=30))
                   .sign(ca, hashes.SHA256()))
    return out


def _hub(where: str, home: str, tokens: list[tuple[str, str]], barrier, queue) -> None:
    """One hub process: its own Registry, its tokens, timed from the barrier to the last enrollment."""
    from hub.registry.store import Registry

    reg = Registry(where, home=Path(home)) if where.startswith("postgresql") else Registry(Path(where))
    certs = _certs([d for d, _ in tokens])
    barrier.wait()
    start = time.time()
    for (device_id, token), cert in zip(tokens, certs):
        reg.enroll(device_id, token, T0, lambda c=cert: c, source="127.0.0.1")
    end = time.time()
    reg.close()
    queue.put((start, end, len(tokens)))


def _measure(where: str, home: Path, hubs: int, n: int) -> float:
    """Enrollments/s of `hubs` processes sharing `n` fresh tokens on the registry at `where`."""
    from hub.registry.store import Registry

    reg = Registry(where, home=home) if where.startswith("postgresql") else Registry(Path(where))
    prefix = f"h{hubs}-"
    rows = reg.create_devices_with_tokens(((f"{prefix}{i:06d}", None, None) for i in range(n)), "bench", T0,
                                          timedelta(days=7))
    reg.close()
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(hubs), ctx.Queue()
    procs = [ctx.Process(target=_hub, args=(where, str(home), rows[i::hubs], barrier, queue)) for i in range(hubs)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
        if p.exitcode != 0:
            raise RuntimeError(f"a bench hub exited {p.exitcode}")
    return sum(r[2] for r in results) / (max(r[1] for r in results) - min(r[0] for r in results))


def run(quick: bool = False) -> list[dict]:
    from tests.integration.pgfixtures import pg_running

    n = 300 if quick else 2000
    rows = []
    with tempfile.TemporaryDirectory(prefix="tessera-regbench-") as tmp:
        home = Path(tmp)
        sqlite1 = _measure(str(home / "registry.sqlite3"), home, 1, n)
        with pg_running(durable=True) as server:
            pg1 = _measure(server.url(server.create_database("bench1")), home, 1, n)
            pg2 = _measure(server.url(server.create_database("bench2")), home, 2, n)
    rows.append({"metric": "registry enrollments/s, SQLite, 1 hub", "value": sqlite1, "unit": "/s", "goal": "",
                 "pass": None})
    rows.append({"metric": "registry enrollments/s, PostgreSQL, 1 hub", "value": pg1, "unit": "/s", "goal": "",
                 "pass": None})
    rows.append({"metric": "registry enrollments/s, PostgreSQL, 2 hubs", "value": pg2, "unit": "/s", "goal": "",
                 "pass": None})
    rows.append({"metric": "2 hubs on PostgreSQL / 1 hub on SQLite", "value": pg2 / sqlite1, "goal": "",
                 "pass": None})
    return rows


def main(argv: list[str] | None = None) -> int:
    from bench.__main__ import render

    parser = argparse.ArgumentParser(prog="python -m bench.registry_pg_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"300 enrollments per row, not 2000 ({os.cpu_count()} "
                        "CPUs here)")
    args = parser.parse_args(argv)
    print(render(run(quick=args.quick)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
