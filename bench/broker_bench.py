"""Broker benchmarks of the hub: revocation latency, mTLS connection rate, registry size and publish throughput.

``python -m bench.broker_bench [--quick]`` prints a result table; ``run(quick)`` returns the rows (dicts: metric,
value, goal, pass; "info" rows only report a number). Full run a few minutes (about a minute of it building the
1M-device registry), quick about a minute.

Setup: a fleet from ``tessera-hub init`` in a temp dir (rate limits raised: every request comes from 127.0.0.1, and
a device connects hundreds of times a second), devices registered with ``tessera-hub token create`` and enrolled
through EST (P-256 file keys), four ``commander`` service identities (``tessera-hub identity add``), ``tessera-hub
serve`` on free ports (SIGTERM at the end; no mosquitto may outlive it). Its broker runs the Tessera authz plugin.
From copies of the hub's generated mosquitto.conf (own port, persistence and log, own session like the hub's) the
bench also starts a *bare* mosquitto (no ``plugin``/``plugin_opt_*`` lines but ``use_identity_as_username true``:
mTLS alone admits, nothing is authorized) and a *big* one (the plugin reading the registry of 3). All three
brokers are pinned to the same CPU (with 2 CPUs, a broker sharing one with a busy process for a whole run skews it).

1. Revocation (50, quick 10): a fresh device holds a live MQTT v5 session (paho); ``set_status revoked`` goes to
   the admin socket: the hub's ``timings.total_ms`` (registry commit + broker sync, which returns once the plugin
   has kicked the session), goal p99 <= 20 ms. Once the call has returned and on_disconnect fired, the device
   reconnects (new TLS + CONNECT, as an agent would; a CONNECT before the cut would take the session over, one
   during the hub's sync would compete with it for the CPU): call to CONNACK 0x87, goal p99 <= 1 s.
   Then (20, quick 5) ``tessera-hub device revoke`` as an operator runs it: process start to on_disconnect, goal
   p99 <= 300 ms. Nearest-rank percentiles.
2. New mTLS connections per second: client processes x threads, each connection a new TCP connection, a FULL TLS
   handshake (fresh context per process, no session reused), MQTT v5 CONNECT, CONNACK, DISCONNECT; one device per
   thread (client id = CN = principal: no takeovers). Hub, bare and big brokers in alternating rounds (a b c,
   c b a, ...; a warm-up slot each first). Goal: hub / bare >= 0.95, median of the per-round ratios.
3. Registry size: a sqlite3 backup of the hub's registry after 1 (so it holds the bench's devices) gets 1M devices
   (quick 100k) with an active certificate each and 100k (quick 10k) of them an older revoked one: plain SQL,
   executemany in one transaction, the column formats of hub/registry/store.py (random 159-bit serials in hex, inserted
   in ascending order; validity, subject and PEM copied from a real row). Only the registry (and the hub's own
   session, which only the hub's broker has) differ between the big broker and the hub's. Broker CPU (utime +
   stime, /proc/<pid>/stat) per connection over the slots of 2: big / hub, median of the per-round ratios, goal
   <= 1.1. The build time is reported.
4. Publish throughput with authorization (hub's broker) vs without (bare): four pairs, a commander identity
   publishing N messages (64-byte payload) to devices/<id>/commands and that device's session subscribed there
   counting them (a flow the roles allow and the hub's own session does not subscribe to). A raw single-threaded
   MQTT v5 client (pipelined: at most 500 messages outstanding per pair for QoS 0, the broker's Receive Maximum
   for QoS 1) so the broker, not the client, is the bottleneck as far as possible; broker CPU per message too.
   Goal: hub / bare >= 0.95 for QoS 0 and QoS 1, median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing as mp
import os
import selectors
import shutil
import socket
import sqlite3
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HOST = "127.0.0.1"
from bench.fleet import (Dev, HubProcess, cpu_s, enroll, env as _env, free_port as _free_port,  # noqa: E402
                         hub_cmd as _hub_cmd, make_fleet, pdeathsig)

FLEET = "acme"
PREFIX = "bb"
PAYLOAD = b"x" * 64
WARMUP_S = 0.8
#: fleet.toml [mqtt]: the plugin's per-principal connect bucket must not throttle the connection benchmark
MQTT_LIMITS = (("connect_rate", "1000000"), ("connect_burst", "1000000"))
NOT_AUTHORIZED = 0x87


@dataclass
class Settings:
    revocations: int = 50  # through the admin socket
    cli_revocations: int = 20  # through `tessera-hub device revoke`
    conn_seconds: float = 2.5  # per slot
    conn_rounds: int = 4  # slots per broker, alternating
    procs: int = 2
    threads: int = 2
    big_devices: int = 1_000_000
    big_revoked: int = 100_000
    qos0_n: int = 40000
    qos1_n: int = 16000
    pub_rounds: int = 8  # runs per broker, alternating (short runs, adjacent in time: the machine's load drifts)
    pub_pairs: int = 4  # (commander, device) pairs publishing at once


def _settings(quick: bool) -> Settings:
    if quick:
        return Settings(revocations=10, cli_revocations=5, conn_seconds=1.0, conn_rounds=6, big_devices=100_000,
                        big_revoked=10_000, qos0_n=16000, qos1_n=6000, pub_rounds=6)
    return Settings()


# --- processes and files --------------------------------------------------------------------------------------------

class CopyBroker:
    """A mosquitto from the hub's generated mosquitto.conf on its own port, persistence dir and log. `registry=None`:
    bare (no plugin lines; use_identity_as_username, else nobody could connect); else the plugin reads `registry`."""

    def __init__(self, hub: HubProcess, work: Path, registry: Path | None = None):
        self.dir = work
        work.mkdir(parents=True, exist_ok=True)
        (work / "data").mkdir(exist_ok=True)
        self.port = _free_port()
        lines = []
        for line in (hub.dir / "broker" / "mosquitto.conf").read_text().splitlines():
            key = line.split(" ", 1)[0]
            if registry is None and key.startswith("plugin"):
                continue
            if key == "plugin_opt_registry":
                line = f"plugin_opt_registry {registry}"
            elif key == "listener":
                line = f"listener {self.port} {HOST}"
            elif key == "persistence_location":
                line = f"persistence_location {work / 'data'}/"
            elif key == "log_dest":
                line = f"log_dest file {work / 'mosquitto.log'}"
            lines.append(line)
        if registry is None:
            lines.append("use_identity_as_username true")
        self.conf = work / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.dir / "stdout", "wb") as out:
            # its own session, as the hub's broker is in the hub's: with autogroup scheduling a broker in the bench's
            # session would share one CPU share with the bench's clients
            self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=pdeathsig)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((HOST, self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = self.dir / "mosquitto.log"
                    raise RuntimeError(f"mosquitto {self.conf} did not start: {(self.dir / 'stdout').read_text()}"
                                       f"{log.read_text()[-1000:] if log.exists() else ''}")
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# --- fleet ----------------------------------------------------------------------------------------------------------

def _commanders(hub_dir: Path, n: int) -> list[Dev]:
    """n service identities of role commander (`tessera-hub identity add`, run at once), files in the hub dir."""
    names = [f"{PREFIX}-pub-{i}" for i in range(1, n + 1)]
    procs = [subprocess.Popen([*_hub_cmd(), "identity", "add", name, "--role", "commander", "--dir", str(hub_dir)],
                              env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for name in names]
    for name, proc in zip(names, procs):
        if proc.wait(120) != 0:
            raise RuntimeError(f"identity add {name} failed: {proc.stderr.read().decode()[-1000:]}")
        proc.stderr.close()
    return [Dev(f"svc.{name}", str(hub_dir / "identities" / name / f"{name}.pem"),
                str(hub_dir / "identities" / name / f"{name}.key")) for name in names]


def build_big_registry(src: Path, dest: Path, devices: int, revoked: int) -> dict:
    """Copy the registry `src` to `dest` (sqlite3 backup), then add `devices` active devices with one active
    certificate each, and an older revoked certificate to the first `revoked` of them, in one transaction.

    Every value has the format hub/registry/store.py writes (timestamps, validity, subject and PEM are copied from a
    real certificate row of `src`; ids big-NNNNNNN; serials format(random 159-bit int, "x"), inserted in ascending
    order like the device ids, so every index grows at its end). Returns {"seconds", "bytes"}."""
    t0 = time.monotonic()
    with contextlib.closing(sqlite3.connect(src)) as s, contextlib.closing(sqlite3.connect(dest)) as d:
        s.backup(d)
    db = sqlite3.connect(dest, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = OFF")  # a scratch file: no journal while it is built
        db.execute("PRAGMA synchronous = OFF")
        db.execute("PRAGMA cache_size = -262144")
        tpl_id, subject, nb, na, issued, pem, fleet = db.execute(
            "SELECT c.device_id, c.subject, c.not_before, c.not_after, c.issued_at, c.pem, d.fleet FROM certificates c "
            "JOIN devices d ON d.id = c.device_id ORDER BY c.issued_at LIMIT 1").fetchone()
        ids = [f"big-{i:07d}" for i in range(devices)]
        serials = sorted({format(int.from_bytes(os.urandom(20), "big") >> 1, "x") for _ in range(devices + revoked)})
        while len(serials) < devices + revoked:  # a collision: astronomically rare
            serials = sorted({*serials, format(int.from_bytes(os.urandom(20), "big") >> 1, "x")})

        def certs():
            k = 0
            for i, dev in enumerate(ids):
                sub = subject.replace(tpl_id, dev)
                if i < revoked:
                    yield (serials[k], dev, sub, nb, na, os.urandom(32).hex(), "revoked", issued, "keyCompromise",
                           issued, pem)
                    k += 1
                yield serials[k], dev, sub, nb, na, os.urandom(32).hex(), "active", None, None, issued, pem
                k += 1

        db.execute("BEGIN")
        db.executemany("INSERT INTO devices (id, fleet, status, labels, groups, created, last_seen, online) "
                       "VALUES (?, ?, 'active', '{}', '[]', ?, NULL, 0)", ((i, fleet, issued) for i in ids))
        db.executemany("INSERT INTO certificates (serial, device_id, subject, not_before, not_after, "
                       "fingerprint_sha256, status, revoked_at, revocation_reason, issued_at, pem, grace_until) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)", certs())
        db.execute("COMMIT")
        db.execute("PRAGMA journal_mode = WAL")  # as the hub's registry
    finally:
        db.close()
    return {"seconds": time.monotonic() - t0, "bytes": dest.stat().st_size}


def _context(cafile: str, dev: Dev) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=cafile)
    ctx.load_cert_chain(dev.chain, dev.key)
    return ctx


# --- MQTT bytes -----------------------------------------------------------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _connect_packet(client_id: str) -> bytes:
    cid = client_id.encode()
    body = (struct.pack("!H", 4) + b"MQTT" + bytes([5, 0x02]) + struct.pack("!H", 30) + b"\x00"
            + struct.pack("!H", len(cid)) + cid)
    return b"\x10" + _varint(len(body)) + body


DISCONNECT = b"\xe0\x00"


class Refused(ConnectionError):
    """The broker answered CONNECT with a failure reason code (`code`)."""

    def __init__(self, code: int):
        super().__init__(f"CONNACK reason {code:#x}")
        self.code = code


def _read_packet(sock) -> tuple[int, bytes]:
    def exact(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed by the broker")
            data += chunk
        return data

    head, size = exact(1)[0], exact(1)
    while size[-1] & 0x80:
        size += exact(1)
    return head, exact(_decode_varint(size, 0)[0])


def _mqtt_connect(port: int, ctx: ssl.SSLContext, client_id: str, timeout: float = 10.0) -> tuple[ssl.SSLSocket, int]:
    """TCP + TLS + CONNECT/CONNACK; returns (socket, broker's Receive Maximum); Refused if CONNACK says no."""
    raw = socket.create_connection((HOST, port), timeout=timeout)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock = ctx.wrap_socket(raw, server_hostname=HOST)
    sock.sendall(_connect_packet(client_id))
    head, body = _read_packet(sock)
    if head >> 4 != 2 or len(body) < 2 or body[1] != 0:
        sock.close()
        if head >> 4 == 2 and len(body) >= 2:
            raise Refused(body[1])
        raise ConnectionError(f"not a CONNACK: {head:#x} {body!r}")
    receive_max = 65535
    plen, pos = _decode_varint(body, 2)
    end = pos + plen
    while pos < end:  # properties: find Receive Maximum (0x21)
        pid = body[pos]
        pos += 1
        if pid == 0x21:
            receive_max = struct.unpack_from("!H", body, pos)[0]
            pos += 2
        elif pid in (0x24, 0x25, 0x28, 0x29, 0x2A, 0x01, 0x17, 0x19):
            pos += 1
        elif pid in (0x13, 0x22, 0x23):
            pos += 2
        elif pid in (0x11, 0x27, 0x02, 0x18):
            pos += 4
        else:
            break
    return sock, receive_max


def _decode_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, mult = 0, 1
    while True:
        b = data[pos]
        pos += 1
        value += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            return value, pos


# --- 1. revocation --------------------------------------------------------------------------------------------------

def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else float("nan")


def _connack(port: int, ctx: ssl.SSLContext, client_id: str) -> int | None:
    """One new TLS + CONNECT: the CONNACK reason code (0: accepted, and disconnected again), None if no answer."""
    try:
        sock, _ = _mqtt_connect(port, ctx, client_id, timeout=2)
    except Refused as exc:
        return exc.code
    except (OSError, ConnectionError):
        return None
    with contextlib.suppress(OSError):
        sock.sendall(DISCONNECT)
    sock.close()
    return 0


def bench_revocation(hub: HubProcess, devs: list[Dev], via_cli: bool) -> dict:
    """Revoke each device while it holds a live session: through the admin socket (the hub's timings, the cut,
    the refused reconnect) or with `tessera-hub device revoke` (process start to the cut). Times in ms."""
    import paho.mqtt.client as mqtt

    from hub.serve import admin

    cafile = str(hub.dir / "ca" / "root.pem")
    out: dict[str, list] = {k: [] for k in ("cuts", "refusals", "total", "registry", "sync", "cli_exit", "errors")}
    errors = out["errors"]
    for dev in devs:
        connected, disconnected = threading.Event(), threading.Event()
        stamp: dict[str, float] = {}

        def on_disconnect(client, userdata, flags, rc, props):
            stamp.setdefault("cut", time.monotonic())
            disconnected.set()

        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=dev.id, protocol=mqtt.MQTTv5,
                        reconnect_on_failure=False)
        ctx = _context(cafile, dev)
        c.tls_set_context(ctx)
        c.on_connect = lambda *a: connected.set()
        c.on_disconnect = on_disconnect
        c.connect(HOST, hub.mqtt_port, keepalive=30)
        c.loop_start()
        try:
            if not connected.wait(10):
                raise RuntimeError(f"{dev.id} did not connect")

            t0 = time.monotonic()
            if via_cli:
                proc = subprocess.run([*_hub_cmd(), "device", "revoke", dev.id, "--reason", "keyCompromise",
                                       "--dir", str(hub.dir)], env=_env(), capture_output=True, text=True,
                                      timeout=60, stdin=subprocess.DEVNULL)
                out["cli_exit"].append((time.monotonic() - t0) * 1000)
                if proc.returncode != 0 or "running hub" not in proc.stdout:
                    errors.append(f"{dev.id}: device revoke exited {proc.returncode}: {proc.stdout}{proc.stderr}")
            else:
                result = admin.call(hub.dir / "admin.sock", {"op": "set_status", "device": dev.id,
                                                              "status": "revoked", "reason": "keyCompromise",
                                                              "actor": "bench"})
                for k in ("total", "registry", "sync"):
                    out[k].append(result["timings"][f"{k}_ms"])
                if result["kicked"] != 1:
                    errors.append(f"{dev.id}: set_status kicked {result['kicked']!r} sessions")
            if not disconnected.wait(5):
                errors.append(f"{dev.id}: session not cut")
                continue
            out["cuts"].append((stamp["cut"] - t0) * 1000)
            while not via_cli:  # reconnect as an agent would, now that it is cut off
                code = _connack(hub.mqtt_port, ctx, dev.id)
                if code is None and time.monotonic() < t0 + 5:
                    continue
                if code == NOT_AUTHORIZED:
                    out["refusals"].append((time.monotonic() - t0) * 1000)
                    if _connack(hub.mqtt_port, ctx, dev.id) != NOT_AUTHORIZED:
                        errors.append(f"{dev.id}: a later reconnect was not refused")
                else:
                    errors.append(f"{dev.id}: reconnect after the revocation answered {code!r}")
                break
        finally:
            c.disconnect()
            c.loop_stop()
    return out
