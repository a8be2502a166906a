"""`tessera-hub broker ...`: the broker the hub drives; `render` writes a RabbitMQ cluster's node files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer

from hub.cli.util import DirOpt, config, fail, registry as open_registry, say

broker_app = typer.Typer(help="The broker: the configuration of a RabbitMQ cluster the hub drives.",
                         no_args_is_help=True)

_NODE_RE = re.compile(r"([a-z][a-z0-9-]{0,30}):(\d{1,5}):(\d{1,5}):(\d{1,5}):(\d{1,5})(?::(.*))?", re.DOTALL)
NODE_HELP = ("NAME:AMQP:DIST:MQTT:MGMT[:HOST], once per node of this hub's machine (HOST: the address of the node's "
             "AMQP, MQTT and management listeners, an IP address or host name, [..] for IPv6; default 127.0.0.1)")


def parse_node(text: str):
    """NAME:AMQP:DIST:MQTT:MGMT[:HOST]: a node on the hub's machine (its auth back end is this hub's loopback
    listener, its CRL directory this hub's broker/rabbitmq/crl); HOST defaults to 127.0.0.1."""
    from hub.broker.rabbitmq.config import Node, host_problem

    m = _NODE_RE.fullmatch(text)
    ports = [int(p) for p in m.groups()[1:5]] if m else []
    if not m or not all(0 < p < 65536 for p in ports) or len(set(ports)) != 4:
        fail(f"--node {text[:80]!r}: give NAME:AMQP:DIST:MQTT:MGMT[:HOST] (a-z name, four different ports)")
    host = m.group(6)
    if host is None:
        return Node(m.group(1), *ports)
    if host.startswith("[") and host.endswith("]") and ":" in host:
        host = host[1:-1]
    problem = host_problem(host)
    if problem:
        fail(f"--node {text[:80]!r}: HOST {host[:80]!r} is {problem}")
    return Node(m.group(1), *ports, host=host)


@broker_app.command("render")
def render(out_dir: Path = typer.Option(..., "--out", help="Directory for one sub-directory per node."),
           node: list[str] = typer.Option(..., "--node", help=NODE_HELP),
           directory: Optional[Path] = DirOpt) -> None:
    """Write each RabbitMQ node's rabbitmq.conf, advanced.config and enabled_plugins (0600) and the listener's
    CRLs, for fleet.toml's \\[broker] auth_port. Render only the nodes on this hub's machine: each names this
    hub's loopback auth listener and CRL directory (a joined hub renders its own machine's nodes). Start each node
    with RABBITMQ_CONFIG_FILE, RABBITMQ_ADVANCED_CONFIG_FILE and RABBITMQ_ENABLED_PLUGINS_FILE pointing there."""
    from hub.broker import BrokerError
    from hub.broker.rabbitmq import RabbitMQBroker
    from hub.broker.rabbitmq.config import url_host
    from hub.ca.authority import CaError, load_ca

    cfg = config(directory)
    nodes = [parse_node(n) for n in node]
    if len({n.name for n in nodes}) != len(nodes):
        fail("--node: every node needs its own name")
    registry = open_registry(cfg)  # one line if unreachable; a shared one must be this fleet's
    try:
        ca = load_ca(cfg.ca_dir, cfg.ca_token)
    except CaError as exc:
        fail(str(exc))
    try:
        driver = RabbitMQBroker.for_hub(cfg, registry, ca)
        dirs = driver.render(out_dir, nodes)
    except (BrokerError, OSError) as exc:
        fail(f"cannot render the node files: {exc}")
    finally:
        registry.close()
        ca.close()
    for n, d in zip(nodes, dirs):
        h = url_host(n.host)
        say(f"{n.nodename}: {d} (MQTT {h}:{n.mqtt_port}, management http://{h}:{n.mgmt_port})")
