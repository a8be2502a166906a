"""`tessera-hub broker render --node NAME:AMQP:DIST:MQTT:MGMT[:HOST]`: the listen address of a node's listeners.

HOST (an IP address, IPv6 with or without brackets, or an RFC 1123 host name; default 127.0.0.1) is where the
node's AMQP, MQTT and management listeners are bound; the auth back end stays the hub's loopback listener. A bad
HOST is one line on stderr, and nothing else can reach rabbitmq.conf through it (no newline, no '=' ...).
"""

from __future__ import annotations

import pytest

from tests.integration.hubfixtures import init_hub

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    hub = init_hub(tmp_path_factory.mktemp("render-host"))
    hub.configure(auth_port=9124)
    return hub


@pytest.mark.parametrize("given, host, shown", [
    ("r1:5001:5002:5003:5004", "127.0.0.1", "127.0.0.1"),
    ("r1:5001:5002:5003:5004:10.1.2.3", "10.1.2.3", "10.1.2.3"),
    ("r1:5001:5002:5003:5004:rabbit-1.example.com", "rabbit-1.example.com", "rabbit-1.example.com"),
    ("r1:5001:5002:5003:5004:::1", "::1", "[::1]"),
    ("r1:5001:5002:5003:5004:[fd00::7]", "fd00::7", "[fd00::7]"),
])
def test_node_host_binds_the_listeners(hub, tmp_path, given, host, shown):
    said = hub.cli_ok("broker", "render", "--out", str(tmp_path / "nodes"), "--node", given)
    assert f"MQTT {shown}:5003, management http://{shown}:5004" in said, said
    conf = (tmp_path / "nodes" / "r1" / "rabbitmq.conf").read_text()
    for line in (f"listeners.tcp.default = {host}:5001", f"mqtt.listeners.ssl.default = {host}:5003",
                 f"management.tcp.ip = {host}", "auth_http.user_path = http://127.0.0.1:9124/"):
        assert line in conf, (line, conf)


@pytest.mark.parametrize("host", ["", "300.1.2.3", "bad_name", "-lead.example", "a..b", "x\nauth_backends.2 = internal",
                                  "h=1", "[nothost]", "a" * 64, "::g"])
def test_a_bad_node_host_is_one_line(hub, tmp_path, host):
    proc = hub.cli("broker", "render", "--out", str(tmp_path / "x"), "--node", f"r1:5001:5002:5003:5004:{host}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "HOST" in lines[0], (host, proc.stderr)
    assert not (tmp_path / "x").exists(), "files were written for a refused node"


def test_the_config_refuses_a_bad_host_too():
    """rabbitmq.conf is never written with an unchecked address (the Node dataclass takes any string)."""
    from hub.broker.rabbitmq.config import ClusterTls, Node, rabbitmq_conf

    tls = ClusterTls(*(["/x"] * 4))
    with pytest.raises(ValueError, match="listen address"):
        rabbitmq_conf(Node("r1", 1, 2, 3, 4, host="127.0.0.1\nloopback_users = guest"), tls, "http://127.0.0.1:1/s")


def test_a_node_rendered_with_an_ipv6_host_listens_there_only(tmp_path):
    """A real node started from `broker render --node ...:::1` files: its MQTT (TLS), AMQP and management listeners
    answer on [::1] and nothing of it listens on 127.0.0.1 (cuttlefish takes `::1:PORT`)."""
    import socket
    import ssl
    import urllib.error
    import urllib.request

    from tests.integration.rabbitfixtures import RabbitCluster, require_rabbitmq

    require_rabbitmq()
    hub = init_hub(tmp_path / "h")
    hub.configure(auth_port=9125)
    cluster = RabbitCluster(tmp_path, 1, host="::1")
    n = cluster.nodes[0]

    def render(out, nodes):
        hub.cli_ok("broker", "render", "--out", str(out), "--node",
                   f"{n.name}:{n.amqp_port}:{n.dist_port}:{n.mqtt_port}:{n.mgmt_port}:[::1]")
    try:
        cluster.start(render)  # returns once MQTT, management and AMQP accept on [::1]
        ctx = ssl.create_default_context(cafile=str(hub.dir / "ca" / "root.pem"))
        ctx.check_hostname = False
        with socket.create_connection(("::1", n.mqtt_port), timeout=5) as raw:
            with ctx.wrap_socket(raw) as tls:  # the listener's TLS with the hub's server certificate
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(f"http://[::1]:{n.mgmt_port}/api/overview", timeout=5)
        assert exc.value.code == 401  # the management API, asking for a login
        for port in (n.mqtt_port, n.amqp_port, n.mgmt_port):
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        cluster.stop()
