"""Fixtures and helpers for the broker integration tests (tests/integration/test_broker_*.py).

The hub under test is a real `tessera-hub serve` process (see hubfixtures.Hub): it runs EST, a supervised
Mosquitto with a generated config in <hub>/broker/, the hub's own admin MQTT session and the admin socket.

* Devices here use FILE keys: a P-256 key made with cryptography, a CSR, EST simpleenroll with the one-time
  token from `tessera-hub device add` (never in argv), then a chain PEM (leaf + device CA) and a 0600 key file.
* `MqttSession` is one paho-mqtt 2.x MQTT v5 client (paho network thread, reconnect_on_failure=False:
  a dropped session stays dropped and is recorded with its time, so "B was never disconnected" is checkable).
* `probe()` is one raw connection attempt (TCP, TLS, MQTT v5 CONNECT, wait for CONNACK) that reports the stage
  where it ended: refused in the TLS handshake, closed before any CONNACK, or a CONNACK with its reason code.
  With TLS 1.2 the broker judges the client certificate inside the handshake; with TLS 1.3 the client's
  handshake completes first and the broker's alert arrives on the first read.
* The hub's admin certificate (CN tessera-hub) is never used here: the broker forces client id = CN, so a
  second session with it would kick the hub's own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import queue
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.integration.hubfixtures import (LENIENT_LIMITS, Hub, init_hub, make_csr, new_key, run_cli,
                                           running_hub, write_key)

READY_TIMEOUT = 30.0
HOST = "127.0.0.1"
NOT_AUTHORIZED = 0x87  # MQTT v5 reason code
#: What the broker may answer a QoS 1 PUBLISH it does not authorize: MQTT v5 lets it refuse (0x87) or accept and
#: drop; the tests' real assertion is always that nothing is delivered.
REFUSED_OR_DROPPED = (0x00, NOT_AUTHORIZED)


# --- the hub process ---------------------------------------------------------------------------------------------

def wait_ready(hub: Hub, timeout: float = READY_TIMEOUT) -> None:
    """Wait for the "hub ready" line (printed once broker, admin client, EST and admin socket are all up)."""
    deadline = time.monotonic() + timeout
    while "hub ready" not in hub.stdout_text():
        if hub.proc is not None and hub.proc.poll() is not None:
            raise AssertionError(f"tessera-hub serve exited {hub.proc.returncode} before 'hub ready':\n"
                                 f"{hub.stdout_text()}\n{hub.stderr_path.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no 'hub ready' within {timeout} s:\n{hub.stdout_text()}")
        time.sleep(0.05)


def broker_conf(hub: Hub) -> Path:
    return hub.dir / "broker" / "mosquitto.conf"


def broker_pids(hub: Hub) -> list[int]:
    """Pids of mosquitto processes running this hub's broker config (`pgrep -f <hub>/broker/mosquitto.conf`)."""
    proc = subprocess.run(["pgrep", "-f", str(broker_conf(hub))], capture_output=True, text=True)
    return sorted(int(p) for p in proc.stdout.split() if int(p) != os.getpid())


