"""A RabbitMQ cluster on loopback for the broker tests: N nodes (3 by default) of the installed rabbitmq-server.

Each node rN@localhost has its own AMQP, Erlang distribution, MQTT (TLS) and management ports, its own mnesia,
log and config directory under the test's tmp directory; the cluster has its own epmd (a child of this fixture on
its own port, so no system epmd is touched), its own Erlang cookie (a 0400 file in the cluster's HOME, never in
argv) and its own CLI distribution port range. The node files (rabbitmq.conf, advanced.config, enabled_plugins)
are rendered by the hub's driver (hub/broker/rabbitmq/config.py), not here. Nodes 2..N join node 1 with
`rabbitmqctl join_cluster`. `stop()` stops every node and epmd (by pid) and removes the directories.

Use:
    cluster = RabbitCluster(base, tls=ClusterTls(...), auth_base="http://127.0.0.1:<port>/<secret>", size=3)
    cluster.start()            # returns once every node runs and the cluster has all members
    cluster.nodes[i]           # hub.broker.rabbitmq.config.Node: .nodename, .mqtt_port, .mgmt_port, ...
    cluster.ctl(0, "list_connections", "user")   # rabbitmqctl against node 0 (CompletedProcess)
    cluster.stop_node(i); cluster.start_node(i)   # one node down and back (it rejoins by itself)
    cluster.stop()
`rabbit_cluster(base, ...)` is the same as a context manager. `require_rabbitmq()` skips (with the reason) where
rabbitmq-server is not installed. Cost: ~15-25 s for three nodes on 2 cores, so share one per module or session.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from hub.broker.rabbitmq.config import Node
from tests.helpers import free_port
from tests.integration.hubfixtures import Hub, init_hub

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")  # the scripts themselves: /usr/sbin's wrapper would su to rabbitmq
START_TIMEOUT = 90.0
#: [mqtt] supersede_grace_seconds of the session hub (short: the superseded case waits it out)
SESSION_GRACE = 3


def rabbitmq_missing() -> str | None:
    """Why the cluster cannot run here (None: it can)."""
    if not (RABBIT_BIN / "rabbitmq-server").exists():
        return "rabbitmq-server is not installed (./dev.sh setup installs it)"
    if shutil.which("epmd") is None and not Path("/usr/lib/erlang/bin/epmd").exists():
        return "epmd (erlang) is not installed"
    return None


def require_rabbitmq() -> None:
    reason = rabbitmq_missing()
    if reason:
        pytest.skip(reason)


def _epmd() -> str:
    return shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"


def _port_block(n: int) -> int:
    """The first of n consecutive ports that are all free right now (for the CLI's distribution port range)."""
    for _ in range(50):
        base = free_port()
        if base + n > 65535:
            continue
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no block of free ports")


class RabbitCluster:
    def __init__(self, base: Path, size: int = 3, host: str = "127.0.0.1"):
        """`host`: the address of every node's AMQP, MQTT and management listeners (Node.host)."""
        self.dir = Path(base) / "rabbit"
        self.size = size
        self.ctl_ports = _port_block(10)  # first, so that no node port falls into the CLI's range
        taken = set(range(self.ctl_ports, self.ctl_ports + 10))

        def port() -> int:
            p = free_port()
            while p in taken:
                p = free_port()
            taken.add(p)
            return p
        self.nodes = [Node(f"r{i + 1}", port(), port(), port(), port(), host=host) for i in range(size)]
        self.epmd_port = port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.epmd: subprocess.Popen | None = None

    # --- environment ------------------------------------------------------------------------------------------
    def node_dir(self, node: Node) -> Path:
        return self.dir / node.name

    def env(self, node: Node | None = None) -> dict[str, str]:
        keep = ("PATH", "LANG", "LC_ALL")
        env = {k: os.environ[k] for k in keep if k in os.environ}
        env.update(HOME=str(self.dir), ERL_EPMD_PORT=str(self.epmd_port), ERL_EPMD_ADDRESS="127.0.0.1",
                   LC_ALL="C.UTF-8",
                   RABBITMQ_CONF_ENV_FILE=str(self.dir / "rabbitmq-env.conf"),
                   RABBITMQ_CTL_DIST_PORT_MIN=str(self.ctl_ports),
                   RABBITMQ_CTL_DIST_PORT_MAX=str(self.ctl_ports + 9))
        if node is not None:
            d = self.node_dir(node)
            env.update(RABBITMQ_NODENAME=node.nodename, RABBITMQ_NODE_IP_ADDRESS=node.host,
                       RABBITMQ_NODE_PORT=str(node.amqp_port), RABBITMQ_DIST_PORT=str(node.dist_port),
                       RABBITMQ_MNESIA_BASE=str(d / "mnesia"), RABBITMQ_LOG_BASE=str(d / "log"),
                       RABBITMQ_CONFIG_FILE=str(d / "rabbitmq.conf"),
                       RABBITMQ_ADVANCED_CONFIG_FILE=str(d / "advanced.config"),
                       RABBITMQ_ENABLED_PLUGINS_FILE=str(d / "enabled_plugins"),
                       RABBITMQ_PID_FILE=str(d / "rabbit.pid"),
                       # distribution on loopback only (the port is RABBITMQ_DIST_PORT)
                       RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}")
        return env

    def ctl(self, i: int, *args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
        """`rabbitmqctl -n <node i> args...`; with check, a failure raises with its output."""
        node = self.nodes[i]
        proc = subprocess.run([str(RABBIT_BIN / "rabbitmqctl"), "-n", node.nodename, *args], env=self.env(node),
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"rabbitmqctl -n {node.nodename} {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stdout}\n{proc.stderr}\n{self.log_tail(node)}")
        return proc

    def log_tail(self, node: Node, n: int = 4000) -> str:
        logs = sorted((self.node_dir(node) / "log").glob("*.log"))
        out = self.node_dir(node) / "stdout.log"
        return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-n:]}" for p in [*logs, out] if p.exists())

    # --- lifecycle --------------------------------------------------------------------------------------------
    def write_files(self, render: Callable[[Path, list[Node]], object]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.dir / "rabbitmq-env.conf").write_text("")
        cookie = self.dir / ".erlang.cookie"
        if not cookie.exists():
            fd = os.open(cookie, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "w") as fh:
                fh.write(os.urandom(20).hex().upper())
        render(self.dir, self.nodes)  # the driver writes <dir>/<node name>/{rabbitmq.conf,advanced.config,...}

    def start(self, render: Callable[[Path, list[Node]], object]) -> None:
        """Render the node files (`render(directory, nodes)`: the hub's driver), start every node, form the
        cluster; returns once all members run."""
        self.write_files(render)
        self.epmd = subprocess.Popen([_epmd(), "-port", str(self.epmd_port)], env=self.env(),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        with ThreadPoolExecutor(self.size) as pool:
            list(pool.map(self._start_node, self.nodes))
        first, others = self.nodes[0].nodename, range(1, self.size)
        with ThreadPoolExecutor(self.size) as pool:  # stop_app takes seconds: the joining nodes at once
            list(pool.map(lambda i: self.ctl(i, "stop_app"), others))
        for i in others:  # one join and restart at a time (concurrent ones race on the cluster's schema)
            self.ctl(i, "join_cluster", first)
            self.ctl(i, "start_app")
            self._wait_listening(self.nodes[i])
        members = self.running_nodes()
        assert sorted(members) == sorted(n.nodename for n in self.nodes), members

    def _start_node(self, node: Node) -> None:
        d = self.node_dir(node)
        out = open(d / "stdout.log", "wb")
        self.procs[node.name] = subprocess.Popen([str(RABBIT_BIN / "rabbitmq-server")], env=self.env(node),
                                                 stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                 start_new_session=True)
        out.close()
        self._wait_listening(node)

    def _wait_listening(self, node: Node) -> None:
        """Until the node's AMQP, MQTT and management listeners accept TCP (they open once its boot, plugins
        included, is done): no CLI call, each of which boots an Erlang VM of its own."""
        deadline = time.monotonic() + START_TIMEOUT
        for port in (node.mqtt_port, node.mgmt_port, node.amqp_port):
            while True:
                proc = self.procs[node.name]
                if proc.poll() is not None:
                    raise AssertionError(f"{node.nodename} exited {proc.returncode}:\n{self.log_tail(node)}")
                try:
                    socket.create_connection((node.host, port), timeout=1).close()
                    break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"{node.nodename} not listening on {port} within {START_TIMEOUT} s:\n"
                                         f"{self.log_tail(node)}")
                time.sleep(0.1)

    def running_nodes(self, i: int = 0) -> list[str]:
        """The running members of the cluster, as node i sees them."""
        proc = self.ctl(i, "eval", "rabbit_nodes:all_running().")
        return re.findall(r"[\w-]+@localhost", proc.stdout)

    def stop_node(self, i: int, timeout: float = 30.0) -> None:
        """Stop node i's Erlang VM (SIGTERM to its process group, by pid: the node's own shutdown)."""
        node = self.nodes[i]
        proc = self.procs.pop(node.name, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def start_node(self, i: int, timeout: float = START_TIMEOUT) -> None:
        """Start node i again after stop_node(i): its mnesia remembers the cluster, so it rejoins by itself; returns
        once it listens and node 1 sees every member running."""
        node = self.nodes[i]
        if node.name in self.procs:
            return
        self._start_node(node)
        wanted, deadline = sorted(n.nodename for n in self.nodes), time.monotonic() + timeout
        while sorted(self.running_nodes()) != wanted:
            if time.monotonic() > deadline:
                raise AssertionError(f"{node.nodename} did not rejoin within {timeout} s:\n{self.log_tail(node)}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Every node killed (SIGKILL to its process group: the cluster's data is thrown away, and a graceful
        stop costs seconds), epmd stopped, the directory removed."""
        try:
            for proc in self.procs.values():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            for proc in self.procs.values():
                proc.wait(10)
            self.procs.clear()
        finally:
            if self.epmd is not None:
                self.epmd.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.epmd.wait(5)
                if self.epmd.poll() is None:
                    self.epmd.kill()
                self.epmd = None
            shutil.rmtree(self.dir, ignore_errors=True)


def render_with_driver(hub: Hub) -> Callable[[Path, list[Node]], list[Path]]:
    """The node files as the hub's RabbitMQ driver renders them for this hub directory (its secrets, CRLs, TLS),
    over the registry its fleet.toml names (SQLite or PostgreSQL)."""
    from hub.broker.rabbitmq import RabbitMQBroker
    from hub.ca.authority import load_ca
    from hub.config import load_config

    def render(out: Path, nodes: list[Node]) -> list[Path]:
        cfg = load_config(hub.dir)
        registry, ca = cfg.open_registry(), load_ca(cfg.ca_dir)
        try:
            driver = RabbitMQBroker.for_hub(cfg, registry, ca)
            return driver.render(out, nodes)
        finally:
            registry.close()
            ca.close()
    return render


@contextlib.contextmanager
def rabbit_hub(base: Path, size: int = 3, **settings: Any) -> Iterator[tuple[Hub, RabbitCluster]]:
    """A hub whose fleet.toml says `[broker] kind = "rabbitmq"`, pointed at a fresh `size`-node cluster whose
    files its driver rendered; serve runs with --mqtt-port = node 1's MQTT port. Yields (hub, cluster) once
    "hub ready"; on exit the hub stops (exit 0) and the cluster is stopped and removed. Skips without RabbitMQ."""
    from tests.integration.brokerfixtures import BROKER_LIMITS, wait_ready

    require_rabbitmq()
    cluster = RabbitCluster(base, size)
    hub = init_hub(base, **{**BROKER_LIMITS, **settings})
    hub.configure(kind="rabbitmq", auth_port=free_port(),
                  management_urls=[f"http://{n.host}:{n.mgmt_port}" for n in cluster.nodes])
    hub.broker_port = cluster.nodes[0].mqtt_port
    started = False
    try:
        cluster.start(render_with_driver(hub))
        hub.start()
        started = True
        wait_ready(hub)
        yield hub, cluster
    finally:
        try:
            if started:
                rc = hub.stop()
                assert rc == 0, f"serve exited {rc}:\n{hub.stderr_path.read_text(errors='replace')}"
        finally:
            hub.kill()
            cluster.stop()


_shared: dict[str, tuple[Hub, RabbitCluster]] = {}


@pytest.fixture(scope="session")
def rabbit_cluster_hub(request, tmp_path_factory) -> tuple[Hub, RabbitCluster]:
    """One 3-node cluster and its hub for the whole session (every module importing this fixture gets the same
    pair; tests use distinct device ids). Yields (hub, cluster)."""
    if "3" not in _shared:
        cm = rabbit_hub(tmp_path_factory.mktemp("rabbit-hub"), supersede_grace_seconds=SESSION_GRACE)
        _shared["3"] = cm.__enter__()

        def close() -> None:
            _shared.pop("3", None)
            cm.__exit__(None, None, None)
        request.addfinalizer(close)  # session scope: at the end of the session
    return _shared["3"]
