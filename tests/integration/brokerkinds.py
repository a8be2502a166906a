"""One broker test body, two brokers: the `broker_kind` parametrization (ids mosquitto, rabbitmq) and `Target`.

A test that asks for `target` runs twice: against its module's own Mosquitto hub (the module's `hub` fixture,
MQTT v5 sessions) and against the session's 3-node RabbitMQ cluster hub (rabbitfixtures.rabbit_cluster_hub,
MQTT 3.1.1 sessions: RabbitMQ 3.10 speaks nothing newer). On RabbitMQ each test starts on a node of its own
(`Target.base`, from the test's name, so node 2 and 3 are exercised and the hub itself talks to node 1);
`port(i)` is the i-th node from there, so a test with several sessions spreads them over the cluster.

Each assertion helper says what a refusal is in the broker's own terms, once:
- connect refused by the authorization (`assert_refused`): Mosquitto answers CONNACK 0x87 under TLS 1.2 and 1.3
  and its plugin logs the reason; RabbitMQ refuses the MQTT 3.1.1 CONNECT on every node and the hub's auth back
  end logs the reason (hub/broker/rabbitmq/auth.py) for the certificate's CN;
- refused in the TLS handshake (`assert_refused_in_tls`): the same raw probe on both (no CONNACK; under TLS 1.2
  the handshake itself fails), and on RabbitMQ the auth back end was never asked;
- a refused PUBLISH: PUBACK 0x87 and the session lives on (Mosquitto); the connection is closed (RabbitMQ: 3.1.1
  has no negative PUBACK);
- a refused SUBSCRIBE: SUBACK 0x87 (Mosquitto); SUBACK 0x80 or the connection closed (RabbitMQ);
- a cut session (`assert_cut`): DISCONNECT 0x98 administrative action (Mosquitto's kick); the connection closed by
  the management API (RabbitMQ);
- the sender stamp (`assert_stamped`): tessera-sender / tessera-role user properties (Mosquitto); none at all
  (RabbitMQ: MQTT 3.1.1 carries no properties, documented in README "RabbitMQ").
Device ids must be unique over the session: the cluster hub is shared by every module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from tests.integration.brokerfixtures import (NOT_AUTHORIZED, ADMINISTRATIVE_ACTION, ConnectRefused, Device,
                                              MqttSession, admitted, Msg, Probe, broker_log, client_context, kicks,
                                              raw_connection, refusals)
from tests.integration.hubfixtures import Hub
from tests.integration.rabbitfixtures import rabbit_cluster_hub, require_rabbitmq  # noqa: F401  (fixture)

KINDS = ("mosquitto", "rabbitmq")
TLS_VERSIONS = ("1.2", "1.3")
CUT_TIMEOUT = 5.0  # a generous bound for a kick to arrive (revoke -> cut is measured in bench/)
LOG_TIMEOUT = 3.0  # the broker's log (Mosquitto) and the hub's (RabbitMQ auth back end) are written lazily
#: OpenSSL's (Mosquitto) TLS alert -> the one Erlang's ssl (RabbitMQ) sends for the same client certificate
ERLANG_ALERTS = {"UNSUPPORTED_CERTIFICATE": "HANDSHAKE_FAILURE"}  # a client certificate without clientAuth EKU
_RABBIT_REFUSED_RE = re.compile(r"rabbitmq auth: refused (\w+) user=(\S+) principal=(\S+) client_id=(.*?): (.+)$")
_RABBIT_KICKED_RE = re.compile(r"rabbitmq: kicked \d+ connection\(s\) of principal=(\S+)")


def hub_log(hub: Hub) -> str:
    return hub.stderr_path.read_text(errors="replace") if hub.stderr_path and hub.stderr_path.exists() else ""


def cn(dev: Device) -> str:
    return dev.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def names(dev: Device) -> set[str]:
    """What a refusal of this certificate may be logged under: its CN, and on RabbitMQ its credential URI (the
    user name: hub/ca/credential.py), which is all the back end knows of a certificate the registry does not."""
    out = {cn(dev)}
    with contextlib.suppress(x509.ExtensionNotFound):
        out.update(dev.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                   .get_values_for_type(x509.UniformResourceIdentifier))
    return out


_made: dict[tuple[str, str], Any] = {}
SAME = object()  # assert_refused: RabbitMQ's back end gives the same reason


@dataclasses.dataclass
class Target:
    """The broker a test runs against: its hub, its MQTT ports (one per node) and how it answers."""

    kind: str  # "mosquitto" | "rabbitmq"
    hub: Hub
    ports: tuple[int, ...]
    cluster: Any = None  # rabbitfixtures.RabbitCluster
    base: int = 0  # the node this test starts on

    @property
    def rabbitmq(self) -> bool:
        return self.kind == "rabbitmq"

    @property
    def protocol(self) -> int:
        return mqtt.MQTTv311 if self.rabbitmq else mqtt.MQTTv5

    def port(self, i: int = 0) -> int:
        return self.ports[(self.base + i) % len(self.ports)]

    def every_port(self) -> list[int]:
        return [self.port(i) for i in range(len(self.ports))]

    def once(self, key: str, make: Callable[[], Any]) -> Any:
        """`make()` once per hub and key (credentials the module's tests share and do not consume)."""
        k = (str(self.hub.dir), key)
        if k not in _made:
            _made[k] = make()
        return _made[k]

    def workdir(self, base: Path) -> Path:
        return base / self.kind

    # --- sessions ---------------------------------------------------------------------------------------------
    def mqtt(self, dev: Device, i: int = 0, client_id: str | None = None, port: int | None = None,
             credentials: tuple[str, str] | None = None) -> MqttSession:
        """A session (not yet connected) for `dev` on node i (client id = its principal unless told otherwise;
        `credentials`: a CONNECT with that username and password besides the certificate)."""
        return MqttSession(self.hub, dev.chain, dev.key, dev.id if client_id is None else client_id,
                           port=port or self.port(i), protocol=self.protocol, credentials=credentials)

    def session(self, dev: Device, i: int = 0, client_id: str | None = None) -> MqttSession:
        return self.mqtt(dev, i, client_id).connect()

    def connects(self, dev: Device, i: int = 0, client_id: str | None = None, port: int | None = None,
                 credentials: tuple[str, str] | None = None) -> bool:
        return admitted(self.mqtt(dev, i, client_id, port, credentials))

    def probe(self, chain: Path | None, key: Path | None, tls: str | None, client_id: str, i: int = 0) -> Probe:
        """One raw TCP + TLS + MQTT v5 CONNECT (brokerfixtures.raw_connection) on node i."""
        with raw_connection(self.port(i), client_context(self.hub, chain, key, tls), client_id) as (p, sock):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.sendall(b"\xe0\x00")
            return p

    # --- logs: the broker's refusals and kicks ------------------------------------------------------------------
    def mark(self) -> int:
        return len(hub_log(self.hub) if self.rabbitmq else broker_log(self.hub))

    def refusals(self, since: int) -> list[tuple[str, str, str, str]]:
        """(principal, client id, reason, user) refused since `since` (Mosquitto: the plugin, principal '-'
        for an unknown certificate, user = principal; RabbitMQ: the auth back end, user = the credential URI,
        principal '-' for a credential the registry does not hold)."""
        if not self.rabbitmq:
            return [(p, c, r, p) for p, c, r in refusals(self.hub, since)]
        found = [m.group(3, 4, 5, 2) for m in map(_RABBIT_REFUSED_RE.search,
                                                 hub_log(self.hub)[since:].splitlines()) if m]
        return [(p.encode().decode("unicode_escape"), c.encode().decode("unicode_escape"), r,
                 u.encode().decode("unicode_escape")) for p, c, r, u in found]

    def wait_refusal(self, since: int, who: str | set[str], timeout: float = LOG_TIMEOUT) -> tuple[str, str]:
        """(principal, reason) of the first refusal since `since` naming `who` (one name or a set of names) as
        its client id, principal or user."""
        wanted = {who} if isinstance(who, str) else set(who)
        deadline = time.monotonic() + timeout
        while True:
            found = [(p, r) for p, c, r, u in self.refusals(since) if wanted & {c, p, u}]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                log = hub_log(self.hub) if self.rabbitmq else broker_log(self.hub)
                raise AssertionError(f"{self.kind}: no refusal of {who!r} logged:\n{log[since:][-4000:]}")
            time.sleep(0.02)

    def kicked(self, since: int) -> set[str]:
        """Principals whose sessions the broker cut since `since` (the plugin's or the driver's log line)."""
        if not self.rabbitmq:
            return {p for p, _ in kicks(self.hub, since)}
        return set(_RABBIT_KICKED_RE.findall(hub_log(self.hub)[since:]))

    def wait_kicked(self, since: int, principal: str, timeout: float = LOG_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while principal not in self.kicked(since):
            assert time.monotonic() < deadline, f"{self.kind}: no kick of {principal} logged"
            time.sleep(0.02)

    # --- refusals in the broker's terms -----------------------------------------------------------------------
    def assert_admitted(self, dev: Device, client_id: str | None = None) -> None:
        """Mosquitto: a raw v5 CONNECT is accepted; RabbitMQ: a 3.1.1 session connects on every node."""
        if self.rabbitmq:
            bad = [p for p in self.every_port() if not self.connects(dev, client_id=client_id, port=p)]
            assert not bad, f"rabbitmq: {dev.id} refused on the node(s) with MQTT port(s) {bad}"
        else:
            p = self.probe(dev.chain, dev.key, None, dev.id if client_id is None else client_id)
            assert p.accepted, f"mosquitto: {dev.id} not admitted: {p}"

    def assert_refused(self, dev: Device, reason: str, client_id: str | None = None,
                       principal: str | None = None, rabbitmq_reason: str | None | object = SAME,
                       in_crl: bool = False) -> None:
        """Refused by the authorization for `reason`, as the broker says it: Mosquitto CONNACK 0x87 under TLS 1.2
        and 1.3 and the plugin's log line (with `principal`, '-' for an unknown certificate); RabbitMQ no session
        on any node and the auth back end's log line for the certificate's CN with `rabbitmq_reason` (the back
        end's words where they differ: it is told a name, never a serial), or, with rabbitmq_reason=None,
        refused in the TLS handshake by the listener's CRL (the back end never asked). With `in_crl`, RabbitMQ
        may refuse either way: a revoked or suspended certificate goes into the listener's CRL soon after the
        change, and until then the back end refuses it. paho is refused too."""
        client_id = dev.id if client_id is None else client_id
        if self.rabbitmq:
            if rabbitmq_reason is None:
                self.assert_refused_in_tls(dev.chain, dev.key, client_id, who=names(dev))
                return
            expected = reason if rabbitmq_reason is SAME else rabbitmq_reason
            mark = self.mark()
            admitted = [p for p in self.every_port() if self.connects(dev, client_id=client_id, port=p)]
            assert not admitted, f"rabbitmq: admitted on the node(s) with MQTT port(s) {admitted} ({expected})"
            if in_crl:
                time.sleep(0.1)
                said = {r for p, c, r, u in self.refusals(mark) if names(dev) & {p, c, u}}
                assert said <= {expected}, f"rabbitmq: refused for {said}, expected {expected!r} (or in TLS)"
            else:
                logged = self.wait_refusal(mark, names(dev))
                assert logged[1] == expected, f"rabbitmq: refused for {logged[1]!r}, expected {expected!r}"
            return
        for tls in TLS_VERSIONS:
            mark = self.mark()
            p = self.probe(dev.chain, dev.key, tls, client_id)
            assert p.not_authorized, f"TLS {tls}: expected CONNACK 0x87, got {p}"
            logged = self.wait_refusal(mark, client_id)
            assert logged[1] == reason, f"TLS {tls}: refused for {logged[1]!r}, expected {reason!r}"
            if principal is not None:
                assert logged[0] == principal, logged
        with pytest.raises(ConnectRefused, match="Not authorized"):
            self.mqtt(dev, client_id=client_id).connect(timeout=5)

    def assert_refused_in_tls(self, chain: Path | None, key: Path | None, client_id: str,
                              tls_detail: str | None = None, who: str | set[str] | None = None) -> None:
        """No CONNACK under TLS 1.2 or 1.3 on any node; under TLS 1.2 the handshake itself fails (with
        `tls_detail` if given). RabbitMQ: the auth back end was never asked about `who` (the certificate's CN)."""
        mark = self.mark()
        if self.rabbitmq and chain is not None:  # the raw probe speaks MQTT v5, RabbitMQ 3.1.1: a session first
            s = MqttSession(self.hub, chain, key, client_id, port=self.port(), protocol=self.protocol)
            with contextlib.suppress(ConnectRefused):
                s.connect(timeout=5)
            s.close()
            assert not s.connack.is_set(), f"rabbitmq: {client_id} got a CONNACK ({s.connack_rc})"
        for i in range(len(self.ports)):
            for tls in TLS_VERSIONS:
                p = self.probe(chain, key, tls, client_id, i)
                assert not p.got_connack, f"{self.kind} TLS {tls}: the broker answered CONNECT: {p}"
                assert p.stage in ("tls", "closed"), f"{self.kind} TLS {tls}: {p}"
                if tls == "1.2":
                    assert p.stage == "tls", f"{self.kind} TLS 1.2: the handshake should fail: {p}"
                    want = ERLANG_ALERTS.get(tls_detail, tls_detail) if self.rabbitmq else tls_detail
                    if want:
                        assert want in p.detail.upper(), f"{self.kind} TLS 1.2: expected {want}: {p}"
        if self.rabbitmq and who is not None:
            time.sleep(0.1)
            wanted = {who} if isinstance(who, str) else set(who)
            asked = [r for r in self.refusals(mark) if wanted & {r[0], r[1], r[3]}]
            assert not asked, f"rabbitmq: the auth back end was asked although TLS refused: {asked}"

    def assert_never_admitted(self, dev: Device, client_id: str | None = None) -> None:
        """Refused in the TLS handshake or by the authorization, whichever comes first, on every node."""
        client_id = dev.id if client_id is None else client_id
        for i in range(len(self.ports)):
            for tls in TLS_VERSIONS:
                p = self.probe(dev.chain, dev.key, tls, client_id, i)
                assert not p.accepted, f"{self.kind} TLS {tls}: admitted: {p}"
        if self.rabbitmq:  # the raw probe speaks MQTT v5, which RabbitMQ refuses anyway: ask in 3.1.1 too
            admitted = [p for p in self.every_port() if self.connects(dev, client_id=client_id, port=p)]
            assert not admitted, f"rabbitmq: admitted on the node(s) with MQTT port(s) {admitted}"

    def publish_refused(self, s: MqttSession, topic: str, payload: bytes = b"x", retain: bool = False) -> bool:
        """Publish QoS 1 on session s: True if the broker refused it (Mosquitto PUBACK 0x87, the session lives
        on; RabbitMQ the connection closed), False if it took it (PUBACK success)."""
        try:
            rc = s.publish(topic, payload, qos=1, timeout=3, retain=retain)
        except TimeoutError:
            assert self.rabbitmq, f"mosquitto closed {s.client_id}'s connection for a PUBLISH to {topic}"
            return True
        if rc in (0x00, 0x10):
            return False
        assert not self.rabbitmq and rc == NOT_AUTHORIZED, f"{self.kind}: PUBACK {rc:#x} for {topic}"
        assert s.connected, f"mosquitto: {s.client_id}'s session ended with a refused PUBLISH"
        return True

    def subscribe_refused(self, s: MqttSession, topic: str) -> bool:
        """Subscribe QoS 1 on session s: True if refused (Mosquitto SUBACK 0x87; RabbitMQ SUBACK 0x80 or the
        connection closed), False if granted."""
        try:
            rc = s.subscribe(topic, qos=1, timeout=3)
        except TimeoutError:
            assert self.rabbitmq, f"mosquitto closed {s.client_id}'s connection for a SUBSCRIBE to {topic}"
            return True
        if rc in (0, 1):
            return False
        assert rc == (0x80 if self.rabbitmq else NOT_AUTHORIZED), f"{self.kind}: SUBACK {rc:#x} for {topic}"
        return True

    def assert_publish_refused(self, dev: Device, topic: str, payload: bytes = b"x", retain: bool = False,
                               i: int = 0) -> None:
        """On a session of its own (RabbitMQ closes it), `dev` publishing to `topic` is refused."""
        s = self.session(dev, i)
        try:
            assert self.publish_refused(s, topic, payload, retain), f"{self.kind}: {dev.id} may publish to {topic}"
        finally:
            s.close()

    def assert_subscribe_refused(self, dev: Device, topic: str, i: int = 0) -> None:
        s = self.session(dev, i)
        try:
            assert self.subscribe_refused(s, topic), f"{self.kind}: {dev.id} may subscribe to {topic}"
        finally:
            s.close()

    def assert_cut(self, s: MqttSession, what: str, timeout: float = CUT_TIMEOUT) -> None:
        """The broker ended the live session s: Mosquitto with DISCONNECT 0x98 (administrative action),
        RabbitMQ by closing the connection (MQTT 3.1.1 has no server DISCONNECT)."""
        assert s.disconnected.wait(timeout), f"{self.kind}: {what}: the live session was not cut within {timeout} s"
        if not self.rabbitmq:
            assert getattr(s.disconnect_rc, "value", None) == ADMINISTRATIVE_ACTION, (what, s.disconnect_rc)

    def assert_stamped(self, msg: Msg, principal: str, role: str) -> None:
        """Mosquitto's plugin stamps tessera-sender / tessera-role; RabbitMQ (MQTT 3.1.1) carries no properties."""
        expected = () if self.rabbitmq else (("tessera-sender", principal), ("tessera-role", role))
        assert msg.user_props == expected, f"{self.kind}: {msg.topic} stamped {msg.user_props}"


@pytest.fixture(params=KINDS)
def broker_kind(request) -> str:
    """"mosquitto" or "rabbitmq" (skipped where RabbitMQ is not installed)."""
    if request.param == "rabbitmq":
        require_rabbitmq()
    return request.param


@pytest.fixture
def target(broker_kind, request) -> Target:
    """The module's Mosquitto hub (its `hub` fixture) or the session's RabbitMQ cluster hub, as a Target."""
    if broker_kind == "mosquitto":
        hub = request.getfixturevalue("hub")
        return Target("mosquitto", hub, (hub.mqtt_port,))
    hub, cluster = request.getfixturevalue("rabbit_cluster_hub")
    ports = tuple(n.mqtt_port for n in cluster.nodes)
    return Target("rabbitmq", hub, ports, cluster, base=zlib.crc32(request.node.name.encode()) % len(ports))
