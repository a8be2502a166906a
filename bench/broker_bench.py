"""Broker benchmarks of the hub: revocation latency, mTLS connection rate and publish throughput.

``python -m bench.broker_bench [--quick]`` prints a result table; ``run(quick)`` returns the rows (dicts: metric,
value, goal, pass; rows whose goal is "info" only report a number). Full run about 40 s, quick about 12 s.

Setup: a fleet made with ``tessera-hub init`` in a temp dir (rate limits raised: every request comes from
127.0.0.1), devices registered with ``tessera-hub token create`` and enrolled through EST with P-256 FILE keys,
``tessera-hub serve`` on free 127.0.0.1 ports (stopped with SIGTERM at the end, and no mosquitto may outlive it).

1. Revocation (N = 50, quick 10): for each revocation a fresh device holds a live MQTT v5 session (paho); a prober
   thread keeps doing TLS 1.2 handshakes with the same certificate (handshake only, no CONNECT, so the session is
   not taken over); then ``set_status revoked`` goes straight to the admin socket. Measured from that call: the
   session's on_disconnect ("session cut") and the end of the first handshake the broker refuses ("reconnect
   refused"). p50 / p99 (nearest rank); goal p99 < 1 s for both.
2. New mTLS connections per second: client processes x threads, each connection a new TCP connection, a FULL TLS
   handshake (fresh context per process, no session ever reused), MQTT v5 CONNECT, CONNACK, DISCONNECT. Against
   the hub's broker, then against a bare mosquitto started by the bench from a copy of the hub's generated
   config minus acl_file, crlfile and the dynsec plugin (same certificates, listener options and logging),
   alternating rounds; each client thread uses its own device (client id = CN, so no session takeovers). Goal:
   hub / bare >= 0.9.
3. Publish throughput with authorization on (hub's broker) vs off (bare broker): one device session subscribed to
   its own topic devices/<id>/bench publishes N messages (64-byte payload) there and counts them back (a second
   session of the same device would take the first one over; no other device may read that topic). A raw
   single-threaded MQTT v5 client (pipelined, at most 500 messages outstanding for QoS 0, the broker's Receive
   Maximum for QoS 1) so that the broker, not the client, is the bottleneck as far as possible; the broker's own
   CPU time per message is reported too. Goal: hub / bare >= 0.95 for QoS 0 and QoS 1.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing as mp
import os
import selectors
import shutil
import signal
import socket
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
from bench.fleet import env as _env, free_port as _free_port, hub_cmd as _hub_cmd, make_fleet  # noqa: E402

FLEET = "acme"
PREFIX = "bb"
PAYLOAD = b"x" * 64
WARMUP_S = 0.8


@dataclass
class Settings:
    revocations: int = 50
    conn_seconds: float = 2.5  # per slot
    conn_rounds: int = 4  # slots per broker, alternating
    procs: int = 2
    threads: int = 2
    qos0_n: int = 60000
    qos1_n: int = 20000
    pub_rounds: int = 4
    pub_sessions: int = 4  # devices publishing to (and reading) their own topic at once


def _settings(quick: bool) -> Settings:
    if quick:
        return Settings(revocations=10, conn_seconds=1.5, conn_rounds=2, qos0_n=30000, qos1_n=8000, pub_rounds=2)
    return Settings()


# --- processes and files --------------------------------------------------------------------------------------------









def _cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pdeathsig() -> None:  # children of the bench go away with it
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def _tgkill(pid: int, sig: int) -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).tgkill(pid, pid, sig)


def _broker_pids(conf: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", str(conf)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


class HubProcess:
    """`tessera-hub serve` on free ports; stop() sends SIGTERM and expects exit 0 (idempotent)."""

    def __init__(self, hub_dir: Path):
        self.dir = hub_dir
        self.est_port, self.mqtt_port = _free_port(), _free_port()
        while self.mqtt_port == self.est_port:
            self.mqtt_port = _free_port()
        self.out_path, self.err_path = hub_dir.parent / "serve.out", hub_dir.parent / "serve.err"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> None:
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [*_hub_cmd(), "serve", "--dir", str(self.dir), "--host", HOST, "--est-port", str(self.est_port),
                 "--mqtt-port", str(self.mqtt_port)], stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=_env(),
                start_new_session=True, preexec_fn=_pdeathsig)
        deadline = time.monotonic() + timeout
        while "hub ready" not in self.out_path.read_text(errors="replace"):
            if self.proc.poll() is not None:
                raise RuntimeError(f"tessera-hub serve exited {self.proc.returncode}: "
                                   f"{self.err_path.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("tessera-hub serve did not get ready")
            time.sleep(0.05)

    @property
    def broker_pid(self) -> int:
        pids = _broker_pids(self.dir / "broker" / "mosquitto.conf")
        if len(pids) != 1:
            raise RuntimeError(f"expected one hub broker, found {pids}")
        return pids[0]

    def stop(self) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(3)
            except subprocess.TimeoutExpired:  # SIGTERM taken by a non-main thread: hand it to the main one
                with contextlib.suppress(ProcessLookupError):
                    _tgkill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(7)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        return proc.returncode


class BareBroker:
    """The hub's generated mosquitto.conf minus acl_file, crlfile and the dynsec plugin, on its own port."""

    def __init__(self, hub: HubProcess, work: Path):
        self.dir = work
        work.mkdir(parents=True, exist_ok=True)
        (work / "data").mkdir(exist_ok=True)
        self.port = _free_port()
        src = hub.dir / "broker"
        lines = []
        for line in (src / "mosquitto.conf").read_text().splitlines():
            key = line.split(" ", 1)[0]
            if key in ("acl_file", "crlfile", "plugin", "plugin_opt_config_file"):
                continue
            if key == "listener":
                line = f"listener {self.port} {HOST}"
            elif key == "persistence_location":
                line = f"persistence_location {work / 'data'}/"
            elif key == "log_dest":
                line = f"log_dest file {work / 'mosquitto.log'}"
            lines.append(line)
        self.conf = work / "bare.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.dir / "stdout", "wb") as out:
            self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, preexec_fn=_pdeathsig)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((HOST, self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"bare mosquitto did not start: {(self.dir / 'stdout').read_text()}")
                time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# --- fleet ----------------------------------------------------------------------------------------------------------

@dataclass
class Dev:
    id: str
    chain: str
    key: str


def _make_fleet(tmp: Path, n: int) -> tuple[Path, list[tuple[str, str]]]:
    return make_fleet(tmp, n, FLEET, PREFIX)


def _enroll(hub: HubProcess, rows: list[tuple[str, str]], work: Path) -> list[Dev]:
    """EST simpleenroll for each (device, token) with a new P-256 file key; chain PEM + 0600 key files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from agent.estclient import EstClient

    client = EstClient(f"https://{HOST}:{hub.est_port}", cafile=str(hub.dir / "ca" / "root.pem"))
    devs = []
    for device_id, token in rows:
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
               .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
        certs = client.simpleenroll(csr, device_id, token)
        chain = work / f"{device_id}.pem"
        chain.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
        key_path = work / f"{device_id}.key"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
        devs.append(Dev(device_id, str(chain), str(key_path)))
    return devs


def _context(cafile: str, dev: Dev, tls12: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
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


def _read_packet(sock) -> tuple[int, bytes]:
    def exact(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed by the broker")
            data += chunk
        return data

    head = exact(1)[0]
    length, mult = 0, 1
    while True:
        b = exact(1)[0]
        length += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            break
    return head, exact(length)


def _mqtt_connect(port: int, ctx: ssl.SSLContext, client_id: str, timeout: float = 10.0) -> tuple[ssl.SSLSocket, int]:
    """TCP + TLS + CONNECT/CONNACK; returns (socket, broker's Receive Maximum)."""
    raw = socket.create_connection((HOST, port), timeout=timeout)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock = ctx.wrap_socket(raw, server_hostname=HOST)
    sock.sendall(_connect_packet(client_id))
    head, body = _read_packet(sock)
    if head >> 4 != 2 or body[1] != 0:
        sock.close()
        raise ConnectionError(f"CONNACK refused: {body!r}")
    receive_max = 65535
    i, (plen, pos) = 2, _decode_varint(body, 2)
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
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _handshake_refused(ctx: ssl.SSLContext, port: int) -> bool | None:
    """One TLS 1.2 handshake: True refused as revoked, False accepted, None inconclusive."""
    try:
        with socket.create_connection((HOST, port), timeout=2) as raw, ctx.wrap_socket(raw, server_hostname=HOST):
            return False
    except ssl.SSLError as exc:
        return True if "REVOKED" in str(exc).upper() else None
    except OSError:
        return None


def bench_revocation(hub: HubProcess, devs: list[Dev]) -> dict:
    import paho.mqtt.client as mqtt

    from hub import admin

    cafile = str(hub.dir / "ca" / "root.pem")
    sock_path = hub.dir / "admin.sock"
    cuts, refusals, hub_ms, errors = [], [], [], []
    for dev in devs:
        disconnected = threading.Event()
        connected = threading.Event()
        stamp: dict[str, float] = {}

        def on_connect(client, userdata, flags, rc, props):
            connected.set()

        def on_disconnect(client, userdata, flags, rc, props):
            stamp.setdefault("cut", time.monotonic())
            disconnected.set()

        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=dev.id, protocol=mqtt.MQTTv5,
                        reconnect_on_failure=False)
        c.tls_set_context(_context(cafile, dev))
        c.on_connect, c.on_disconnect = on_connect, on_disconnect
        c.connect(HOST, hub.mqtt_port, keepalive=30)
        c.loop_start()
        try:
            if not connected.wait(10):
                raise RuntimeError(f"{dev.id} did not connect")
            ctx12 = _context(cafile, dev, tls12=True)
            stop = threading.Event()

            def prober():
                while not stop.is_set():
                    if _handshake_refused(ctx12, hub.mqtt_port):
                        stamp.setdefault("refused", time.monotonic())
                        return
                    time.sleep(0.002)

            if _handshake_refused(ctx12, hub.mqtt_port) is not False:
                raise RuntimeError(f"{dev.id}: handshake refused before the revocation")
            th = threading.Thread(target=prober, daemon=True)
            th.start()
            t0 = time.monotonic()
            result = admin.call(sock_path, {"op": "set_status", "device": dev.id, "status": "revoked",
                                            "reason": "keyCompromise", "actor": "bench"})
            hub_ms.append(result["timings"]["total_ms"])
            if not disconnected.wait(5):
                errors.append(f"{dev.id}: session not cut")
            th.join(5)
            stop.set()
            if "refused" not in stamp:
                errors.append(f"{dev.id}: reconnect never refused")
            elif _handshake_refused(ctx12, hub.mqtt_port) is not True:
                errors.append(f"{dev.id}: a later handshake was not refused")
            if "cut" in stamp:
                cuts.append(stamp["cut"] - t0)
            if "refused" in stamp:
                refusals.append(stamp["refused"] - t0)
        finally:
            c.disconnect()
            c.loop_stop()
    return {"cuts": cuts, "refusals": refusals, "hub_ms": hub_ms, "errors": errors}


# --- 2. connection rate ---------------------------------------------------------------------------------------------

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
    """Alternating slots over `targets` {name: (port, broker pid)}; the same client processes for all slots."""
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
    for r in range(s.conn_rounds):  # hub, bare, bare, hub, ...: cancels drift
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
        c0 = _cpu_s(pid)
        time.sleep(max(0.0, end - time.time()))
        cpu.append(_cpu_s(pid) - c0)
    out = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
    per_slot = [sum(o[0][warm + k] for o in out) for k in range(len(slots))]
    res = {name: {"n": 0, "cpu": 0.0, "rates": []} for name in names}
    for (name, _, _), n, c in zip(slots, per_slot, cpu):
        res[name]["n"] += n
        res[name]["cpu"] += c
        res[name]["rates"].append(n / s.conn_seconds)
    for name in names:
        r = res[name]
        r["rate"] = r["n"] / (s.conn_seconds * len(r["rates"]))
        r["broker_cpu_us"] = r["cpu"] / max(r["n"], 1) * 1e6
    # slots run a, b, b, a, a, b, ...: round r's two slots are adjacent in time, so their ratio is the least
    # disturbed by whatever else the machine does; the median over rounds is the headline number
    a, b = names
    pairs = [res[a]["rates"][i] / res[b]["rates"][i] for i in range(s.conn_rounds) if res[b]["rates"][i]]
    return {"targets": res, "errors": sum(o[1] for o in out), "reused": sum(o[2] for o in out),
            "ratio": statistics.median(pairs) if pairs else 0.0, "pairs": pairs}


# --- 3. publish throughput ------------------------------------------------------------------------------------------

class _PubSession:
    """One device's raw MQTT v5 session, subscribed to its own devices/<id>/bench, in non-blocking mode."""

    def __init__(self, port: int, ctx: ssl.SSLContext, dev: Dev, qos: int, n: int):
        self.topic = f"devices/{dev.id}/bench".encode()
        self.sock, receive_max = _mqtt_connect(port, ctx, dev.id)
        body = struct.pack("!H", 1) + b"\x00" + struct.pack("!H", len(self.topic)) + self.topic + bytes([qos])
        self.sock.sendall(b"\x82" + _varint(len(body)) + body)
        head, suback = _read_packet(self.sock)
        if head >> 4 != 9 or suback[-1] != qos:
            raise RuntimeError(f"{dev.id}: SUBACK {suback!r}")
        self.qos, self.n = qos, n
        self.window = 500 if qos == 0 else receive_max  # outstanding messages (QoS 1: the broker's limit)
        prefix = struct.pack("!H", len(self.topic)) + self.topic
        if qos == 0:
            body0 = prefix + b"\x00" + PAYLOAD
            self.pkt0 = b"\x30" + _varint(len(body0)) + body0
        else:
            self.head1 = b"\x32" + _varint(len(prefix) + 2 + 1 + len(PAYLOAD)) + prefix
            self.tail1 = b"\x00" + PAYLOAD
        self.out, self.buf = bytearray(), bytearray()
        self.sent = self.received = self.inflight = 0
        self.next_id = 1
        self.sock.setblocking(False)

    @property
    def done(self) -> bool:
        return self.received >= self.n

    def fill(self) -> None:
        if self.qos == 0:
            k = min(self.n - self.sent, self.window - (self.sent - self.received))
            if k > 0 and len(self.out) < 262144:
                self.out += self.pkt0 * k
                self.sent += k
        else:
            while self.sent < self.n and self.inflight < self.window:
                self.out += self.head1 + struct.pack("!H", self.next_id) + self.tail1
                self.next_id = self.next_id % 65535 + 1
                self.inflight += 1
                self.sent += 1

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
            length, p, mult = 0, pos + 1, 1
            while p < end:
                b = buf[p]
                p += 1
                length += (b & 0x7F) * mult
                mult *= 128
                if not b & 0x80:
                    break
            else:
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
                self.inflight -= 1
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


def _publish_run(port: int, cafile: str, devs: list[Dev], qos: int, n: int, broker_pid: int,
                 timeout: float = 60.0) -> dict:
    """Each device's session (subscribed to its own devices/<id>/bench) publishes n/len(devs) messages there and
    counts them back; one single-threaded select loop drives all sessions."""
    per = n // len(devs)
    sessions = [_PubSession(port, _context(cafile, d), d, qos, per) for d in devs]
    sel = selectors.DefaultSelector()
    for ps in sessions:
        sel.register(ps.sock, selectors.EVENT_READ, ps)
    try:
        t0 = last = time.monotonic()
        cpu0 = _cpu_s(broker_pid)
        deadline = t0 + timeout
        while not all(ps.done for ps in sessions) and time.monotonic() < deadline:
            moved = False
            for ps in sessions:
                ps.fill()
                before = ps.received
                moved |= ps.pump()
                if ps.received != before:
                    last = time.monotonic()
            if not moved:
                for ps in sessions:
                    sel.modify(ps.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if ps.out else 0), ps)
                sel.select(0.05)
        cpu = _cpu_s(broker_pid) - cpu0
        received = sum(ps.received for ps in sessions)
        elapsed = last - t0
        return {"sent": sum(ps.sent for ps in sessions), "received": received, "elapsed": elapsed,
                "rate": received / elapsed if elapsed > 0 else 0.0, "broker_cpu_us": cpu / max(received, 1) * 1e6}
    finally:
        for ps in sessions:
            ps.close()


