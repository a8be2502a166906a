"""A RabbitMQ cluster served by two hubs, each beside its own nodes: what a node's hub being down costs.

``python -m bench.colocate_bench [-k K]``: tests/integration/test_hubs_pg.py's colocated_hubs (hub A serves r1,
hub B, joined with `init --join`, serves r2 and r3; one PostgreSQL registry of the bench's own), then per case K
samples (median and max, seconds):
- connect r2 (B's node), both hubs up / A killed: TLS + CONNACK of an admitted device;
- refuse r1 with A killed: how long a connect through the node whose hub is down takes to be refused;
- revoke -> cut: `device revoke` issued to one hub until the session (on a node of the other hub, or on r1 with
  A killed: B's kicks pass over r1's refused management login) is closed;
- the hubs' own MQTT sessions: lines "admin connection lost" in each serve's log per second while both run (both
  hubs log in with the one client id `tessera-hub`, and RabbitMQ's client-id tracking is cluster-wide).
Cost: about 2 min (cluster start ~30-50 s on 2 busy cores).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def run(k: int = 5) -> list[tuple[str, float, float]]:
    import paho.mqtt.client as mqtt

    from tests.integration.brokerfixtures import ConnectRefused, MqttSession, enroll_device
    from tests.integration.pgfixtures import pg_running
    from tests.integration.test_hubs_pg import colocated_hubs

    rows: list[tuple[str, list[float]]] = []
    with tempfile.TemporaryDirectory(prefix="colocate-bench-") as tmp, pg_running() as pg:
        base = Path(tmp)
        with colocated_hubs(base, pg.url(pg.create_database())) as (a, b, cluster):
            r1, r2, _ = (n.mqtt_port for n in cluster.nodes)
            devs = iter([enroll_device(a, f"cb-{i}", base / "devs") for i in range(6 * k + 1)])  # A is killed later

            def session(hub, port):
                dev = next(devs)
                return MqttSession(hub, dev.chain, dev.key, dev.id, port=port, protocol=mqtt.MQTTv311)

            def connect_time(hub, port) -> float:
                s = session(hub, port)
                t = time.monotonic()
                s.connect()
                took = time.monotonic() - t
                s.close()
                return took

            def cut_time(revoker, holder, port, s=None) -> float:
                s = s or session(holder, port).connect()
                t = time.monotonic()
                revoker.cli_ok("device", "revoke", s.client_id, "--reason", "keyCompromise")
                assert s.disconnected.wait(10), f"{s.client_id} not cut"
                took = s.disconnect_at - t
                s.close()
                return took

            flaps_from = {h.dir: h.stderr_path.read_text().count("admin connection lost") for h in (a, b)}
            t0 = time.monotonic()
            rows.append(("connect r2, both hubs up", [connect_time(b, r2) for _ in range(k)]))
            rows.append(("revoke at A -> cut on r2", [cut_time(a, b, r2) for _ in range(k)]))
            rows.append(("revoke at B -> cut on r1", [cut_time(b, a, r1) for _ in range(k)]))
            span = time.monotonic() - t0
            for h, name in ((a, "A"), (b, "B")):
                n = h.stderr_path.read_text().count("admin connection lost") - flaps_from[h.dir]
                rows.append((f"hub {name} admin session drops per s (both up)", [n / span]))
            held = session(a, r1).connect()
            on_r1 = [session(a, r1).connect() for _ in range(k)]  # a new connect through r1 fails once A is gone
            a.kill()
            rows.append(("connect r2, A killed", [connect_time(b, r2) for _ in range(k)]))
            refused = []
            for _ in range(k):
                s, t = session(b, r1), time.monotonic()
                try:
                    s.connect(timeout=10)
                    raise AssertionError("r1 admitted with its hub down")
                except ConnectRefused:
                    refused.append(time.monotonic() - t)
                finally:
                    s.close()
            rows.append(("refuse r1, A killed", refused))
            rows.append(("revoke at B -> cut on r1, A killed", [cut_time(b, a, r1, s) for s in on_r1]))
            assert held.connected, "the session held on r1 dropped with its hub"
            held.close()
    return [(name, statistics.median(v), max(v)) for name, v in rows]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", type=int, default=5, help="samples per case")
    args = ap.parse_args(argv)
    print(f"{'case':<48} {'median s':>9} {'max s':>9}")
    for name, med, mx in run(args.k):
        print(f"{name:<48} {med:>9.3f} {mx:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
