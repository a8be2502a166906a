"""The Mosquitto authorization plugin (hub/broker/mosquitto/tessera_authz.c) in a bare broker.

Real parts only: `mosquitto -c <conf>` on a free loopback port loading the plugin built by
hub.broker.mosquitto.build, a registry made by hub.registry.store.Registry (devices enrolled through its own methods,
service identities inserted with SQL), certificates from hub.ca.authority with file keys, and paho-mqtt 2.x MQTT v5 clients
over mTLS. One broker serves the module; the fail-closed tests start their own.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import queue
import signal
import socket
import ssl
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from hub.authz import schema
from hub.broker.mosquitto.build import SOURCE, plugin_path
from hub.ca.authority import create_hierarchy
from hub.ca.policy import Policy
from hub.registry.store import Registry, _ts, serial_hex
from tests.helpers import free_port, stop_process

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
FLEET = "acme"
NOT_AUTHORIZED = 0x87
ADMINISTRATIVE_ACTION = 0x98
NO_MATCHING_SUBSCRIBERS = 0x10
TIMEOUT = 5.0


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclasses.dataclass
class Cred:
    principal: str
    cert: Path
    key: Path
    serial: str


class Pki:
    """A fleet CA hierarchy, a registry, and credential files in one directory."""

    def __init__(self, base: Path, registry_url: str | None = None) -> None:
        """`registry_url`: a PostgreSQL registry instead of the SQLite file (for the Python enforcement points)."""
        self.dir = base
        self.ca = create_hierarchy(base / "ca", FLEET, utcnow())
        self.bundle = base / "ca-bundle.pem"
        self.bundle.write_bytes(self.ca.trust_bundle_pem())
        self.registry = registry_url or base / "registry.sqlite3"
        self.reg = Registry(self.registry, home=base)
        key = ec.generate_private_key(ec.SECP256R1())
        self.server = self._write("server", self.ca.issue_server_cert(key.public_key(), [], [HOST], utcnow()), key)

    def _write(self, name: str, cert, key) -> Cred:
        cert_path, key_path = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return Cred(name, cert_path, key_path, serial_hex(cert.serial_number))

    def device_cert(self, device_id: str, tag: str = "") -> tuple[Cred, object]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.ca.issue_device_cert(key.public_key(), device_id, Policy(fleet=FLEET), utcnow(),
                                         "http://127.0.0.1/crl")
        cred = self._write(device_id + tag, cert, key)
        return dataclasses.replace(cred, principal=device_id), cert

    def device(self, device_id: str, groups: tuple[str, ...] = ()) -> Cred:
        """A device added and enrolled with a one-time token (Registry.enroll records the certificate)."""
        self.reg.add_device(device_id, FLEET, utcnow(), groups=list(groups))
        token = self.reg.create_token(device_id, utcnow(), timedelta(hours=1))
        cred, cert = self.device_cert(device_id)
        self.reg.enroll(device_id, token, utcnow(), lambda: cert)
        return cred

    def renew(self, cred: Cred, grace: timedelta) -> Cred:
        new, cert = self.device_cert(cred.principal, "-renewed")
        self.reg.reenroll(cred.principal, cred.serial, utcnow(), lambda: cert, grace=grace)
        return new

    def identity(self, name: str, kind: str, role: str) -> Cred:
        """A service identity (principal svc.<name>) or the hub's own (kind 'hub'), inserted with SQL."""
        principal = name if kind == "hub" else f"svc.{name}"
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.ca.issue_admin_cert(key.public_key(), utcnow(), name=principal)
        cred = dataclasses.replace(self._write(principal, cert, key), principal=principal)
        now = _ts(utcnow())
        with self.reg.write() as db:
            db.execute("INSERT INTO identities (name, kind, role, status, created) VALUES (?, ?, ?, 'active', ?)",
                       [name, kind, role, now])
            db.execute("INSERT INTO identity_certificates (serial, identity, subject, not_before, not_after, "
                       "fingerprint_sha256, status, issued_at, pem) VALUES (?, ?, ?, ?, ?, ?, 'active', ?, ?)",
                       [cred.serial, name, cert.subject.rfc4514_string(), _ts(cert.not_valid_before_utc),
                        _ts(cert.not_valid_after_utc), cert.fingerprint(hashes.SHA256()).hex(), now,
                        cert.public_bytes(serialization.Encoding.PEM).decode()])
        return cred