# --- orchestration --------------------------------------------------------------------------------------------------

@dataclass
class Report:
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def _row(metric: str, value: float, goal: str, ok: bool | None) -> dict:
    return {"metric": metric, "value": value, "goal": goal, "pass": ok}


def measure(quick: bool = False, s: Settings | None = None) -> Report:
    s = s or _settings(quick)
    rep = Report()
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="tessera-broker-bench-"))
    hub = bare = None
    try:
        n_conn = s.procs * s.threads
        hub_dir, rows = _make_fleet(tmp, s.revocations + n_conn + s.pub_sessions)
        hub = HubProcess(hub_dir)
        hub.start()
        work = tmp / "devices"
        work.mkdir()
        devs = _enroll(hub, rows, work)
        rev_devs = devs[:s.revocations]
        conn_devs = devs[s.revocations:s.revocations + n_conn]
        pub_devs = devs[s.revocations + n_conn:]
        cafile = str(hub_dir / "ca" / "root.pem")

        # 1. revocation
        r = bench_revocation(hub, rev_devs)
        for name, values in (("session cut", r["cuts"]), ("reconnect refused", r["refusals"])):
            ok = len(values) == len(rev_devs) and not r["errors"]
            p50 = _pct(values, 0.5) if values else float("nan")
            p99 = _pct(values, 0.99) if values else float("nan")
            rep.rows.append(_row(f"revoke -> {name} p50 (s, n={len(values)})", p50, "info", None))
            rep.rows.append(_row(f"revoke -> {name} p99 (s, n={len(values)})", p99, "< 1 s", ok and p99 < 1.0))
        rep.rows.append(_row("  hub's own set_status total p50 (ms)", statistics.median(r["hub_ms"]), "info", None))
        if r["errors"]:
            rep.notes.append(f"revocation errors: {r['errors'][:5]}")

        # 2 + 3 need the bare broker
        bare = BareBroker(hub, tmp / "bare")
        bare.start()
        hub_pid = hub.broker_pid
        conn = bench_connections({"hub": (hub.mqtt_port, hub_pid), "bare": (bare.port, bare.pid)}, cafile,
                                 conn_devs, s)
        rates = {k: v["rate"] for k, v in conn["targets"].items()}
        errs, reused = conn["errors"], conn["reused"]
        rep.rows.append(_row("mTLS connects/s, hub broker", rates["hub"], "info", None))
        rep.rows.append(_row("mTLS connects/s, bare mosquitto", rates["bare"], "info", None))
        ratio = conn["ratio"]
        rep.rows.append(_row("mTLS connects/s hub / bare (median of rounds)", ratio, ">= 0.9",
                             ratio >= 0.9 and errs == 0 and not reused))
        for k in ("hub", "bare"):
            rep.rows.append(_row(f"  broker CPU per connection, {k} (us)", conn["targets"][k]["broker_cpu_us"],
                                 "info", None))
        rep.notes.append(f"connections: {s.procs} processes x {s.threads} threads (one device each), "
                         f"{s.conn_rounds} alternating slot(s) of {s.conn_seconds:.1f} s per broker, per-slot rates "
                         + ", ".join(f"{k} {[round(x) for x in v['rates']]}" for k, v in conn["targets"].items())
                         + f"; round ratios {[round(x, 3) for x in conn['pairs']]}; errors {errs}, resumed "
                         f"sessions {reused}")

        for qos, n in ((0, s.qos0_n), (1, s.qos1_n)):
            runs = {"hub": [], "bare": []}
            where = {"hub": (hub.mqtt_port, hub_pid), "bare": (bare.port, bare.pid)}
            for r in range(s.pub_rounds):  # hub first, then bare first, ...
                for k in (("hub", "bare") if r % 2 == 0 else ("bare", "hub")):
                    runs[k].append(_publish_run(where[k][0], cafile, pub_devs, qos, n, where[k][1]))
            rate = {k: sum(x["received"] for x in v) / sum(x["elapsed"] for x in v) for k, v in runs.items()}
            lost = {k: sum(x["sent"] - x["received"] for x in v) for k, v in runs.items()}
            pairs = [h["rate"] / b["rate"] for h, b in zip(runs["hub"], runs["bare"]) if b["rate"]]
            ratio = statistics.median(pairs) if pairs else 0.0
            complete = all(x["received"] == x["sent"] for v in runs.values() for x in v)
            rep.rows.append(_row(f"QoS {qos} msgs/s, hub broker", rate["hub"], "info", None))
            rep.rows.append(_row(f"QoS {qos} msgs/s, bare mosquitto", rate["bare"], "info", None))
            rep.rows.append(_row(f"QoS {qos} throughput hub / bare (median of rounds)", ratio, ">= 0.95",
                                 ratio >= 0.95 and (complete or qos == 0)))
            for k in ("hub", "bare"):
                cpu = statistics.mean(x["broker_cpu_us"] for x in runs[k])
                rep.rows.append(_row(f"  broker CPU per message QoS {qos}, {k} (us)", cpu, "info", None))
            rep.notes.append(f"QoS {qos}: {n} messages over {s.pub_sessions} device sessions x {s.pub_rounds} "
                             f"round(s) per broker; round ratios "
                             f"{[round(x, 3) for x in pairs]}; not received: {lost}")
    finally:
        if bare is not None:
            bare.stop()
        if hub is not None:
            rc = hub.stop()
            conf = hub.dir / "broker" / "mosquitto.conf"
            deadline = time.monotonic() + 3
            while _broker_pids(conf) and time.monotonic() < deadline:
                time.sleep(0.05)
            left = _broker_pids(conf)
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if rc != 0:
                rep.notes.append(f"tessera-hub serve exited {rc} on SIGTERM")
            if left:
                rep.notes.append(f"mosquitto {left} outlived the hub (killed)")
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
    parser.add_argument("--quick", action="store_true", help="10 revocations, shorter rounds (about 20 s)")
    parser.add_argument("--revocations", type=int, help="revocations to time (default 50, quick 10)")
    args = parser.parse_args(argv)
    s = _settings(args.quick)
    if args.revocations:
        s.revocations = args.revocations
    rep = measure(args.quick, s)
    print_report(rep)
    return 0 if all(r["pass"] is not False for r in rep.rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
