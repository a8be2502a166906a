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

``python -m bench.rabbitmq_bench --one-node [--connections 5000] [--publishers 4] [--revocations 20]``: one
Mosquitto's limits on this machine (the hub's broker with its plugin, no cluster). N devices enrolled over EST by
four client processes; the N raw 3.1.1 sessions opened by 3 client processes x 4 threads at once, all held. Rows: sessions
held, broker memory per connection (RSS delta / held) and what it makes per GB, sessions established per second
(N / the wall time of the opening, client TLS included: the client shares the 2 cores), broker CPU seconds per
1000 connects (utime + stime of the mosquitto process over the opening), then with the N sessions still held:
QoS 0 and QoS 1 messages/s through it (bench/broker_bench.py's K commander -> device pairs, 64-byte payloads) and
revoke -> cut (R devices, as in 3). The fd limits: this process raises its soft RLIMIT_NOFILE to the hard one and
`serve` and its mosquitto inherit it (the hub does not change it; the systemd unit sets LimitNOFILE=65536);
Mosquitto's max_connections is left at its default (-1: no limit); each session is one fd in the broker and one
in this process, so N may approach the hard limit less a few hundred.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import re
import resource
import socket
import ssl
import statistics
import struct
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.fleet import HOST, Dev, HubProcess, cpu_s, enroll, free_port, make_fleet  # noqa: E402

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


# --- one Mosquitto's limits (--one-node) -----------------------------------------------------------------------------

def _enroll_chunk(est_port: int, hub_dir: str, rows: list[tuple[str, str]], work: str) -> list[Dev]:
    return enroll(type("H", (), {"est_port": est_port, "dir": Path(hub_dir)})(), rows, Path(work))


def enroll_parallel(hub: HubProcess, rows: list[tuple[str, str]], work: Path, procs: int = 4) -> list[Dev]:
    """bench.fleet.enroll in `procs` spawned processes (the EST server has a worker per CPU); devices in order."""
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        parts = pool.starmap(_enroll_chunk, [(hub.est_port, str(hub.dir), rows[i::procs], str(work))
                                             for i in range(procs)])
    out: list[Dev | None] = [None] * len(rows)
    for i, part in enumerate(parts):
        out[i::procs] = part
    return out  # type: ignore[return-value]


HOLDER_PROCS, HOLDER_THREADS = 3, 4


def _holder(hub_dir: str, port: int, devs: list[Dev], barrier, cmds, results) -> None:
    """A client process: opens its sessions (HOLDER_THREADS at once) after the barrier, holds them; on each command
    "alive" reports how many are still open, on "close" closes them."""
    with ThreadPoolExecutor(HOLDER_THREADS) as pool:
        barrier.wait()
        start = time.time()
        socks = [s for s in pool.map(lambda d: open_session(Path(hub_dir), d, port), devs) if s is not None]
    results.put((start, time.time(), len(socks)))
    while cmds.get() == "alive":
        results.put(sum(1 for s in socks if alive(s)))
    for s in socks:
        s.close()


class Holders:
    """HOLDER_PROCS client processes holding the sessions of `devs` (split round-robin) on `port`."""

    def __init__(self, hub_dir: Path, port: int, devs: list[Dev]):
        ctx = multiprocessing.get_context("spawn")
        barrier, self.results = ctx.Barrier(HOLDER_PROCS + 1), ctx.Queue()
        self.cmds = [ctx.Queue() for _ in range(HOLDER_PROCS)]
        self.procs = [ctx.Process(target=_holder, args=(str(hub_dir), port, devs[i::HOLDER_PROCS], barrier,
                                                        self.cmds[i], self.results), daemon=True)
                      for i in range(HOLDER_PROCS)]
        for proc in self.procs:
            proc.start()
        barrier.wait(timeout=120)

    def opened(self) -> tuple[float, int]:
        """(seconds from the first process's start to the last one's end, sessions opened)."""
        got = [self.results.get(timeout=1800) for _ in self.procs]
        return max(g[1] for g in got) - min(g[0] for g in got), sum(g[2] for g in got)

    def alive(self) -> int:
        for q in self.cmds:
            q.put("alive")
        return sum(self.results.get(timeout=300) for _ in self.procs)

    def close(self) -> None:
        for q in self.cmds:
            q.put("close")
        for proc in self.procs:
            proc.join(60)
            if proc.is_alive():
                proc.kill()


def _nofile(pid: int) -> str:
    """The soft RLIMIT_NOFILE of process `pid` (/proc/<pid>/limits), as text."""
    m = re.search(r"^Max open files\s+(\S+)", Path(f"/proc/{pid}/limits").read_text(), re.M)
    return m.group(1) if m else "?"


def one_node(connections: int, publishers: int, revocations: int) -> list[dict]:
    """One Mosquitto (the hub's, with its plugin): sessions held, memory, connect rate and CPU, messages/s, cut."""
    from bench.broker_bench import _commanders, _publish_run

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if connections + 500 > hard:
        raise SystemExit(f"--connections {connections} needs RLIMIT_NOFILE above {connections + 500} (hard {hard})")
    n, k = connections, publishers
    with tempfile.TemporaryDirectory(prefix="tessera-mosq-limits-") as tmp:
        tmp = Path(tmp)
        hub_dir, tokens = make_fleet(tmp, n + revocations + k, FLEET, PREFIX,
                                     (("connect_rate", "1000000"), ("connect_burst", "1000000")))
        hub = HubProcess(hub_dir)
        hub.start()
        try:
            (work := tmp / "devices").mkdir()
            t0 = time.monotonic()
            devs = enroll_parallel(hub, tokens, work)
            enrolled_s = time.monotonic() - t0
            commanders = _commanders(hub_dir, k)
            held_devs, rev_devs, sub_devs = devs[:n], devs[n:n + revocations], devs[n + revocations:]
            pid = hub.broker_pid
            broker_fds = _nofile(pid)
            rss0, cpu0 = rss_kb([pid]), cpu_s(pid)
            holders = Holders(hub_dir, hub.mqtt_port, held_devs)
            try:
                open_s, held = holders.opened()
                open_cpu = cpu_s(pid) - cpu0
                time.sleep(2)
                held, rss1 = holders.alive(), rss_kb([pid])
                cafile = str(hub_dir / "ca" / "root.pem")
                pairs = list(zip(commanders, sub_devs))
                q0 = _publish_run(hub.mqtt_port, cafile, pairs, 0, 40000, pid)
                q1 = _publish_run(hub.mqtt_port, cafile, pairs, 1, 16000, pid)
                cuts = revoke_cut(hub_dir, rev_devs, hub.mqtt_port)
                still = holders.alive()
            finally:
                holders.close()
        finally:
            hub.shutdown()
    kb = (rss1 - rss0) / max(1, held)
    load = os.getloadavg()[0]
    info = {"goal": "", "pass": None}
    return [
        {"metric": f"Mosquitto: live sessions held (of {n})", "value": held, "goal": f"{n}",
         "pass": held == n},
        {"metric": "  still held after the message and revoke runs", "value": still, "goal": f"{held}",
         "pass": still == held},
        {"metric": "Mosquitto: memory per connection", "value": kb, "unit": "kB", **info},
        {"metric": "  connections per GB of broker RSS", "value": 1024 * 1024 / kb if kb > 0 else float("nan"),
         **info},
        {"metric": f"  broker RSS with {held} sessions", "value": rss1 / 1024, "unit": "MB", **info},
        {"metric": f"Mosquitto: sessions established/s ({HOLDER_PROCS}x{HOLDER_THREADS} client threads, same 2 cores)",
         "value": n / open_s, "unit": "/s", **info},
        {"metric": "  broker CPU seconds per 1000 connects", "value": open_cpu / n * 1000, "unit": "s", **info},
        {"metric": "  broker CPU share of the opening (% of one core)", "value": open_cpu / open_s * 100,
         "unit": "%", **info},
        {"metric": "  one core's ceiling at that CPU per connect (projection)", "value": n / open_cpu if open_cpu
         else float("nan"), "unit": "/s", "goal": "info (projection)", "pass": None},
        {"metric": f"Mosquitto: QoS 0 msgs/s with {held} held ({k} pairs)", "value": q0["rate"], "unit": "/s",
         **info},
        {"metric": "  broker CPU per message QoS 0", "value": q0["broker_cpu_us"], "unit": "us", **info},
        {"metric": f"Mosquitto: QoS 1 msgs/s with {held} held ({k} pairs)", "value": q1["rate"], "unit": "/s",
         **info},
        {"metric": "  broker CPU per message QoS 1", "value": q1["broker_cpu_us"], "unit": "us", **info},
        {"metric": f"Mosquitto: revoke -> cut p50 (n={len(cuts)}, {held} held)",
         "value": statistics.median(cuts) * 1000, "unit": "ms", **info},
        {"metric": f"Mosquitto: revoke -> cut p99 (n={len(cuts)}, {held} held)", "value": pct(cuts, 99) * 1000,
         "unit": "ms", "goal": "<= 1000 ms", "pass": pct(cuts, 99) <= 1.0},
        {"metric": f"(setup: {n + revocations + k} devices enrolled over EST in {enrolled_s:.0f} s; fd limit "
                   f"{hard}, the broker's {broker_fds}; load average at the end {load:.2f})", "value": "", **info},
    ]


def main(argv: list[str] | None = None) -> int:
    from bench.__main__ import render

    ap = argparse.ArgumentParser(prog="python -m bench.rabbitmq_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the comparison with 300 sessions and 10 revocations")
    ap.add_argument("--one-node", action="store_true", help="one Mosquitto's limits on this machine (no cluster)")
    ap.add_argument("--connections", type=int, default=5000, help="--one-node: sessions to open and hold")
    ap.add_argument("--publishers", type=int, default=4, help="--one-node: commander -> device pairs publishing")
    ap.add_argument("--revocations", type=int, default=20, help="--one-node: revoke -> cut samples")
    args = ap.parse_args(argv)
    if args.connections < 1 or args.publishers < 1 or args.revocations < 1:
        ap.error("--connections, --publishers and --revocations must be at least 1")
    started = time.monotonic()
    rows = one_node(args.connections, args.publishers, args.revocations) if args.one_node else run(args.quick)
    print(f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {os.cpu_count()} CPUs, "
          f"{time.monotonic() - started:.0f} s")
    print(render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