def broker_pid(hub: Hub, timeout: float = 10.0) -> int:
    """The one mosquitto of this hub (waits until exactly one runs and accepts TCP connections)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = broker_pids(hub)
        if len(pids) == 1 and tcp_open(hub.mqtt_port):
            return pids[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"expected one running mosquitto for {broker_conf(hub)}, found {pids}")
        time.sleep(0.05)


def tcp_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def assert_no_broker_left(hub: Hub, timeout: float = 3.0) -> None:
    """No mosquitto of this hub may survive it; a leftover is killed (by pid) and the assertion fails."""
    deadline = time.monotonic() + timeout
    pids = broker_pids(hub)
    while pids and time.monotonic() < deadline:
        time.sleep(0.05)
        pids = broker_pids(hub)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not pids, f"mosquitto process(es) {pids} outlived the hub"


@contextlib.contextmanager
def broker_hub(base: Path, **settings: Any) -> Iterator[Hub]:
    """A running hub (lenient rate limits) whose "hub ready" was seen; on exit: SIGTERM, exit 0 within 10 s
    (hubfixtures.running_hub asserts that) and no mosquitto left behind."""
    started = None
    try:
        with running_hub(base, **{**LENIENT_LIMITS, **settings}) as hub:
            started = hub
            wait_ready(hub)
            yield hub
    finally:
        if started is not None:
            assert_no_broker_left(started)


def restart(hub: Hub) -> None:
    """Start a stopped hub again (new ports) and wait for "hub ready"."""
    hub.proc = None
    hub.start()
    wait_ready(hub)


def audit(hub: Hub, limit: int = 500) -> list[dict]:
    """`tessera-hub audit --json` (newest first)."""
    return hub.cli_json("audit", "--limit", str(limit))


def admin_call(hub: Hub, request: dict, timeout: float = 30.0) -> Any:
    from hub import admin

    return admin.call(hub.dir / "admin.sock", request, timeout=timeout)


# --- devices ------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Device:
    id: str
    chain: Path  # leaf + device CA (PEM)
    key: Path  # 0600 PKCS#8 PEM
    cert: x509.Certificate


def write_chain(path: Path, certs: list[x509.Certificate]) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path


def enroll_device(hub: Hub, device_id: str, workdir: Path, groups: tuple[str, ...] = ()) -> Device:
    """`tessera-hub device add ID [--group G]...`, then EST simpleenroll with a P-256 file key."""
    from agent.estclient import EstClient

    extra = [arg for g in groups for arg in ("--group", g)]
    token = hub.add_device(device_id, *extra)
    key = new_key()
    certs = EstClient(hub.url, cafile=str(hub.root_pem)).simpleenroll(make_csr(key, device_id), device_id, token)
    workdir.mkdir(parents=True, exist_ok=True)
    chain = write_chain(workdir / f"{device_id}.pem", certs)
    key_path = write_key(workdir / f"{device_id}.key", key)
    assert os.stat(key_path).st_mode & 0o777 == 0o600
    return Device(device_id, chain, key_path, certs[0])


def client_context(hub: Hub, chain: Path | None, key: Path | None, tls: str | None = None) -> ssl.SSLContext:
    """TLS client context: trusts only the fleet root (hostname checked), optional client cert, TLS version."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls == "1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    elif tls == "1.3":
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=str(hub.root_pem))
    if chain is not None:
        ctx.load_cert_chain(str(chain), str(key))
    return ctx


# --- raw connection attempts ---------------------------------------------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(client_id: str, keepalive: int = 10) -> bytes:
    """An MQTT v5 CONNECT: clean start, no properties, no will, no username/password."""
    cid = client_id.encode()
    body = (struct.pack("!H", 4) + b"MQTT" + bytes([5, 0x02]) + struct.pack("!H", keepalive) + b"\x00"
            + struct.pack("!H", len(cid)) + cid)
    return b"\x10" + _varint(len(body)) + body


DISCONNECT_PACKET = b"\xe0\x00"


@dataclasses.dataclass
class Probe:
    """How one connection attempt ended: stage is "tcp", "tls" (handshake refused), "closed" (handshake done,
    connection dropped before any CONNACK), "timeout" or "connack" (reason_code set)."""

    stage: str
    detail: str = ""
    reason_code: int | None = None
    tls_version: str | None = None

    @property
    def accepted(self) -> bool:
        return self.stage == "connack" and self.reason_code == 0

    @property
    def got_connack(self) -> bool:
        return self.stage == "connack"