class Broker:
    """A bare `mosquitto -c conf` with the plugin; its log is a file the tests read."""

    def __init__(self, pki: Pki, **options: object) -> None:
        self.pki, self.port = pki, free_port()
        self.log = pki.dir / f"mosquitto-{self.port}.log"
        opts = {"registry": pki.registry, "device_ca": pki.ca.paths.device_ca,
                "service_ca": pki.ca.paths.service_ca, **options}
        conf = pki.dir / f"mosquitto-{self.port}.conf"
        conf.write_text("\n".join([
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            "per_listener_settings false", "allow_anonymous false", "persistence false",
            f"log_dest file {self.log}", "log_type all", "connection_messages true",
            f"plugin {plugin_path(pki.dir / 'plugin')}",
            *(f"plugin_opt_{k} {v}" for k, v in opts.items()),
            f"listener {self.port} {HOST}", f"cafile {pki.bundle}", f"certfile {pki.server.cert}",
            f"keyfile {pki.server.key}", "require_certificate true", "use_username_as_clientid false", ""]))
        self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)

    def wait_ready(self) -> "Broker":
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"mosquitto exited {self.proc.returncode}:\n{self.text()}"
            try:
                socket.create_connection((HOST, self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.02)
        raise AssertionError(f"mosquitto not listening on {self.port}:\n{self.text()}")

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_log(self, needle: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            assert time.monotonic() < deadline, f"{needle!r} not logged:\n{self.text()[-3000:]}"
            time.sleep(0.02)

    def stop(self) -> None:
        stop_process(self.proc)


class Client:
    """One paho MQTT v5 session with a client certificate; records CONNACK, SUBACK, PUBACK, messages, disconnect."""

    def __init__(self, broker: Broker, cred: Cred, client_id: str | None = None,
                 protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv5) -> None:
        self.broker = broker
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or cred.principal,
                             protocol=protocol, reconnect_on_failure=False)
        ctx = ssl.create_default_context(cafile=str(broker.pki.ca.paths.root))
        ctx.load_cert_chain(cred.cert, cred.key)
        self.c.tls_set_context(ctx)
        self.connack: queue.Queue = queue.Queue()
        self.acks: dict[int, object] = {}
        self.messages: queue.Queue = queue.Queue()
        self.gone = threading.Event()
        self.disconnect_reason = None
        self.c.on_connect = lambda c, u, f, rc, p: self.connack.put(rc.value)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.acks.__setitem__(mid, [r.value for r in rcs])
        self.c.on_publish = lambda c, u, mid, rc, p: self.acks.__setitem__(mid, rc.value)
        self.c.on_message = lambda c, u, msg: self.messages.put(msg)
        self.c.on_disconnect = self._on_disconnect

    def _on_disconnect(self, c, u, flags, rc, props) -> None:
        self.disconnect_reason = rc.value
        self.gone.set()

    def connect(self, will: tuple[str, bool] | None = None) -> int:
        if will:
            self.c.will_set(will[0], b"offline", qos=1, retain=will[1])
        self.c.connect(HOST, self.broker.port, keepalive=30)
        self.c.loop_start()
        return self.connack.get(timeout=TIMEOUT)

    def _ack(self, mid: int):
        deadline = time.monotonic() + TIMEOUT
        while mid not in self.acks:
            assert time.monotonic() < deadline and not self.gone.is_set(), "no acknowledgement"
            time.sleep(0.005)
        return self.acks.pop(mid)

    def subscribe(self, flt: str) -> int:
        return self._ack(self.c.subscribe(flt, qos=1)[1])[0]

    def publish(self, topic: str, payload: bytes = b"x", retain: bool = False,
                user: list[tuple[str, str]] | None = None) -> int:
        props = None
        if user:
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = user
        rc = self._ack(self.c.publish(topic, payload, qos=1, retain=retain, properties=props).mid)
        return 0 if rc == NO_MATCHING_SUBSCRIBERS else rc  # 0x10 is an accepted publish too

    def message(self, timeout: float = TIMEOUT):
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("authz"))


