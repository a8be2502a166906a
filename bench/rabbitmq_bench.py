"""RabbitMQ driver benchmarks: live connections held by one Mosquitto vs a 3-node RabbitMQ cluster on this
machine, broker memory per connection, and revoke -> session cut on the cluster.

``python -m bench rabbitmq [--quick]`` (or ``python -m bench.rabbitmq_bench``). Full run a few minutes (most of it
enrolling devices), quick about two.

Setup: one fleet (``tessera-hub init``, lenient limits), N + R devices enrolled over EST (P-256 file keys) while
``tessera-hub serve`` runs with its Mosquitto. Then:
1. Mosquitto: N raw MQTT 3.1.1 sessions (TLS 1.3 with the device's certificate, CONNECT with client id = device,
   keepalive 0, clean session), opened one after the other and all held open. Broker RSS (/proc/<pid>/status
   VmRSS) before and after: memory per connection = delta / N; "held" = sessions with CONNACK 0 still open at the
   end.
2. The same hub directory served with ``[broker] kind = "rabbitmq"`` pointed at a 3-node cluster on loopback
   (tests/integration/rabbitfixtures.py: node files rendered by the driver, ``rabbitmqctl join_cluster``); the N
   sessions spread round-robin over the nodes; RSS = the sum over every process of the three nodes.
   Ratio: cluster / Mosquitto memory per connection (info: there is no goal for it).
3. Revoke -> cut on the cluster (R, quick 10): a fresh device holds a session on node 2; ``set_status revoked``
   goes to the hub's admin socket (the hub talks to node 1: registry commit, listener CRL, management API kick
   by user name); time from the call to the session's EOF. Goal p99 <= 1 s (no auth cache: nothing to wait out).
   Nearest-rank percentiles.
"""

from __future__ import annotations

import math
import re
import resource
import socket
import ssl
import statistics
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.fleet import HOST, Dev, HubProcess, enroll, free_port, make_fleet  # noqa: E402

FLEET = "acme"
PREFIX = "rb"


@dataclass
class Settings:
    connections: int = 1500
    revocations: int = 50


def _settings(quick: bool) -> Settings:
    return Settings(connections=300, revocations=10) if quick else Settings()


def _context(hub_dir: Path, dev: Dev) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(hub_dir / "ca" / "root.pem"))
    ctx.load_cert_chain(dev.chain, dev.key)
    return ctx


def _connect_packet(client_id: str) -> bytes:
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x00" + struct.pack("!H", len(cid)) + cid  # 3.1.1, clean session, keepalive 0
    return bytes([0x10, len(body)]) + body


def open_session(hub_dir: Path, dev: Dev, port: int) -> ssl.SSLSocket | None:
    """TLS + CONNECT; the socket if CONNACK 0, else None."""
    try:
        raw = socket.create_connection((HOST, port), timeout=10)
        sock = _context(hub_dir, dev).wrap_socket(raw)
        sock.sendall(_connect_packet(dev.id))
        ack = b""
        while len(ack) < 4:
            chunk = sock.recv(4 - len(ack))
            if not chunk:
                return None
            ack += chunk
        if ack[0] != 0x20 or ack[3] != 0:
            sock.close()
            return None
        return sock
    except (OSError, ssl.SSLError):
        return None


def alive(sock: ssl.SSLSocket) -> bool:
    sock.settimeout(0)
    try:
        return sock.recv(1) != b""
    except (BlockingIOError, ssl.SSLWantReadError):
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(10)


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
        total += int(m.group(1)) if m else 0
    return total


def group_pids(pgids: list[int]) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[2]) in pgids:  # field 5: pgrp
                out.append(int(entry.name))
    return out


def hold(hub_dir: Path, devs: list[Dev], ports: list[int], pids) -> dict:
    before = rss_kb(pids())
    socks = [open_session(hub_dir, d, ports[i % len(ports)]) for i, d in enumerate(devs)]
    time.sleep(2)  # let the brokers settle (RabbitMQ: per-connection processes, stats emission)
    held = [s for s in socks if s is not None and alive(s)]
    after = rss_kb(pids())
    for s in socks:
        if s is not None:
            s.close()
    return {"held": len(held), "kb_per_conn": (after - before) / max(1, len(held)), "rss_mb": after / 1024}


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def _admin(hub_dir: Path, request: dict) -> dict:
    from hub.serve import admin

    return admin.call(hub_dir / "admin.sock", request, timeout=30)