# --- 2. connection rate (and 3: broker CPU per connection) ----------------------------------------------------------

def _conn_worker(cafile: str, devs: list[tuple[str, str, str]], schedule_q, results) -> None:
    """One client process: a thread per device; each runs new TCP + full TLS + CONNECT/CONNACK/DISCONNECT in a loop
    during every slot of the schedule [(port, start, end), ...] (wall-clock times) and counts completions."""
    contexts = [_context(cafile, Dev(*d)) for d in devs]
    results.put("ready")
    schedule = schedule_q.get()
    counts = [[0] * len(schedule) for _ in devs]
    errors, reused = [0] * len(devs), [0] * len(devs)

    def loop(i: int) -> None:
        dev_id = devs[i][0]
        for k, (port, start, end) in enumerate(schedule):
            while time.time() < start:
                time.sleep(0.0005)
            while time.time() < end:
                try:
                    sock, _ = _mqtt_connect(port, contexts[i], dev_id)
                    reused[i] += sock.session_reused
                    sock.sendall(DISCONNECT)
                    sock.close()
                    counts[i][k] += 1
                except (OSError, ConnectionError):
                    errors[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(devs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put(([sum(c[k] for c in counts) for k in range(len(schedule))], sum(errors), sum(reused)))


def bench_connections(targets: dict[str, tuple[int, int]], cafile: str, devs: list[Dev], s: Settings) -> dict:
    """Alternating slots over `targets` {name: (port, broker pid)} (a b c, c b a, ...), the same client processes
    for all. Per target: total rate, per-round rates and per-round broker CPU per connection (us)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    queues = [ctx.Queue() for _ in range(s.procs)]
    groups = [devs[i * s.threads:(i + 1) * s.threads] for i in range(s.procs)]
    procs = [ctx.Process(target=_conn_worker, args=(cafile, [(d.id, d.chain, d.key) for d in g], q, results),
                         daemon=True) for g, q in zip(groups, queues)]
    for p in procs:
        p.start()
    for _ in procs:
        if results.get(timeout=60) != "ready":
            raise RuntimeError("connection worker failed to start")
    names = list(targets)
    order = []
    for r in range(s.conn_rounds):  # a b c, c b a, ...: a round's slots are adjacent in time; cancels drift
        order += names if r % 2 == 0 else names[::-1]
    t = time.time() + 0.3
    schedule, slots = [], []
    for name in names:  # warm-up slots, not counted (first handshakes, whatever the previous phase left running)
        schedule.append((targets[name][0], t, t + WARMUP_S))
        t += WARMUP_S + 0.2
    warm = len(schedule)
    for name in order:
        schedule.append((targets[name][0], t, t + s.conn_seconds))
        slots.append((name, t, t + s.conn_seconds))
        t += s.conn_seconds + 0.2
    for q in queues:
        q.put(schedule)
    cpu = []
    for name, start, end in slots:
        pid = targets[name][1]
        time.sleep(max(0.0, start - time.time()))
        c0 = cpu_s(pid)
        time.sleep(max(0.0, end - time.time()))
        cpu.append(cpu_s(pid) - c0)
    out = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
    per_slot = [sum(o[0][warm + k] for o in out) for k in range(len(slots))]
    res = {name: {"n": 0, "rates": [], "cpu_us": []} for name in names}
    for (name, _, _), n, c in zip(slots, per_slot, cpu):
        res[name]["n"] += n
        res[name]["rates"].append(n / s.conn_seconds)
        res[name]["cpu_us"].append(c / n * 1e6 if n else float("inf"))
    for r in res.values():
        r["rate"] = r["n"] / (s.conn_seconds * len(r["rates"]))
    return {"targets": res, "errors": sum(o[1] for o in out), "reused": sum(o[2] for o in out)}


def _round_ratios(res: dict, a: str, b: str, key: str) -> list[float]:
    """a / b for each round of `key` (a round's slots are adjacent in time: the least disturbed comparison)."""
    return [x / y for x, y in zip(res[a][key], res[b][key]) if y and math.isfinite(x) and math.isfinite(y)]


# --- 4. publish throughput ------------------------------------------------------------------------------------------

class _Link:
    """One raw MQTT v5 session in non-blocking mode: an output buffer, and a parser that counts the PUBLISHes it
    is delivered (PUBACKing those of QoS 1) and the PUBACKs it gets. `subscribe`: a topic to SUBSCRIBE to first."""

    def __init__(self, port: int, ctx: ssl.SSLContext, client_id: str, qos: int, subscribe: bytes | None = None):
        self.sock, self.receive_max = _mqtt_connect(port, ctx, client_id)
        if subscribe is not None:
            body = struct.pack("!H", 1) + b"\x00" + struct.pack("!H", len(subscribe)) + subscribe + bytes([qos])
            self.sock.sendall(b"\x82" + _varint(len(body)) + body)
            head, suback = _read_packet(self.sock)
            if head >> 4 != 9 or suback[-1] != qos:
                raise RuntimeError(f"{client_id}: SUBACK {suback!r}")
        self.out, self.buf = bytearray(), bytearray()
        self.received = self.acked = 0
        self.sock.setblocking(False)

    def pump(self) -> bool:
        """Write what we can, read what is there, parse; True if anything moved."""
        moved = False
        if self.out:
            try:
                w = self.sock.send(self.out[:262144])
                del self.out[:w]
                moved = True
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                pass
        try:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("the broker closed the connection")
            self.buf += data
            moved = True
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            pass
        buf, pos, end = self.buf, 0, len(self.buf)
        while end - pos >= 2:
            h = buf[pos]
            try:
                length, p = _decode_varint(buf, pos + 1)
            except IndexError:  # the length is not all there yet
                break
            if p + length > end:
                break
            kind = h >> 4
            if kind == 3:
                self.received += 1
                if (h >> 1) & 3 == 1:  # PUBACK it: the packet id follows the topic
                    tlen = (buf[p] << 8) | buf[p + 1]
                    self.out += b"\x40\x02" + bytes(buf[p + 2 + tlen:p + 4 + tlen])
            elif kind == 4:
                self.acked += 1
                if length > 2 and buf[p + 2] >= 0x80:
                    raise RuntimeError(f"PUBACK failure reason {buf[p + 2]:#x}")
            pos = p + length
        if pos:
            del buf[:pos]
        return moved

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.setblocking(True)
            self.sock.sendall(DISCONNECT)
        self.sock.close()


class _Pair:
    """A commander publishing n messages to devices/<id>/commands and that device's session subscribed there."""

    def __init__(self, port: int, cafile: str, pub: Dev, sub: Dev, qos: int, n: int):
        topic = f"devices/{sub.id}/commands".encode()
        self.sub = _Link(port, _context(cafile, sub), sub.id, qos, subscribe=topic)
        self.pub = _Link(port, _context(cafile, pub), pub.id, qos)
        self.qos, self.n, self.sent, self.next_id = qos, n, 0, 1
        self.window = 500 if qos == 0 else self.pub.receive_max  # outstanding messages (QoS 1: the broker's limit)
        prefix = struct.pack("!H", len(topic)) + topic
        if qos == 0:
            body0 = prefix + b"\x00" + PAYLOAD
            self.pkt0 = b"\x30" + _varint(len(body0)) + body0
        else:
            self.head1 = b"\x32" + _varint(len(prefix) + 2 + 1 + len(PAYLOAD)) + prefix
            self.tail1 = b"\x00" + PAYLOAD

    @property
    def done(self) -> bool:
        return self.sub.received >= self.n

    def fill(self) -> None:
        out = self.pub.out
        if self.qos == 0:
            k = min(self.n - self.sent, self.window - (self.sent - self.sub.received))
            if k > 0 and len(out) < 262144:
                out += self.pkt0 * k
                self.sent += k
        else:
            while self.sent < self.n and self.sent - self.pub.acked < self.window:
                out += self.head1 + struct.pack("!H", self.next_id) + self.tail1
                self.next_id = self.next_id % 65535 + 1
                self.sent += 1

    def close(self) -> None:
        self.pub.close()
        self.sub.close()


def _publish_run(port: int, cafile: str, pairs: list[tuple[Dev, Dev]], qos: int, n: int, broker_pid: int,
                 timeout: float = 60.0) -> dict:
    """Each (commander, device) pair moves n/len(pairs) messages; one single-threaded select loop drives all."""
    per = n // len(pairs)
    runs: list[_Pair] = []
    sel = selectors.DefaultSelector()
    try:
        for pub, sub in pairs:
            runs.append(_Pair(port, cafile, pub, sub, qos, per))
        links = [link for r in runs for link in (r.pub, r.sub)]
        for link in links:
            sel.register(link.sock, selectors.EVENT_READ, link)
        t0 = last = time.monotonic()
        cpu0 = cpu_s(broker_pid)
        deadline = t0 + timeout
        while not all(r.done for r in runs) and time.monotonic() < deadline:
            moved = False
            for r in runs:
                r.fill()
                before = r.sub.received
                moved |= r.pub.pump() | r.sub.pump()
                if r.sub.received != before:
                    last = time.monotonic()
            if not moved:
                for link in links:
                    sel.modify(link.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if link.out else 0), link)
                sel.select(0.05)
        cpu = cpu_s(broker_pid) - cpu0
        received = sum(r.sub.received for r in runs)
        elapsed = last - t0
        return {"sent": sum(r.sent for r in runs), "received": received, "elapsed": elapsed,
                "rate": received / elapsed if elapsed > 0 else 0.0, "broker_cpu_us": cpu / max(received, 1) * 1e6}
    finally:
        sel.close()
        for r in runs:
            r.close()
# --- orchestration --------------------------------------------------------------------------------------------------

@dataclass
class Report:
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def _row(metric: str, value: float, goal: str, ok: bool | None) -> dict:
    return {"metric": metric, "value": value, "goal": goal, "pass": ok}


def _revocation_rows(rep: Report, r: dict, c: dict, n: int, n_cli: int) -> None:
    ok = not r["errors"] and len(r["total"]) == len(r["refusals"]) == n
    ok_cli = not c["errors"] and len(c["cuts"]) == n_cli
    for name, values, goal, limit, good in (("hub set_status timings.total_ms", r["total"], "<= 20 ms", 20, ok),
                                            ("revoke -> reconnect refused (CONNACK 0x87)", r["refusals"], "<= 1 s",
                                             1000, ok),
                                            ("CLI device revoke -> session cut", c["cuts"], "<= 300 ms", 300, ok_cli)):
        p99 = _pct(values, 0.99)
        rep.rows.append(_row(f"{name} p50 (ms, n={len(values)})", _pct(values, 0.5), "info", None))
        rep.rows.append(_row(f"{name} p99 (ms, n={len(values)})", p99, goal, good and p99 <= limit))
    rep.notes.append("revocation p50 / p99 (ms): set_status registry_ms {:.1f} / {:.1f}, sync_ms {:.1f} / {:.1f}; "
                     "admin socket -> session cut {:.1f} / {:.1f}; CLI process exit {:.0f} / {:.0f}".format(
                         *(_pct(v, q) for v in (r["registry"], r["sync"], r["cuts"], c["cli_exit"])
                           for q in (.5, .99))))
    if r["errors"] or c["errors"]:
        rep.notes.append(f"revocation errors: {(r['errors'] + c['errors'])[:5]}")


def measure(quick: bool = False, s: Settings | None = None) -> Report:
    s = s or _settings(quick)
    rep = Report()
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="tessera-broker-bench-"))
    hub = None
    others: list[CopyBroker] = []
    try:
        n_conn, n_rev = s.procs * s.threads, s.revocations + s.cli_revocations
        hub_dir, rows = make_fleet(tmp, n_rev + n_conn + s.pub_pairs, FLEET, PREFIX, MQTT_LIMITS)
        hub = HubProcess(hub_dir)
        hub.start()
        (work := tmp / "devices").mkdir()
        devs = enroll(hub, rows, work)
        commanders = _commanders(hub_dir, s.pub_pairs)
        rev_devs, cli_devs = devs[:s.revocations], devs[s.revocations:n_rev]
        conn_devs, pub_devs = devs[n_rev:n_rev + n_conn], devs[n_rev + n_conn:]
        cafile = str(hub_dir / "ca" / "root.pem")

        # 1. revocation
        _revocation_rows(rep, bench_revocation(hub, rev_devs, via_cli=False),
                         bench_revocation(hub, cli_devs, via_cli=True), len(rev_devs), len(cli_devs))

        # 3's registry, then the bare and big brokers
        big_db = tmp / "big" / "registry.sqlite3"
        big_db.parent.mkdir()
        built = build_big_registry(hub_dir / "registry.sqlite3", big_db, s.big_devices, s.big_revoked)
        size = f"{s.big_devices // 1000}k devices, {s.big_revoked // 1000}k revoked certs"
        rep.rows.append(_row(f"build registry of {size} (s)", built["seconds"], "info", None))
        bare, big = CopyBroker(hub, tmp / "bare"), CopyBroker(hub, tmp / "big", registry=big_db)
        others += [bare, big]
        for b in others:
            b.start()
        hub_pid = hub.broker_pid
        cpus = sorted(os.sched_getaffinity(0))
        for pid in (hub_pid, bare.proc.pid, big.proc.pid) if len(cpus) > 1 else ():
            os.sched_setaffinity(pid, {cpus[-1]})  # one CPU for all: where each happens to run must not decide

        # 2 + 3. connections
        conn = bench_connections({"hub": (hub.mqtt_port, hub_pid), "bare": (bare.port, bare.proc.pid),
                                  "big": (big.port, big.proc.pid)}, cafile, conn_devs, s)
        res, errs, reused = conn["targets"], conn["errors"], conn["reused"]
        clean = errs == 0 and not reused
        rep.rows.append(_row("mTLS connects/s, hub broker (plugin)", res["hub"]["rate"], "info", None))
        rep.rows.append(_row("mTLS connects/s, bare mosquitto", res["bare"]["rate"], "info", None))
        pairs = _round_ratios(res, "hub", "bare", "rates")
        ratio = statistics.median(pairs) if pairs else 0.0
        rep.rows.append(_row("mTLS connects/s hub / bare (median of rounds)", ratio, ">= 0.95",
                             ratio >= 0.95 and clean))
        for k, label in (("hub", "hub"), ("bare", "bare"), ("big", f"plugin, {size}")):
            rep.rows.append(_row(f"  broker CPU per connection, {label} (us)", statistics.median(res[k]["cpu_us"]),
                                 "info", None))
        hb = _round_ratios(res, "hub", "bare", "cpu_us")
        rep.rows.append(_row("  broker CPU per connect hub / bare (median of rounds)", statistics.median(hb) if hb
                             else float("nan"), "info", None))
        cpairs = _round_ratios(res, "big", "hub", "cpu_us")
        cratio = statistics.median(cpairs) if cpairs else float("inf")
        rep.rows.append(_row(f"broker CPU per connect, {size} / hub's registry (median of rounds)", cratio,
                             "<= 1.1", cratio <= 1.1 and clean))
        rep.notes.append(f"connections: {s.procs} processes x {s.threads} threads (one device each), "
                         f"{s.conn_rounds} alternating slot(s) of {s.conn_seconds:.1f} s per broker, per-slot rates "
                         + ", ".join(f"{k} {[round(x) for x in v['rates']]}" for k, v in res.items())
                         + f"; hub/bare round ratios {[round(x, 3) for x in pairs]}; big/hub CPU round ratios "
                         f"{[round(x, 3) for x in cpairs]}; big registry {built['bytes'] / 1e6:.0f} MB; errors "
                         f"{errs}, resumed sessions {reused}")
        big.stop()

        # 4. publish throughput
        where = {"hub": (hub.mqtt_port, hub_pid), "bare": (bare.port, bare.proc.pid)}
        pub_pairs = list(zip(commanders, pub_devs))
        for qos, n in ((0, s.qos0_n), (1, s.qos1_n)):
            runs = {"hub": [], "bare": []}
            for r in range(s.pub_rounds):  # hub first, then bare first, ...
                for k in (("hub", "bare") if r % 2 == 0 else ("bare", "hub")):
                    runs[k].append(_publish_run(where[k][0], cafile, pub_pairs, qos, n, where[k][1]))
            rate = {k: sum(x["received"] for x in v) / sum(x["elapsed"] for x in v) for k, v in runs.items()}
            lost = {k: sum(x["sent"] - x["received"] for x in v) for k, v in runs.items()}
            pairs = [h["rate"] / b["rate"] for h, b in zip(runs["hub"], runs["bare"]) if b["rate"]]
            ratio = statistics.median(pairs) if pairs else 0.0
            complete = all(x["received"] == x["sent"] for v in runs.values() for x in v)
            rep.rows.append(_row(f"QoS {qos} msgs/s, hub broker (plugin)", rate["hub"], "info", None))
            rep.rows.append(_row(f"QoS {qos} msgs/s, bare mosquitto", rate["bare"], "info", None))
            rep.rows.append(_row(f"QoS {qos} throughput hub / bare (median of rounds)", ratio, ">= 0.95",
                                 ratio >= 0.95 and (complete or qos == 0)))
            for k in ("hub", "bare"):
                cpu = statistics.mean(x["broker_cpu_us"] for x in runs[k])
                rep.rows.append(_row(f"  broker CPU per message QoS {qos}, {k} (us)", cpu, "info", None))
            rep.notes.append(f"QoS {qos}: {n} messages over {s.pub_pairs} commander -> device pairs x "
                             f"{s.pub_rounds} round(s) per broker; round ratios "
                             f"{[round(x, 3) for x in pairs]}; not received: {lost}")
    finally:
        for b in others:
            b.stop()
        if hub is not None:
            rep.notes += hub.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    rep.wall_s = time.monotonic() - started
    return rep


def run(quick: bool = False) -> list[dict]:
    """Run the benchmark; rows {"metric", "value", "goal", "pass"} (pass is None for "info" rows)."""
    return measure(quick).rows


def print_report(rep: Report) -> None:
    width = max(len(r["metric"]) for r in rep.rows)
    print(f"{'metric':<{width}}  {'value':>10}  {'goal':<8} pass")
    print("-" * (width + 30))
    for r in rep.rows:
        verdict = "-" if r["pass"] is None else ("yes" if r["pass"] else "NO")
        print(f"{r['metric']:<{width}}  {r['value']:>10.3f}  {r['goal']:<8} {verdict}")
    for note in rep.notes:
        print(f"note: {note}")
    print(f"total wall time {rep.wall_s:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.broker_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer revocations, shorter rounds, a 100k registry")
    parser.add_argument("--revocations", type=int, help="revocations through the admin socket (default 50, quick 10)")
    args = parser.parse_args(argv)
    s = _settings(args.quick)
    if args.revocations:
        s.revocations = args.revocations
    rep = measure(args.quick, s)
    print_report(rep)
    return 0 if all(r["pass"] is not False for r in rep.rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
