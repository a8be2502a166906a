"""What only a RabbitMQ cluster has: a hub on node 1 cutting a session on node 2, a node down and back, the
management user, the driver's sync. The broker-neutral cases (who connects, impostors, TLS refusals, revoked / suspended / superseded,
confinement, role change) run on both brokers in test_broker_connect.py, test_broker_revoke.py and
test_broker_authz_table.py (brokerkinds.py: the `broker_kind` params, each refusal in the broker's own terms).

One hub (`[broker] kind = "rabbitmq"`, talking MQTT and the management API to node 1) and one 3-node cluster for
the session (rabbitfixtures.rabbit_cluster_hub). Clients are paho MQTT 3.1.1 sessions (brokerfixtures.MqttSession
with protocol MQTTv311) on any node. What RabbitMQ does with a refusal: a CONNACK 5 (not authorized) or 4 (bad
user name or password) or a closed connection at connect; a closed connection for a refused PUBLISH (3.1.1 has
no negative PUBACK) and for a refused SUBSCRIBE.
"""

from __future__ import annotations

import pytest

from tests.integration.brokerfixtures import admin_call, enroll_device, sessions
from tests.integration.brokerkinds import Target
from tests.integration.rabbitfixtures import rabbit_cluster_hub  # noqa: F401  (the session's hub)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def rh(rabbit_cluster_hub):  # noqa: F811
    return rabbit_cluster_hub


@pytest.fixture
def cluster_target(rh) -> Target:
    """The cluster hub as a Target that starts on node 1 (the hub's): port(1) is node 2, port(2) node 3."""
    hub, cluster = rh
    ports = tuple(n.mqtt_port for n in cluster.nodes)
    assert hub.mqtt_port == ports[0], "the hub must talk to node 1"
    return Target("rabbitmq", hub, ports, cluster, base=0)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("rabbit-creds")


def test_the_management_user_cannot_use_mqtt_even_with_its_secret(cluster_target, work):
    from hub.broker.rabbitmq.auth import MGMT_USER

    t = cluster_target
    dev = enroll_device(t.hub, "rmq-mgmt", work)
    path = t.hub.dir / "broker" / "rabbitmq" / "mgmt.secret"
    secret = path.read_text().strip()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert not t.connects(dev, 1, client_id=MGMT_USER, credentials=(MGMT_USER, secret))
    assert t.connects(dev, 1), "control: the device itself connects"


@pytest.mark.parametrize("how", ["revoke", "suspend"])
def test_status_change_cuts_a_session_on_node_2_through_the_hub_on_node_1(cluster_target, work, how):
    """The hub talks to node 1 (MQTT and management API), the device is on node 2; the revoke or suspend cuts it
    there, and it can connect to no node afterwards (a suspended device again once resumed)."""
    t = cluster_target
    dev = enroll_device(t.hub, f"rmq-{how}", work)
    mark = t.mark()
    with sessions(t.session(dev, 1)) as (s,):
        args = ["device", "revoke", dev.id, "--reason", "keyCompromise"] if how == "revoke" else \
            ["device", "suspend", dev.id]
        t.hub.cli_ok(*args)
        t.assert_cut(s, how)
    t.wait_kicked(mark, dev.id)
    t.assert_refused(dev, "revoked" if how == "revoke" else "suspended", in_crl=True)
    if how == "suspend":
        t.hub.cli_ok("device", "resume", dev.id)
        assert t.connects(dev, 2), "a resumed device must connect at once (node 3)"


def test_sync_reports_the_kicks(rh):
    """The admin socket's authz sync goes through the driver: it answers with the seq it applied."""
    hub, cluster = rh
    answer = admin_call(hub, {"op": "authz_sync"})
    assert answer.get("ok", True), answer
    assert answer["seq"] > 0, answer


def test_with_a_node_down_the_others_admit_and_cut_and_it_comes_back_enforcing(cluster_target, work):
    """Node 3 stops: its sessions end; nodes 1 and 2 still admit, and a revoke through the hub (on node 1) still
    cuts a session on node 2. Once node 3 is back (it rejoins by itself), the device revoked while it was down is
    refused there too and a good one admitted. Last in the module: the other modules need all three nodes."""
    t = cluster_target
    good, victim = enroll_device(t.hub, "rmq-nd-good", work), enroll_device(t.hub, "rmq-nd-victim", work)
    try:
        with sessions(t.session(good, 2)) as (on3,):
            t.cluster.stop_node(2)
            assert on3.disconnected.wait(30), "node 3 stopped and its session lives on"
        assert t.connects(good, 0) and t.connects(good, 1), "nodes 1 and 2 refused a good device"
        with sessions(t.session(victim, 1)) as (s,):
            t.hub.cli_ok("device", "revoke", victim.id, "--reason", "keyCompromise")
            t.assert_cut(s, "revoke with node 3 down")
        assert not t.connects(victim, 0) and not t.connects(victim, 1)
    finally:
        t.cluster.start_node(2)
    assert t.connects(good, 2), "node 3 came back and refuses a good device"
    assert not t.connects(victim, 2), "node 3 came back and admits the device revoked while it was down"