@pytest.fixture(scope="module")
def broker(pki: Pki):
    b = Broker(pki, connect_burst=100).wait_ready()
    b.wait_log("tessera_authz: enforcing registry")
    yield b
    b.stop()


@pytest.fixture
def connect(broker: Broker):
    clients: list[Client] = []

    def make(cred: Cred, will: tuple[str, bool] | None = None) -> Client:
        client = Client(broker, cred)
        clients.append(client)
        assert client.connect(will) == 0, broker.text()[-2000:]
        return client

    yield make
    for client in clients:
        client.close()


def connack(broker: Broker, cred: Cred, client_id: str | None = None, **kw) -> int:
    """One connection attempt: the CONNACK reason code (0 accepted)."""
    client = Client(broker, cred, client_id, **kw)
    try:
        return client.connect()
    finally:
        client.close()


def test_plugin_prepares_the_schema_queries() -> None:
    source = SOURCE.read_text()
    assert f'"{schema.CREDENTIAL_QUERY}"' in source and f'"{schema.RULES_QUERY}"' in source


def test_active_device_publishes_and_is_stamped(broker: Broker, pki: Pki, connect) -> None:
    device = pki.device("dev-ok")
    reader = connect(pki.identity("reader", "service", "telemetry-reader"))
    assert reader.subscribe("devices/+/telemetry") == 1
    dev = connect(device)
    assert dev.publish("devices/dev-ok/telemetry", b"21.5", user=[("tessera-sender", "tessera-hub"),
                                                                  ("tessera-role", "hub"), ("x", "y")]) == 0
    msg = reader.message()
    assert (msg.topic, msg.payload) == ("devices/dev-ok/telemetry", b"21.5")
    assert msg.properties.UserProperty == [("tessera-sender", "dev-ok"), ("tessera-role", "device")]
    # a retained status reaches a later subscriber (the broker's check_retain_source asks about its publisher)
    assert dev.publish("devices/dev-ok/status", b"online", retain=True) == 0
    assert reader.subscribe("devices/dev-ok/status") == 1
    assert reader.message().payload == b"online"


def test_refused_connects(broker: Broker, pki: Pki) -> None:
    unknown, _ = pki.device_cert("dev-unknown")
    revoked, suspended, old = pki.device("dev-revoked"), pki.device("dev-suspended"), pki.device("dev-old")
    pki.reg.set_status("dev-revoked", "revoked", utcnow(), actor="test")
    pki.reg.set_status("dev-suspended", "suspended", utcnow(), actor="test")
    pki.renew(old, grace=timedelta(0))
    mismatch = pki.device("dev-mismatch")
    cases = [(unknown, None, "unknown certificate"), (revoked, None, "revoked"), (suspended, None, "suspended"),
             (old, None, "superseded"), (mismatch, "someone-else", "client id mismatch")]
    for cred, client_id, reason in cases:
        assert connack(broker, cred, client_id) == NOT_AUTHORIZED, reason
        principal = "-" if reason == "unknown certificate" else cred.principal
        broker.wait_log(f"refused principal={principal} serial={cred.serial} "
                        f"client_id={client_id or cred.principal}: {reason}")
    assert connack(broker, revoked, protocol=mqtt.MQTTv311) == NOT_AUTHORIZED  # paho's name for return code 5


def test_superseded_certificate_works_until_the_new_one_is_used(broker: Broker, pki: Pki) -> None:
    old = pki.device("dev-renew")
    new = pki.renew(old, grace=timedelta(minutes=5))
    for cred, expected in ((old, 0), (new, 0), (old, NOT_AUTHORIZED)):
        assert connack(broker, cred) == expected, cred
    broker.wait_log(f"refused principal=dev-renew serial={old.serial} client_id=dev-renew: superseded")


