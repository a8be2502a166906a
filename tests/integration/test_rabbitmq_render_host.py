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