def _recv_exact(sock: ssl.SSLSocket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed by the broker")
        data += chunk
    return data


def probe(port: int, ctx: ssl.SSLContext, client_id: str = "probe", timeout: float = 5.0) -> Probe:
    """One attempt: TCP + TLS + MQTT v5 CONNECT; read until a CONNACK, an alert, EOF or `timeout`."""
    try:
        raw = socket.create_connection((HOST, port), timeout=timeout)
    except OSError as exc:
        return Probe("tcp", str(exc))
    with raw:
        try:
            sock = ctx.wrap_socket(raw, server_hostname=HOST)
        except ssl.SSLError as exc:
            return Probe("tls", f"{exc.reason or exc}")
        except OSError as exc:  # reset / EOF during the handshake
            return Probe("tls", f"{type(exc).__name__}: {exc}")
        with sock:
            version = sock.version()
            try:
                sock.sendall(connect_packet(client_id))
                head = _recv_exact(sock, 1)
                # remaining length (varint), then the packet
                length, mult = 0, 1
                while True:
                    b = _recv_exact(sock, 1)[0]
                    length += (b & 0x7F) * mult
                    mult *= 128
                    if not b & 0x80:
                        break
                body = _recv_exact(sock, length)
            except socket.timeout:
                return Probe("timeout", "no answer", tls_version=version)
            except ssl.SSLError as exc:
                return Probe("closed", f"{exc.reason or exc}", tls_version=version)
            except OSError as exc:
                return Probe("closed", f"{type(exc).__name__}: {exc}", tls_version=version)
            if head[0] >> 4 != 2:
                return Probe("closed", f"unexpected packet type {head[0] >> 4}", tls_version=version)
            rc = body[1] if len(body) > 1 else 0
            if rc == 0:
                with contextlib.suppress(OSError):
                    sock.sendall(DISCONNECT_PACKET)
            return Probe("connack", f"reason code {rc:#04x}", reason_code=rc, tls_version=version)


def probe_cert(hub: Hub, chain: Path | None, key: Path | None, tls: str | None = None,
               client_id: str = "probe", timeout: float = 5.0) -> Probe:
    return probe(hub.mqtt_port, client_context(hub, chain, key, tls), client_id, timeout)


def revoked_detail(p: Probe) -> bool:
    return "REVOKED" in p.detail.upper()


# --- paho sessions -------------------------------------------------------------------------------------------------

class ConnectRefused(Exception):
    pass


class MqttSession:
    """One paho MQTT v5 session with a device certificate; records every event with its monotonic time.

    No automatic reconnect (reconnect_on_failure=False): paho's network thread ends with the connection.
    """

    def __init__(self, hub: Hub, chain: Path, key: Path, client_id: str, tls: str | None = None,
                 port: int | None = None):
        self.client_id = client_id
        self.port = port or hub.mqtt_port
        self.ctx = client_context(hub, chain, key, tls)
        self.messages: queue.Queue = queue.Queue()  # consumed by wait_message()/drain()
        self.received: list[tuple[str, bytes]] = []  # everything ever received, never consumed
        self.connack = threading.Event()
        self.connack_rc: Any = None
        self.connack_props: Any = None
        self.disconnected = threading.Event()
        self.disconnect_at: float | None = None
        self.disconnect_rc: Any = None
        self._acks: dict[int, Any] = {}
        self._ack_cond = threading.Condition()
        self._started = False
        c = self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                      protocol=mqtt.MQTTv5, reconnect_on_failure=False)
        c.tls_set_context(self.ctx)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish

    # callbacks
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connack_rc, self.connack_props = reason_code, properties
        self.connack.set()

    def _on_message(self, client, userdata, msg) -> None:
        item = (msg.topic, bytes(msg.payload))
        self.received.append(item)
        self.messages.put(item)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.disconnect_at is None:
            self.disconnect_at = time.monotonic()
            self.disconnect_rc = reason_code
        self.disconnected.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._ack_cond:
            self._acks[mid] = [rc.value for rc in reason_codes]
            self._ack_cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._ack_cond:
            self._acks[mid] = reason_code.value
            self._ack_cond.notify_all()

    def _wait_ack(self, mid: int, timeout: float) -> Any:
        with self._ack_cond:
            if not self._ack_cond.wait_for(lambda: mid in self._acks, timeout):
                raise TimeoutError(f"{self.client_id}: no acknowledgement for message id {mid} within {timeout} s")
            return self._acks.pop(mid)

    # actions
    def connect(self, timeout: float = 10.0) -> "MqttSession":
        """Connect and wait for a successful CONNACK (ConnectRefused otherwise)."""
        try:
            self.client.connect(HOST, self.port, keepalive=30)
        except (ssl.SSLError, OSError) as exc:
            raise ConnectRefused(f"{self.client_id}: {exc}") from exc
        self.client.loop_start()  # paho's own network thread: the only one touching the TLS socket
        self._started = True
        deadline = time.monotonic() + timeout
        while not self.connack.is_set():
            if self.disconnected.is_set():
                raise ConnectRefused(f"{self.client_id}: connection closed before CONNACK ({self.disconnect_rc})")
            if time.monotonic() > deadline:
                raise ConnectRefused(f"{self.client_id}: no CONNACK within {timeout} s")
            time.sleep(0.005)
        if self.connack_rc.is_failure:
            raise ConnectRefused(f"{self.client_id}: CONNACK {self.connack_rc}")
        return self

    @property
    def connected(self) -> bool:
        return self.connack.is_set() and not self.disconnected.is_set()

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> int:
        """Subscribe and return the SUBACK reason code (granted QoS, or >= 0x80 for a refusal)."""
        rc, mid = self.client.subscribe(topic, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"subscribe failed locally: {rc}"
        return self._wait_ack(mid, timeout)[0]

    def publish(self, topic: str, payload: bytes, qos: int = 1, timeout: float = 5.0) -> int | None:
        """Publish; for QoS 1 wait for the PUBACK and return its reason code (0 success, 0x87 not authorized)."""
        info = self.client.publish(topic, payload, qos=qos)
        if qos == 0:
            return None
        return self._wait_ack(info.mid, timeout)

    def drain(self) -> list[tuple[str, bytes]]:
        out = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    def wait_message(self, topic: str, payload: bytes, timeout: float = 5.0) -> list[tuple[str, bytes]]:
        """Wait until (topic, payload) arrives; returns everything received meanwhile (it included)."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = self.messages.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{self.client_id} did not receive {payload!r} on {topic} within {timeout} s; "
                                     f"got {seen}") from None
            seen.append(item)
            if item == (topic, payload):
                return seen

    def close(self) -> None:
        if self.connected:
            with contextlib.suppress(Exception):
                self.client.disconnect()
        if self._started:
            self.client.loop_stop()
            self._started = False


@contextlib.contextmanager
def sessions(*items: MqttSession) -> Iterator[tuple[MqttSession, ...]]:
    try:
        yield items
    finally:
        for s in items:
            s.close()


def session(hub: Hub, dev: Device, client_id: str | None = None, tls: str | None = None) -> MqttSession:
    """A connected session for `dev` (client id = its device id unless told otherwise)."""
    return MqttSession(hub, dev.chain, dev.key, client_id or dev.id, tls).connect()


def exchange(sender: MqttSession, receiver: MqttSession, topic: str, payload: bytes, timeout: float = 5.0) -> None:
    """sender publishes QoS 1 (PUBACK success) and receiver gets it."""
    rc = sender.publish(topic, payload)
    assert rc == 0, f"{sender.client_id}: PUBACK reason code {rc:#x} for {topic}"
    receiver.wait_message(topic, payload, timeout)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def traffic(hub: Hub) -> dict:
    """The hub's per-device message counters (what its admin session saw on devices/+/telemetry etc.)."""
    return admin_call(hub, {"op": "traffic"})


def count_of(counters: dict, device_id: str) -> int:
    return counters.get(device_id, {}).get("messages", 0)


def wait_count(hub: Hub, device_id: str, at_least: int, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        counters = traffic(hub)
        if count_of(counters, device_id) >= at_least:
            return counters
        if time.monotonic() > deadline:
            raise AssertionError(f"the hub saw {count_of(counters, device_id)} message(s) from {device_id} within "
                                 f"{timeout} s, expected >= {at_least}: {counters}")
        time.sleep(0.05)


def issue_with_hub_ca(hub: Hub, device_id: str, workdir: Path, now: dt.datetime,
                      validity: dt.timedelta) -> Device:
    """A device certificate from the hub's own device CA (in-process, file key), not via EST/registry."""
    from hub.ca import load_ca
    from hub.policy import Policy

    ca = load_ca(hub.dir / "ca")
    try:
        key = new_key()
        cert = ca.issue_device_cert(key.public_key(), device_id, Policy(fleet="acme", validity=validity), now,
                                    f"https://localhost:{hub.port}/crl/device.crl")
        chain = write_chain(workdir / f"{device_id}.pem", [cert, ca.device_ca])
    finally:
        ca.close()
    return Device(device_id, chain, write_key(workdir / f"{device_id}.key", key), cert)


# --- a twin of the hub's broker ---------------------------------------------------------------------------------

@contextlib.contextmanager
def twin_broker(hub: Hub, workdir: Path) -> Iterator[int]:
    """A second mosquitto running a copy of the hub's generated config, ACL and CRL on another port.

    Only the listener port and the broker's own state paths (persistence, log, dynsec file) differ. It lets a
    test use the hub's admin identity (the only one allowed to write fleet/#) without touching the hub's own
    admin session on the real broker. Yields the port; stopped (and checked gone) on exit.
    """
    from tests.helpers import free_port

    src = hub.dir / "broker"
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("acl", "crl.pem", "dynsec.json"):
        (workdir / name).write_bytes((src / name).read_bytes())
    port = free_port()
    conf = broker_conf(hub).read_text()
    replacements = {
        f"listener {hub.mqtt_port} {HOST}": f"listener {port} {HOST}",
        f"persistence_location {src / 'data'}/": f"persistence_location {workdir / 'data'}/",
        f"log_dest file {src / 'mosquitto.log'}": f"log_dest file {workdir / 'mosquitto.log'}",
        f"acl_file {src / 'acl'}": f"acl_file {workdir / 'acl'}",
        f"plugin_opt_config_file {src / 'dynsec.json'}": f"plugin_opt_config_file {workdir / 'dynsec.json'}",
        f"crlfile {src / 'crl.pem'}": f"crlfile {workdir / 'crl.pem'}",
    }
    for old, new in replacements.items():
        assert old in conf, f"{old!r} not in the hub's mosquitto.conf:\n{conf}"
        conf = conf.replace(old, new)
    (workdir / "data").mkdir(exist_ok=True)
    twin_conf = workdir / "twin.conf"
    twin_conf.write_text(conf)
    from tests.integration.hubfixtures import _set_pdeathsig

    with open(workdir / "stdout", "wb") as out:
        proc = subprocess.Popen(["mosquitto", "-c", str(twin_conf)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=_set_pdeathsig)
    try:
        deadline = time.monotonic() + 10
        while not tcp_open(port):
            assert proc.poll() is None, f"twin mosquitto exited {proc.returncode}: {(workdir / 'stdout').read_text()}"
            assert time.monotonic() < deadline, "twin mosquitto did not listen within 10 s"
            time.sleep(0.02)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


__all__ = ["NOT_AUTHORIZED", "REFUSED_OR_DROPPED", "ConnectRefused", "Device", "MqttSession", "Probe", "admin_call",
           "assert_no_broker_left", "audit", "broker_hub", "broker_pid", "broker_pids", "client_context", "count_of",
           "enroll_device", "exchange", "init_hub", "issue_with_hub_ca", "probe", "probe_cert", "restart", "run_cli",
           "session", "sessions", "tcp_open", "traffic", "twin_broker", "utcnow", "wait_count", "wait_ready"]