def test_device_is_confined(broker: Broker, pki: Pki, connect) -> None:
    dev = connect(pki.device("dev-box", groups=("g1",)))
    assert dev.publish("devices/dev-box/commands") == NOT_AUTHORIZED
    assert dev.publish("devices/other/telemetry") == NOT_AUTHORIZED
    assert dev.publish("devices/dev-box/telemetry", retain=True) == NOT_AUTHORIZED
    assert dev.publish("$CONTROL/tessera/v1", b"sync r1") == NOT_AUTHORIZED
    assert dev.publish("devices/dev-box/telemetry", b"x" * (300 * 1024)) == NOT_AUTHORIZED
    assert dev.publish("devices/dev-box/telemetry", b"x" * (200 * 1024)) == 0
    for flt in ("#", "devices/+/telemetry", "$share/x/devices/#", "$SYS/#", "$CONTROL/#", "devices/dev-box/#",
                "fleet/groups/g2/#", "fleet/groups/+/#", "$share//devices/dev-box/commands"):
        assert dev.subscribe(flt) == NOT_AUTHORIZED, flt
    for flt in ("devices/dev-box/commands", "$share/g/devices/dev-box/commands", "fleet/groups/g1/#",
                "fleet/groups/g1/a/+"):
        assert dev.subscribe(flt) == 1, flt
    with pytest.raises(queue.Empty):
        dev.message(timeout=0.2)


def test_commands_carry_the_senders_identity(broker: Broker, pki: Pki, connect) -> None:
    dev = connect(pki.device("dev-cmd"))
    assert dev.subscribe("devices/dev-cmd/commands") == 1
    ops = connect(pki.identity("ops", "service", "commander"))
    assert ops.publish("devices/dev-cmd/commands", b"reboot", user=[("tessera-sender", "tessera-hub"),
                                                                   ("tessera-role", "hub")]) == 0
    msg = dev.message()
    assert msg.payload == b"reboot"
    assert msg.properties.UserProperty == [("tessera-sender", "svc.ops"), ("tessera-role", "commander")]


def test_revocation_kicks_a_live_session_within_a_second(broker: Broker, pki: Pki, connect) -> None:
    cred = pki.device("dev-kick")
    dev = connect(cred)
    start = time.monotonic()
    pki.reg.set_status("dev-kick", "revoked", utcnow(), actor="test")
    assert dev.gone.wait(1.5), "not kicked"
    assert time.monotonic() - start < 1.5 and dev.disconnect_reason == ADMINISTRATIVE_ACTION
    broker.wait_log(f"kicked principal=dev-kick serial={cred.serial}: revoked")
    assert connack(broker, cred) == NOT_AUTHORIZED


def test_control_doorbell(broker: Broker, pki: Pki, connect) -> None:
    hub = connect(pki.identity("tessera-hub", "hub", "hub"))
    assert hub.subscribe("$CONTROL/tessera/v1/response") == 1
    dev = connect(pki.device("dev-bell"))
    assert dev.subscribe("fleet/groups/g7/#") == NOT_AUTHORIZED
    with pki.reg.write() as db:  # a group change, as the hub writes it: row + authz event in one transaction
        db.execute("UPDATE devices SET groups = '[\"g7\"]' WHERE id = 'dev-bell'")
        Registry.authz_event(db, "dev-bell", "groups changed", utcnow())
    assert hub.publish("$CONTROL/tessera/v1", b"sync req-1\n") == 0
    assert hub.message().payload.decode() == f"req-1 ok seq={pki.reg.authz_seq()} kicked=0"
    assert dev.subscribe("fleet/groups/g7/#") == 1
    assert hub.publish("$CONTROL/tessera/v1", b"sync bad id!") == 0
    assert hub.message().payload.decode().startswith("- error malformed request")
    # the tick may apply a commit before the doorbell rings: "sync <id> <after>" still counts its kicks
    before = pki.reg.authz_seq()
    victim = connect(pki.device("dev-bell-2"))
    pki.reg.set_status("dev-bell-2", "suspended", utcnow(), actor="test")
    assert victim.gone.wait(1.5), "the tick did not cut the session"
    assert hub.publish("$CONTROL/tessera/v1", b"sync late") == 0
    assert hub.message().payload.decode() == f"late ok seq={pki.reg.authz_seq()} kicked=0"
    assert hub.publish("$CONTROL/tessera/v1", f"sync late-2 {before}".encode()) == 0
    assert hub.message().payload.decode() == f"late-2 ok seq={pki.reg.authz_seq()} kicked=1"
    reader = connect(pki.identity("peeker", "service", "admin"))
    assert reader.publish("$CONTROL/tessera/v1", b"sync r2") == NOT_AUTHORIZED
    with pytest.raises(queue.Empty):
        hub.message(timeout=0.3)


