"""Fixtures and helpers for the broker integration tests (tests/integration/test_broker_*.py).

The hub under test is a real `tessera-hub serve` process (hubfixtures.Hub) running EST, a supervised Mosquitto
with the Tessera authz plugin (hub/broker/mosquitto/tessera_authz.c, reading the registry), the hub's own admin
MQTT session (the plugin's doorbell) and the admin socket. Devices use FILE keys (P-256, EST simpleenroll with the
token from `tessera-hub device add`, never in argv); service identities `svc.<name>` get a service-CA certificate
and are registered in-process (hub.authz.identities.add_identity). `MqttSession` is one paho-mqtt 2.x MQTT v5
client that never reconnects and keeps every message with its user properties and subscription identifiers;
`probe_cert()` is one raw connection attempt reporting where it ended (TLS handshake, closed, CONNACK code). The
plugin refuses with CONNACK 0x87 and logs why (`refusals()`). The hub's admin certificate (CN tessera-hub) is
never used here: client id = principal, so a second session with it would take over the hub's own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import queue
import re
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
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.integration.hubfixtures import (FLEET, LENIENT_LIMITS, Hub, init_hub, make_csr, new_key,  # noqa: F401
                                           running_hub, write_key)

READY_TIMEOUT = 30.0
HOST = "127.0.0.1"
NOT_AUTHORIZED = 0x87  # MQTT v5 reason code
ADMINISTRATIVE_ACTION = 0x98  # DISCONNECT reason code of a plugin kick
#: fleet.toml settings for shared broker hubs: lenient EST limits and connect rate limits no test reaches.
BROKER_LIMITS = {**LENIENT_LIMITS, "connect_rate": 100000, "connect_burst": 100000}


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
    """A running hub (BROKER_LIMITS unless overridden) whose "hub ready" was seen; on exit: SIGTERM, exit 0
    within 10 s (hubfixtures.running_hub asserts that) and no mosquitto left behind."""
    started = None
    try:
        with running_hub(base, **{**BROKER_LIMITS, **settings}) as hub:
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
    from hub.serve import admin

    return admin.call(hub.dir / "admin.sock", request, timeout=timeout)


def broker_log(hub: Hub) -> str:
    path = hub.dir / "broker" / "mosquitto.log"
    return path.read_text(errors="replace") if path.exists() else ""


_REFUSED_RE = re.compile(r"tessera_authz: refused principal=(\S+) serial=(\S+) client_id=(.*?): (.+)$")
_KICKED_RE = re.compile(r"tessera_authz: kicked principal=(\S+) serial=(\S+): (.+)$")


def refusals(hub: Hub, since: int = 0) -> list[tuple[str, str, str]]:
    """The plugin's connect refusals logged after byte offset `since`: (principal, client id, reason)."""
    return [m.group(1, 3, 4) for m in map(_REFUSED_RE.search, broker_log(hub)[since:].splitlines()) if m]


def kicks(hub: Hub, since: int = 0) -> list[tuple[str, str]]:
    """The plugin's kicks logged after byte offset `since`: (principal, reason)."""
    return [(m.group(1), m.group(3)) for m in map(_KICKED_RE.search, broker_log(hub)[since:].splitlines()) if m]


def log_mark(hub: Hub) -> int:
    return len(broker_log(hub))


def wait_refusal(hub: Hub, since: int, client_id: str, timeout: float = 3.0) -> tuple[str, str]:
    """(principal, reason) of the first refusal of `client_id` logged after `since` (the log is written lazily)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [(p, r) for p, c, r in refusals(hub, since) if c == client_id]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no refusal of client id {client_id!r} logged:\n{broker_log(hub)[since:]}")
        time.sleep(0.02)


# --- credentials ----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def registry(hub: Hub):
    """The hub's registry opened by this process (as another tool or operator would)."""
    from hub.registry.store import Registry

    reg = Registry(hub.registry_path)
    try:
        yield reg
    finally:
        reg.close()


@dataclasses.dataclass
class Device:
    """A credential: a device (id = device id) or a service identity (id = svc.<name>)."""

    id: str
    chain: Path  # leaf + issuing CA (PEM)
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


