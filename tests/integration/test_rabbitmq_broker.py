"""The RabbitMQ driver's guarantees on a real 3-node cluster: who connects, impostors, confinement, revocation.

One hub (`[broker] kind = "rabbitmq"`, talking MQTT and the management API to node 1) and one 3-node cluster for
the session (rabbitfixtures.rabbit_cluster_hub). Clients are paho MQTT 3.1.1 sessions (brokerfixtures.MqttSession
with protocol MQTTv311) on any node. What RabbitMQ does with a refusal: a CONNACK 5 (not authorized) or 4 (bad
user name or password) or a closed connection at connect; a closed connection for a refused PUBLISH (3.1.1 has
no negative PUBACK); SUBACK 0x80 for a refused subscription. The table of topics x principals is the one
test_broker_authz_table.py runs against Mosquitto; `rabbit_expected()` derives this broker's cells from it and
hub.authz.policy with the documented differences (hub/broker/rabbitmq/auth.py) and nothing else. The revocation
cases (revoke, suspend, revoked service identity, superseded after its grace) run on both drivers (`target`:
this module's Mosquitto hub, same grace, and the cluster) with the same MQTT 3.1.1 clients and assertions.
"""

from __future__ import annotations

import datetime as dt
import ssl
import time
from concurrent.futures import ThreadPoolExecutor

import paho.mqtt.client as mqtt
import pytest

from hub.authz.policy import DEFAULT_ROLES, allows, expand, filter_covered, valid_filter
from tests.integration.brokerfixtures import (ConnectRefused, MqttSession, add_identity, admin_call, broker_hub,
                                              enroll_device, sessions)
from tests.integration.rabbitfixtures import SESSION_GRACE, rabbit_cluster_hub  # noqa: F401  (session's hub)
from tests.integration.test_broker_authz_table import CUSTOM_RULES, EXPECTED, PRINCIPALS, parse_table

pytestmark = pytest.mark.integration

CUT_TIMEOUT = 5.0  # a generous bound for a kick to arrive (the revoke -> cut time is measured in bench/)


@pytest.fixture(scope="module")
def rh(rabbit_cluster_hub):  # noqa: F811
    return rabbit_cluster_hub


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("rabbit-creds")


@pytest.fixture(scope="module")
def mosquitto_hub(tmp_path_factory):
    with broker_hub(tmp_path_factory.mktemp("rabbit-vs-mosquitto"), supersede_grace_seconds=SESSION_GRACE) as h:
        yield h


@pytest.fixture(params=["mosquitto", "rabbitmq"])
def target(request):
    """The revocation cases run on both drivers: (hub, MQTT ports); the hub's own session is on the first."""
    if request.param == "mosquitto":
        hub = request.getfixturevalue("mosquitto_hub")
        return hub, [hub.mqtt_port]
    hub, cluster = request.getfixturevalue("rabbit_cluster_hub")
    return hub, ports(cluster)


def mqtt311(hub, dev, node_port: int, client_id: str | None = None,
            credentials: tuple[str, str] | None = None) -> MqttSession:
    return MqttSession(hub, dev.chain, dev.key, client_id or dev.id, port=node_port, protocol=mqtt.MQTTv311,
                       credentials=credentials)


def connects(hub, dev, port: int, client_id: str | None = None, credentials: tuple[str, str] | None = None) -> bool:
    s = mqtt311(hub, dev, port, client_id, credentials)
    try:
        s.connect(timeout=5)
        return True
    except ConnectRefused:
        return False
    finally:
        s.close()


def ports(cluster) -> list[int]:
    return [n.mqtt_port for n in cluster.nodes]


def nodes_tag(nodes: list[int]) -> str:
    return f"n{len(nodes)}"


def wait_cut(s: MqttSession, what: str) -> None:
    assert s.disconnected.wait(CUT_TIMEOUT), f"{what}: the live session was not cut within {CUT_TIMEOUT} s"


# --- who connects --------------------------------------------------------------------------------------------------

