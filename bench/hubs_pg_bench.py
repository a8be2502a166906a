"""EST enrollments per second: two `tessera-hub serve` on one PostgreSQL registry vs one hub on SQLite.

``python -m bench.hubs_pg_bench [--quick] [-n N]`` (or ``python -m bench hubs-pg``); ``run(quick)`` returns the rows.
The whole EST path, as bench/est_bench.py's load pass drives it: P-256 CSRs and complete requests made before
timing, 2 client processes x 6 threads on the same 2 cores, a new TCP connection and full TLS handshake per
enrollment, every answer checked to be a certificate. Three passes, each on fresh single-use tokens:
- SQLite, 1 hub: the embedded default (Mosquitto broker);
- PostgreSQL, 1 hub, and PostgreSQL, 2 hubs: one fleet whose [registry] url names a durable PostgreSQL server of
  the bench's own (fsync, synchronous_commit on: tests/integration/pgfixtures.py) and whose [broker] is a 1-node
  RabbitMQ cluster (PostgreSQL needs it); hub B is `tessera-hub init --join <A>`; clients round-robin over both.
Each serve runs its default EST workers (one per CPU), so 2 hubs are 2x the processes on the same 2 cores: the
ratio says what a second hub machine would add only as a lower bound; it shows that two hubs enroll concurrently
on one registry, spend each token once (checked: certificates counted per device in the registry) and what the
shared registry costs. Full: n=1500 per pass (about 3 min with the cluster start); quick: n=300.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import est_bench as eb  # noqa: E402
from bench.fleet import free_port, hub, make_fleet  # noqa: E402

FLEET, PREFIX = "acme", "pgb-"


def _set(hub_dir: Path, values: dict[str, str]) -> None:
    toml = hub_dir / "fleet.toml"
    text = toml.read_text()
    for key, value in values.items():
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        if n != 1:
            raise RuntimeError(f"fleet.toml has no single {key} line")
    toml.write_text(text)


def _pass(servers: list[eb.HubServer], cafile: str, rows: list[tuple[str, str]], s: eb.Setup) -> eb.LoadResult:
    requests = eb._enroll_requests(rows, servers[0].port, s.keepalive)
    load = eb._load_pass(servers, cafile, requests, s)
    if load.ok != len(rows):
        raise RuntimeError(f"{load.ok} of {len(rows)} enrollments answered a certificate: {load.status} "
                           f"{load.errors} {load.first_error}")
    return load


def _serve_args() -> tuple[str, ...]:
    return ("--crl-port", str(free_port()), "--api-port", str(free_port()))


def sqlite_pass(tmp: Path, s: eb.Setup) -> eb.LoadResult:
    hub_dir, rows = make_fleet(tmp, s.n, FLEET, PREFIX)
    server = eb.HubServer(hub_dir, tmp, 0, args=_serve_args())
    try:
        server.start(str(hub_dir / "ca" / "root.pem"))
        return _pass([server], str(hub_dir / "ca" / "root.pem"), rows, s)
    finally:
        server.stop()


def pg_passes(tmp: Path, s: eb.Setup) -> tuple[eb.LoadResult, eb.LoadResult, dict[str, int]]:
    """(1 hub, 2 hubs, certificates per device counted in the registry: {count: devices})."""
    from tests.integration.pgfixtures import pg_running
    from tests.integration.rabbitfixtures import RabbitCluster, render_with_driver

    with pg_running(durable=True) as pg:
        url = pg.url(pg.create_database())
        cluster = RabbitCluster(tmp / "rabbit", 1)
        node = cluster.nodes[0]
        hub_a, rows = make_fleet(tmp, 2 * s.n, FLEET, PREFIX, (
            ("url", f'"{url}"'), ("kind", '"rabbitmq"'), ("management_urls", f'["http://{node.host}:{node.mgmt_port}"]'),
            ("auth_port", str(free_port()))))
        cafile = str(hub_a / "ca" / "root.pem")
        servers: list[eb.HubServer] = []
        try:
            cluster.start(render_with_driver(type("H", (), {"dir": hub_a})()))
            a = eb.HubServer(hub_a, tmp, 0, mqtt_port=node.mqtt_port, args=_serve_args())
            servers.append(a)
            a.start(cafile, timeout=90)
            one = _pass([a], cafile, rows[:s.n], s)
            hub_b = tmp / "hub-b"
            hub(["init", "--join", str(hub_a)], hub_b)
            _set(hub_b, {"auth_port": str(free_port())})  # its own auth listener; the node calls A's
            b = eb.HubServer(hub_b, tmp, 1, mqtt_port=node.mqtt_port, args=_serve_args())
            servers.append(b)
            b.start(cafile, timeout=90)
            two = _pass([a, b], cafile, rows[s.n:], s)
        finally:
            for server in reversed(servers):
                server.stop()
            cluster.stop()
        from hub.registry.store import Registry

        registry = Registry(url, home=hub_a)
        try:
            counts = {str(r["n"]): int(r["devices"]) for r in registry.query(
                "SELECT n, COUNT(*) AS devices FROM (SELECT device_id, COUNT(*) AS n FROM certificates "
                "WHERE device_id LIKE ? GROUP BY device_id) c GROUP BY n", [PREFIX + "%"])}
        finally:
            registry.close()
    return one, two, counts


def run(quick: bool = False, n: int | None = None) -> list[dict]:
    from tests.integration.pgfixtures import pg_bindir
    from tests.integration.rabbitfixtures import rabbitmq_missing

    why = rabbitmq_missing() or (None if pg_bindir() else "PostgreSQL is not installed (./dev.sh setup)")
    if why:
        return [{"metric": "two hubs on PostgreSQL", "value": f"skipped: {why}", "goal": "", "pass": None}]
    s = eb._settings(quick)
    s.n = n or (300 if quick else 1500)
    with tempfile.TemporaryDirectory(prefix="tessera-hubs-pg-") as tmp:
        tmp = Path(tmp)
        (tmp / "sqlite").mkdir()
        (tmp / "pg").mkdir()
        lite = sqlite_pass(tmp / "sqlite", s)
        one, two, counts = pg_passes(tmp / "pg", s)

    def rate(load: eb.LoadResult) -> float:
        return load.ok / load.wall_s

    def p99(load: eb.LoadResult) -> float:
        return eb._pct(load.latencies, 99) * 1000 if load.latencies else float("nan")

    once = counts == {"1": 2 * s.n}
    return [
        {"metric": f"SQLite, 1 hub: enrollments/s (n={s.n})", "value": rate(lite), "goal": "", "pass": None},
        {"metric": f"PostgreSQL, 1 hub: enrollments/s (n={s.n})", "value": rate(one), "goal": "", "pass": None},
        {"metric": f"PostgreSQL, 2 hubs: enrollments/s (n={s.n})", "value": rate(two), "goal": "", "pass": None},
        {"metric": "PostgreSQL 2 hubs / SQLite 1 hub", "value": rate(two) / rate(lite), "goal": "", "pass": None},
        {"metric": "PostgreSQL 2 hubs / 1 hub", "value": rate(two) / rate(one), "goal": "", "pass": None},
        {"metric": "enroll p99: SQLite / PG 1 hub / PG 2 hubs", "value":
         f"{p99(lite):.0f} / {p99(one):.0f} / {p99(two):.0f} ms", "goal": "", "pass": None},
        {"metric": "PG: one certificate per device (certificates per device: devices)", "value":
         ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())), "goal": f"1: {2 * s.n}", "pass": once},
    ]


def main(argv: list[str] | None = None) -> int:
    from bench.__main__ import render

    ap = argparse.ArgumentParser(prog="python -m bench.hubs_pg_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="300 enrollments per pass, not 1500")
    ap.add_argument("-n", type=int, help="enrollments per pass")
    args = ap.parse_args(argv)
    print(render(run(args.quick, args.n)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