def add_identity(hub: Hub, name: str, role: str, workdir: Path) -> Device:
    """A service identity svc.<name> with `role`: a certificate from the hub's service CA, registered in the
    registry (hub.authz.identities.add_identity); chain = leaf + ca/service-ca.pem, key 0600."""
    from hub.authz.identities import add_identity as register
    from hub.ca.authority import load_ca

    principal = f"svc.{name}"
    ca = load_ca(hub.dir / "ca")
    try:
        key = new_key()
        cert = ca.issue_identity_cert(key.public_key(), principal, utcnow())
    finally:
        ca.close()
    with registry(hub) as reg:
        register(reg, name, role, cert, utcnow(), actor="test")
    workdir.mkdir(parents=True, exist_ok=True)
    chain = workdir / f"{principal}.pem"
    chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + (hub.dir / "ca" / "service-ca.pem").read_bytes())
    key_path = write_key(workdir / f"{principal}.key", key)
    assert os.stat(key_path).st_mode & 0o777 == 0o600
    return Device(principal, chain, key_path, cert)


def issue_with_hub_ca(hub: Hub, device_id: str, workdir: Path, now: dt.datetime, validity: dt.timedelta,
                      register: bool = False) -> Device:
    """A device certificate from the hub's own device CA (in-process, file key), not via EST. With `register`
    the device is added (`device add`) and the certificate recorded as its enrollment (Registry.enroll), so the
    registry knows it exactly as it knows an EST-issued one."""
    from hub.ca.authority import load_ca
    from hub.ca.policy import Policy

    ca = load_ca(hub.dir / "ca")
    try:
        key = new_key()
        cert = ca.issue_device_cert(key.public_key(), device_id, Policy(fleet=FLEET, validity=validity), now,
                                    f"https://localhost:{hub.port}/crl/device.crl")
        chain = write_chain(workdir / f"{device_id}.pem", [cert, ca.device_ca])
    finally:
        ca.close()
    if register:
        token = hub.add_device(device_id)
        with registry(hub) as reg:
            reg.enroll(device_id, token, utcnow(), lambda: cert)
    return Device(device_id, chain, write_key(workdir / f"{device_id}.key", key), cert)


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


# --- raw connections ---------------------------------------------------------------------------------------------

def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def connect_packet(client_id: str, keepalive: int = 10,
                   will: tuple[str, bytes, bool, list[tuple[str, str]]] | None = None) -> bytes:
    """An MQTT v5 CONNECT: clean start, no properties, no username/password; optional will (topic, payload,
    retain, user properties) at QoS 1."""
    flags, will_part = 0x02, b""
    if will is not None:
        topic, payload, retain, props = will
        flags |= 0x04 | 0x08 | (0x20 if retain else 0)
        wprops = b"".join(b"\x26" + _utf8(k) + _utf8(v) for k, v in props)
        will_part = varint(len(wprops)) + wprops + _utf8(topic) + _utf8(payload)
    body = (_utf8("MQTT") + bytes([5, flags]) + struct.pack("!H", keepalive) + b"\x00" + _utf8(client_id)
            + will_part)
    return b"\x10" + varint(len(body)) + body


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

    @property
    def not_authorized(self) -> bool:
        return self.stage == "connack" and self.reason_code == NOT_AUTHORIZED