def test_connect_rate_limit(pki: Pki) -> None:
    cred = pki.device("dev-storm")
    broker = Broker(pki, connect_burst=3, connect_rate=1).wait_ready()
    try:
        assert [connack(broker, cred) for _ in range(4)] == [0, 0, 0, NOT_AUTHORIZED]
        broker.wait_log(f"refused principal=dev-storm serial={cred.serial} client_id=dev-storm: rate limited")
    finally:
        broker.stop()


def test_wills_are_refused_and_the_broker_announces_offline(broker: Broker, pki: Pki, connect) -> None:
    """No will is delivered (2.0.11 sends wills without MOSQ_EVT_MESSAGE: their properties, a forged tessera-role,
    could not be replaced); instead the plugin publishes the device's retained offline status itself, stamped."""
    watcher = connect(pki.identity("watcher", "service", "telemetry-reader"))
    assert watcher.subscribe("devices/dev-will/status") == watcher.subscribe("devices/dev-will2/telemetry") == 1
    for device_id, topic, retain in (("dev-will", "status", True), ("dev-will2", "telemetry", False)):
        dev = connect(pki.device(device_id), will=(f"devices/{device_id}/{topic}", retain))
        if retain:  # a device that announced its presence gets its offline announced by the broker
            assert dev.publish(f"devices/{device_id}/status", b'{"state": "online"}', retain=True) == 0
            assert watcher.message().payload == b'{"state": "online"}'
        dev.c.loop_stop()
        dev.c.socket().close()  # no DISCONNECT: the broker would send the will
    msg = watcher.message()
    assert (msg.topic, msg.payload) == ("devices/dev-will/status", b'{"state": "offline"}')
    assert dict(msg.properties.UserProperty) == {"tessera-sender": "dev-will", "tessera-role": "device"}
    with pytest.raises(queue.Empty):
        watcher.message(timeout=0.5)
    late = connect(pki.identity("late", "service", "telemetry-reader"))
    assert late.subscribe("devices/dev-will/status") == 1
    msg = late.message()  # retained, and delivered to a later subscriber
    assert (msg.topic, msg.payload) == ("devices/dev-will/status", b'{"state": "offline"}')


def test_sighup_keeps_sessions(broker: Broker, pki: Pki, connect) -> None:
    dev = connect(pki.device("dev-hup"))
    for _ in range(3):
        os.kill(broker.proc.pid, signal.SIGHUP)
        time.sleep(0.1)
    assert dev.publish("devices/dev-hup/telemetry") == 0 and not dev.gone.is_set()


def test_unreadable_registry_fails_closed(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    cred = pki.device("dev-fc")
    broker = Broker(pki).wait_ready()
    try:
        assert connack(broker, cred) == 0
        pki.reg.close()
        for suffix in ("-wal", "-shm"):
            Path(f"{pki.registry}{suffix}").unlink(missing_ok=True)
        garbage = tmp_path / "garbage"
        garbage.write_bytes(b"not a database\n" * 512)
        os.replace(garbage, pki.registry)  # the plugin notices the replaced file and reads the new one
        assert connack(broker, cred) == NOT_AUTHORIZED
        broker.wait_log(f"refused principal=- serial={cred.serial} client_id=dev-fc: registry unreadable")
        pki.registry.unlink()
        assert connack(broker, cred) == NOT_AUTHORIZED
        assert broker.proc.poll() is None
    finally:
        broker.stop()


@pytest.mark.parametrize("bad", [{"registry": "/nonexistent/registry.sqlite3"}, {"max_payload": "lots"},
                                 {"device_ca": "/nonexistent/ca.pem"}])
def test_bad_configuration_keeps_the_broker_down(tmp_path: Path, bad: dict) -> None:
    broker = Broker(Pki(tmp_path), **bad)
    try:
        assert broker.proc.wait(timeout=TIMEOUT) != 0
        assert "tessera_authz: " in broker.text()
    finally:
        broker.stop()