def revoke_cut(hub_dir: Path, devs: list[Dev], port: int) -> list[float]:
    out = []
    for dev in devs:
        sock = open_session(hub_dir, dev, port)
        if sock is None:
            raise RuntimeError(f"{dev.id} could not connect to port {port}")
        time.sleep(0.1)
        t0 = time.monotonic()
        _admin(hub_dir, {"op": "set_status", "device": dev.id, "status": "revoked", "reason": "bench",
                         "actor": "bench"})
        sock.settimeout(5)
        try:
            while sock.recv(64):
                pass
        except (OSError, ssl.SSLError):
            pass
        out.append(time.monotonic() - t0)
        sock.close()
    return out


def _set_broker(hub_dir: Path, kind: str, urls: list[str], auth_port: int) -> None:
    toml = hub_dir / "fleet.toml"
    text = toml.read_text()
    for key, value in (("kind", f'"{kind}"'), ("management_urls", "[" + ", ".join(f'"{u}"' for u in urls) + "]"),
                       ("auth_port", str(auth_port))):
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        if n != 1:
            raise RuntimeError(f"fleet.toml has no single {key} line")
    toml.write_text(text)


def run(quick: bool = False) -> list[dict]:
    from tests.integration.rabbitfixtures import RabbitCluster, rabbitmq_missing, render_with_driver

    why = rabbitmq_missing()
    if why:
        return [{"metric": "rabbitmq benchmark", "value": f"skipped: {why}", "goal": "", "pass": None}]
    st = _settings(quick)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tessera-rmq-bench-") as tmp:
        tmp = Path(tmp)
        hub_dir, tokens = make_fleet(tmp, st.connections + st.revocations, FLEET, PREFIX,
                                     (("connect_rate", "1000000"), ("connect_burst", "1000000")))
        hub = HubProcess(hub_dir)
        hub.start()
        try:
            devs = enroll(hub, tokens, tmp)
            conn_devs, rev_devs = devs[:st.connections], devs[st.connections:]
            mosq = hold(hub_dir, conn_devs, [hub.mqtt_port], lambda: [hub.broker_pid])
        finally:
            hub.shutdown()
        cluster = RabbitCluster(tmp, 3)
        _set_broker(hub_dir, "rabbitmq", [f"http://{n.host}:{n.mgmt_port}" for n in cluster.nodes], free_port())
        try:
            cluster.start(render_with_driver(type("H", (), {"dir": hub_dir})()))
            hub = HubProcess(hub_dir)
            hub.mqtt_port = cluster.nodes[0].mqtt_port
            hub.start(timeout=90)
            try:
                pgids = [p.pid for p in cluster.procs.values()]
                rmq = hold(hub_dir, conn_devs, [n.mqtt_port for n in cluster.nodes], lambda: group_pids(pgids))
                cuts = revoke_cut(hub_dir, rev_devs, cluster.nodes[1].mqtt_port)
            finally:
                hub.shutdown()
        finally:
            cluster.stop()
    n = st.connections
    rows += [
        {"metric": f"Mosquitto: live sessions held (of {n})", "value": mosq["held"], "goal": f"{n}",
         "pass": mosq["held"] == n},
        {"metric": f"RabbitMQ 3 nodes: live sessions held (of {n})", "value": rmq["held"], "goal": f"{n}",
         "pass": rmq["held"] == n},
        {"metric": "Mosquitto: memory per connection", "value": mosq["kb_per_conn"], "unit": "kB", "goal": "",
         "pass": None},
        {"metric": "RabbitMQ 3 nodes: memory per connection", "value": rmq["kb_per_conn"], "unit": "kB",
         "goal": "", "pass": None},
        {"metric": "RabbitMQ / Mosquitto memory per connection", "value":
         rmq["kb_per_conn"] / mosq["kb_per_conn"] if mosq["kb_per_conn"] > 0 else float("nan"), "goal": "",
         "pass": None},
        {"metric": "RabbitMQ 3 nodes: RSS with the sessions", "value": rmq["rss_mb"], "unit": "MB", "goal": "",
         "pass": None},
        {"metric": f"RabbitMQ: revoke -> cut p50 (n={len(cuts)})", "value": statistics.median(cuts) * 1000,
         "unit": "ms", "goal": "", "pass": None},
        {"metric": f"RabbitMQ: revoke -> cut p99 (n={len(cuts)})", "value": pct(cuts, 99) * 1000, "unit": "ms",
         "goal": "<= 1000 ms", "pass": pct(cuts, 99) <= 1.0},
    ]
    return rows


if __name__ == "__main__":
    from bench.__main__ import render

    print(render(run(quick="--quick" in sys.argv)))