def _recv_exact(sock: ssl.SSLSocket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed by the broker")
        data += chunk
    return data


def read_packet(sock: ssl.SSLSocket) -> tuple[int, bytes]:
    """One MQTT packet: (first byte, body)."""
    head, length, shift = _recv_exact(sock, 1)[0], 0, 0
    while True:
        b = _recv_exact(sock, 1)[0]
        length, shift = length + ((b & 0x7F) << shift), shift + 7
        if not b & 0x80:
            return head, _recv_exact(sock, length)


def _why(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}")


def _attempt(raw: socket.socket, ctx: ssl.SSLContext, client_id: str, will) -> tuple[Probe, ssl.SSLSocket | None]:
    try:
        sock = ctx.wrap_socket(raw, server_hostname=HOST)
    except OSError as exc:  # refused, or reset / EOF during the handshake
        return Probe("tls", _why(exc)), None
    version = sock.version()
    try:
        sock.sendall(connect_packet(client_id, will=will))
        head, body = read_packet(sock)
    except socket.timeout:
        return Probe("timeout", "no answer", tls_version=version), sock
    except (OSError, ConnectionError) as exc:
        return Probe("closed", _why(exc), tls_version=version), sock
    if head >> 4 != 2:
        return Probe("closed", f"unexpected packet type {head >> 4}", tls_version=version), sock
    rc = body[1] if len(body) > 1 else 0
    return Probe("connack", f"reason code {rc:#04x}", reason_code=rc, tls_version=version), sock


@contextlib.contextmanager
def raw_connection(port: int, ctx: ssl.SSLContext, client_id: str, timeout: float = 5.0, will=None
                   ) -> Iterator[tuple[Probe, ssl.SSLSocket | None]]:
    """TCP + TLS + CONNECT (see connect_packet); yields (how it ended, the socket if the CONNACK accepted it)."""
    try:
        raw = socket.create_connection((HOST, port), timeout=timeout)
    except OSError as exc:
        yield Probe("tcp", str(exc)), None
        return
    with raw:
        p, sock = _attempt(raw, ctx, client_id, will)
        with sock or contextlib.nullcontext():
            yield p, (sock if p.accepted else None)


def probe_cert(hub: Hub, chain: Path | None, key: Path | None, tls: str | None = None,
               client_id: str = "probe", timeout: float = 5.0) -> Probe:
    """One attempt: TCP + TLS + MQTT v5 CONNECT; read until a CONNACK, an alert, EOF or `timeout`."""
    with raw_connection(hub.mqtt_port, client_context(hub, chain, key, tls), client_id, timeout) as (p, sock):
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.sendall(b"\xe0\x00")  # DISCONNECT
        return p


def probe_dev(hub: Hub, dev: Device, tls: str | None = None, client_id: str | None = None) -> Probe:
    return probe_cert(hub, dev.chain, dev.key, tls, client_id=dev.id if client_id is None else client_id)


# --- paho sessions -------------------------------------------------------------------------------------------------

class ConnectRefused(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Msg:
    topic: str
    payload: bytes
    retain: bool = False
    user_props: tuple[tuple[str, str], ...] = ()
    sub_ids: tuple[int, ...] = ()


class MqttSession:
    """One paho MQTT v5 session; records every event with its monotonic time.

    No automatic reconnect (reconnect_on_failure=False): paho's network thread ends with the connection.
    """

    def __init__(self, hub: Hub, chain: Path, key: Path, client_id: str, tls: str | None = None,
                 port: int | None = None, protocol: int = mqtt.MQTTv5,
                 credentials: tuple[str, str] | None = None):
        self.client_id = client_id
        self.port = port or hub.mqtt_port
        self.ctx = client_context(hub, chain, key, tls)
        self.messages: queue.Queue = queue.Queue()  # consumed by wait_message()/drain()
        self.received: list[Msg] = []  # everything ever received, never consumed
        self.connack = threading.Event()
        self.connack_rc: Any = None
        self.disconnected = threading.Event()
        self.disconnect_at: float | None = None
        self.disconnect_rc: Any = None
        self._acks: dict[int, Any] = {}
        self._ack_cond = threading.Condition()
        self._started = False
        c = self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                      protocol=protocol, reconnect_on_failure=False)
        if credentials is not None:  # a CONNECT with username and password (RabbitMQ: refused by the hub)
            c.username_pw_set(*credentials)
        c.max_inflight_messages_set(200)
        c.tls_set_context(self.ctx)
        c.on_connect, c.on_disconnect, c.on_message = self._on_connect, self._on_disconnect, self._on_message
        c.on_subscribe = lambda client, userdata, mid, codes, props: self._ack(mid, [rc.value for rc in codes])
        c.on_publish = lambda client, userdata, mid, code, props: self._ack(mid, code.value)

    # callbacks (paho's network thread)
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connack_rc = reason_code
        self.connack.set()

    def _on_message(self, client, userdata, msg) -> None:
        props = getattr(msg, "properties", None)
        ids = getattr(props, "SubscriptionIdentifier", None) or []
        item = Msg(msg.topic, bytes(msg.payload), bool(msg.retain),
                   tuple(tuple(p) for p in (getattr(props, "UserProperty", None) or [])),
                   tuple(ids if isinstance(ids, list) else [ids]))
        self.received.append(item)
        self.messages.put(item)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.disconnect_at is None:
            self.disconnect_at, self.disconnect_rc = time.monotonic(), reason_code
        self.disconnected.set()
        with self._ack_cond:  # a wait_ack() stops waiting: no acknowledgement comes on a closed connection
            self._ack_cond.notify_all()

    def _ack(self, mid: int, value: Any) -> None:
        with self._ack_cond:
            self._acks[mid] = value
            self._ack_cond.notify_all()

    def wait_ack(self, mid: int, timeout: float = 5.0) -> Any:
        with self._ack_cond:
            if not self._ack_cond.wait_for(lambda: mid in self._acks or self.disconnected.is_set(), timeout):
                raise TimeoutError(f"{self.client_id}: no acknowledgement for message id {mid} within {timeout} s")
            if mid not in self._acks:
                raise TimeoutError(f"{self.client_id}: connection closed before message id {mid} was acknowledged")
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

    def subscribe_async(self, topic: str, qos: int = 1, sub_id: int | None = None) -> int:
        props = None
        if sub_id is not None:
            props = Properties(PacketTypes.SUBSCRIBE)
            props.SubscriptionIdentifier = sub_id
        rc, mid = self.client.subscribe(topic, qos, properties=props)
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"subscribe failed locally: {rc}"
        return mid

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0, sub_id: int | None = None) -> int:
        """Subscribe and return the SUBACK reason code (granted QoS, or >= 0x80 for a refusal)."""
        return self.wait_ack(self.subscribe_async(topic, qos, sub_id), timeout)[0]

    def publish_async(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                      props: list[tuple[str, str]] | None = None) -> int:
        properties = None
        if props:
            properties = Properties(PacketTypes.PUBLISH)
            properties.UserProperty = list(props)
        return self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties).mid

    def publish(self, topic: str, payload: bytes, qos: int = 1, timeout: float = 5.0, retain: bool = False,
                props: list[tuple[str, str]] | None = None) -> int | None:
        """Publish; for QoS 1 wait for the PUBACK and return its reason code (0 success, 0x87 not authorized)."""
        mid = self.publish_async(topic, payload, qos, retain, props)
        return None if qos == 0 else self.wait_ack(mid, timeout)

    def wait_message(self, topic: str, payload: bytes, timeout: float = 5.0) -> Msg:
        """Wait until (topic, payload) arrives; returns it."""
        seen, deadline = [], time.monotonic() + timeout
        while True:
            try:
                item = self.messages.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{self.client_id} did not receive {payload!r} on {topic} within {timeout} s; "
                                     f"got {seen}") from None
            seen.append(item)
            if (item.topic, item.payload) == (topic, payload):
                return item

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


def admitted(s: MqttSession, timeout: float = 5.0) -> bool:
    """Connect `s` once: True if the broker took it (it is closed again either way), False if it refused."""
    try:
        s.connect(timeout=timeout)
        return True
    except ConnectRefused:
        return False
    finally:
        s.close()


def session(hub: Hub, dev: Device, client_id: str | None = None, tls: str | None = None) -> MqttSession:
    """A connected session for `dev` (client id = its principal unless told otherwise)."""
    return MqttSession(hub, dev.chain, dev.key, client_id or dev.id, tls).connect()


def exchange(sender: MqttSession, receiver: MqttSession, topic: str, payload: bytes, timeout: float = 5.0) -> Msg:
    """sender publishes QoS 1 (PUBACK success) and receiver gets it."""
    rc = sender.publish(topic, payload)
    assert rc == 0, f"{sender.client_id}: PUBACK reason code {rc:#x} for {topic}"
    return receiver.wait_message(topic, payload, timeout)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)