def test_a_device_connects_on_every_node_with_its_certificate_alone(rh, work):
    hub, cluster = rh
    dev = enroll_device(hub, "rmq-ok", work)
    for port in ports(cluster):
        assert connects(hub, dev, port), f"node with MQTT port {port} refused a valid device"


def test_client_id_must_be_the_principal(target, work):
    hub, nodes = target
    dev = enroll_device(hub, "rmq-cid", work / nodes_tag(nodes))
    other = enroll_device(hub, "rmq-cid-other", work / nodes_tag(nodes))
    for port in nodes:
        assert not connects(hub, dev, port, client_id=other.id)
        assert not connects(hub, dev, port, client_id="tessera-hub")


def test_no_client_certificate_is_refused(target):
    hub, nodes = target
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(hub.root_pem))
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="nocert", protocol=mqtt.MQTTv311,
                    reconnect_on_failure=False)
    c.tls_set_context(ctx)
    refused = False
    try:
        c.connect("127.0.0.1", nodes[-1], 10)
        c.loop(timeout=2)
        c.loop(timeout=2)
        refused = not c.is_connected()
    except (ssl.SSLError, OSError):
        refused = True
    assert refused, "a client without a certificate got through the TLS handshake and CONNECT"


def test_impostor_with_a_username_and_password_is_refused(target, work):
    """A device's certificate with another principal's name as username (and password) and client id: refused on
    both (Mosquitto's plugin goes by the certificate and refuses the client id; RabbitMQ would take the username
    over the certificate, so the hub refuses every password login, whoever it names, its own name too)."""
    from hub.broker.rabbitmq.auth import MGMT_USER

    hub, nodes = target
    dev = enroll_device(hub, "rmq-imp", work / nodes_tag(nodes))
    victim = enroll_device(hub, "rmq-victim", work / nodes_tag(nodes))
    for port in nodes:
        for name in (victim.id, "svc.rmq-anything", "tessera-hub", MGMT_USER):
            assert not connects(hub, dev, port, client_id=name, credentials=(name, "guess")), name
        assert not connects(hub, dev, port, client_id=victim.id, credentials=(victim.id, ""))
    if len(nodes) > 1:  # RabbitMQ: a password is refused even with the device's own name and client id
        assert not any(connects(hub, dev, p, credentials=(dev.id, "guess")) for p in nodes)
        assert "password login refused" in hub.stderr_path.read_text()


def test_the_management_user_cannot_use_mqtt_even_with_its_secret(rh, work):
    hub, cluster = rh
    dev = enroll_device(hub, "rmq-mgmt", work)
    from hub.broker.rabbitmq.auth import MGMT_USER

    secret = (hub.dir / "broker" / "rabbitmq" / "mgmt.secret").read_text().strip()
    assert oct((hub.dir / "broker" / "rabbitmq" / "mgmt.secret").stat().st_mode & 0o777) == "0o600"
    assert not connects(hub, dev, cluster.nodes[1].mqtt_port, client_id=MGMT_USER, credentials=(MGMT_USER, secret))


# --- confinement: the broker table -------------------------------------------------------------------------------

def rabbit_expected() -> dict[tuple[str, str], str]:
    """The Mosquitto table's cells as RabbitMQ 3.10 enforces them: p and s only (r: a retained PUBLISH is not
    told apart, d: deliveries are not filtered one by one), s also needs the receive rules to cover the filter,
    and no $share subscriptions. Each rule comes from hub.authz.policy, and each changed cell is one of these."""
    columns, rows, mosquitto = parse_table(EXPECTED)
    out = {}
    for (row, col), cell in mosquitto.items():
        principal, role, groups = PRINCIPALS[col]
        rules = CUSTOM_RULES if role == "tab-odd" else DEFAULT_ROLES[role]
        g = expand(rules, principal, groups)
        topic = row.replace("D1", PRINCIPALS["d1"][0]).replace("D2", PRINCIPALS["d2"][0])
        p = "p" if cell[0] == "p" else ("-" if cell[0] == "-" else ".")
        sub = (not topic.startswith("$share/") and valid_filter(topic) and allows(g, "subscribe", topic)
               and any(filter_covered(x, topic) for x in g.receive))
        s = "s" if sub else "."
        assert cell[0] == p or cell[0] == "-"
        assert s == "." or cell[2] == "s", (row, col)  # never wider than on Mosquitto
        out[(topic, col)] = p + s
    return out


def test_broker_enforces_the_table(rh, work):
    hub, cluster = rh
    hub.cli_ok("role", "set", "tab-odd", *[a for action, p in CUSTOM_RULES for a in ("--rule", f"{action}:{p}")])
    creds = {}
    for col, (principal, role, groups) in PRINCIPALS.items():
        name = principal.replace("tab-", "rtab-")
        if role == "device":
            creds[col] = enroll_device(hub, name, work, groups=groups)
        else:
            creds[col] = add_identity(hub, name.removeprefix("svc."), role, work)
    expected = rabbit_expected()

    def column(n: int, col: str) -> list[tuple]:
        """Every cell of one principal, on node n % 3, one session until the broker closes it (a refusal)."""
        dev, port, current, wrong = creds[col], ports(cluster)[n % 3], [], []

        def ok(action) -> bool:
            try:
                if not current or current[-1].disconnected.is_set():
                    current.append(mqtt311(hub, dev, port).connect())
                return action(current[-1]) in (0, 1)  # PUBACK / SUBACK QoS
            except TimeoutError:  # closed by the broker: refused
                return False

        try:
            for (topic, c), cell in sorted(expected.items()):
                if c != col:
                    continue
                t = topic.replace(PRINCIPALS["d1"][0], creds["d1"].id).replace(PRINCIPALS["d2"][0], creds["d2"].id)
                if cell[0] != "-" and ok(lambda x: x.publish(t, b"x", qos=1, timeout=3)) != (cell[0] == "p"):
                    wrong.append((t, col, "publish", cell[0]))
                if ok(lambda x: x.subscribe(t, qos=1, timeout=3)) != (cell[1] == "s"):
                    wrong.append((t, col, "subscribe", cell[1]))
        finally:
            for x in current:
                x.close()
        return wrong

    with ThreadPoolExecutor(len(creds)) as pool:  # the principals at once, each on its own node
        wrong = [w for ws in pool.map(column, range(len(creds)), creds) for w in ws]
    assert not wrong, "cells where RabbitMQ disagrees with the policy:\n" + "\n".join(map(str, wrong))


def test_a_device_command_reaches_only_its_device_across_nodes(rh, work):
    """Delivery across nodes: a commander on node 1 commands D1; D1 on node 3 gets it, D2 (subscribed to its
    own commands on node 2) does not; D1 cannot subscribe to D2's commands."""
    hub, cluster = rh
    d1, d2 = enroll_device(hub, "rmq-x1", work), enroll_device(hub, "rmq-x2", work)
    cmd = add_identity(hub, "rmq-cmd", "commander", work)
    p1, p2, p3 = ports(cluster)
    with sessions(mqtt311(hub, d1, p3).connect(), mqtt311(hub, d2, p2).connect(),
                  mqtt311(hub, cmd, p1).connect()) as (s1, s2, c):
        assert s1.subscribe(f"devices/{d1.id}/commands") < 0x80
        assert s2.subscribe(f"devices/{d2.id}/commands") < 0x80
        time.sleep(0.3)  # bindings are cluster-wide metadata: let them settle before publishing
        assert c.publish(f"devices/{d1.id}/commands", b"ping", qos=1) == 0
        s1.wait_message(f"devices/{d1.id}/commands", b"ping")
        time.sleep(0.3)
        assert not any(m.payload == b"ping" for m in s2.received)
    with sessions(mqtt311(hub, d1, p2).connect()) as (s,):
        with pytest.raises(TimeoutError, match="connection closed"):
            s.subscribe(f"devices/{d2.id}/commands")


# --- revocation -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["revoke", "suspend"])
def test_status_change_cuts_a_session_on_node_2_through_the_hub_on_node_1(target, work, how):
    """RabbitMQ: the hub talks to node 1 (MQTT and management API), the device is on node 2; the revoke or
    suspend cuts it there, and it can connect to no node afterwards (a suspended device again once resumed).
    Mosquitto: the same on its one port."""
    hub, nodes = target
    dev = enroll_device(hub, f"rmq-{how}", work / nodes_tag(nodes))
    with sessions(mqtt311(hub, dev, nodes[1 % len(nodes)]).connect()) as (s,):
        args = ["device", "revoke", dev.id, "--reason", "keyCompromise"] if how == "revoke" else \
            ["device", "suspend", dev.id]
        hub.cli_ok(*args)
        wait_cut(s, how)
    for port in nodes:
        assert not connects(hub, dev, port), f"{how}d device connected to the node on port {port}"
    if how == "suspend":
        hub.cli_ok("device", "resume", dev.id)
        assert connects(hub, dev, nodes[-1]), "a resumed device must connect at once"


def test_revoked_service_identity_is_cut_off(target, work):
    hub, nodes = target
    svc = add_identity(hub, "rmq-reader", "telemetry-reader", work / nodes_tag(nodes))
    with sessions(mqtt311(hub, svc, nodes[-1]).connect()) as (s,):
        hub.cli_ok("identity", "revoke", "rmq-reader")
        wait_cut(s, "identity revoke")
    assert not any(connects(hub, svc, p) for p in nodes)


def test_role_change_cuts_the_sessions_holding_it(rh, work):
    """`role set` narrows a role: RabbitMQ keeps a session's topic rights, so the driver closes every session
    (sessions opened just before the change too: a second pass once the management API lists them, ROLE_RECHECK);
    after reconnecting the narrowed right is refused."""
    from hub.broker.rabbitmq import ROLE_RECHECK

    hub, cluster = rh
    hub.cli_ok("role", "set", "rmq-role", "--rule", "subscribe:devices/+/status", "--rule",
               "receive:devices/+/status", "--rule", "subscribe:devices/+/events", "--rule",
               "receive:devices/+/events")
    svc = add_identity(hub, "rmq-roled", "rmq-role", work)
    port = cluster.nodes[1].mqtt_port
    with sessions(mqtt311(hub, svc, port).connect()) as (s,):
        assert s.subscribe("devices/+/events") == 1
        hub.cli_ok("role", "set", "rmq-role", "--rule", "subscribe:devices/+/status", "--rule",
                   "receive:devices/+/status")
        assert s.disconnected.wait(ROLE_RECHECK + CUT_TIMEOUT), "the session kept the role's old rights"
    with sessions(mqtt311(hub, svc, port).connect()) as (s,):
        assert s.subscribe("devices/+/status") == 1
        with pytest.raises(TimeoutError, match="connection closed"):
            s.subscribe("devices/+/events")


def test_superseded_certificate_is_refused_after_its_grace(target, work):
    """A renewal supersedes the old certificate: it still connects during the grace ([mqtt]
    supersede_grace_seconds of both hubs), then it is refused (RabbitMQ: by the listener's CRL) and its session
    is cut; the new certificate keeps working."""
    from tests.integration.test_broker_connect import renew_device, superseded_until

    hub, nodes = target
    dev = enroll_device(hub, "rmq-old", work / nodes_tag(nodes))
    new = renew_device(hub, dev, work / nodes_tag(nodes))
    grace_until = superseded_until(hub, dev)
    port = nodes[1 % len(nodes)]
    assert connects(hub, dev, port), "the superseded certificate must work during its grace"
    with sessions(mqtt311(hub, dev, port).connect()) as (old,):
        while dt.datetime.now(dt.timezone.utc) < grace_until + dt.timedelta(milliseconds=100):
            time.sleep(0.05)
        wait_cut(old, "grace over")
    assert not any(connects(hub, dev, p) for p in nodes), "a superseded certificate after its grace"
    assert connects(hub, new, port)


def test_sync_reports_the_kicks(rh, work):
    """The admin socket's authz sync goes through the driver: it answers with the seq it applied."""
    hub, cluster = rh
    answer = admin_call(hub, {"op": "authz_sync"})
    assert answer.get("ok", True), answer
