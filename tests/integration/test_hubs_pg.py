"""Two `tessera-hub serve` processes on one PostgreSQL registry and a 3-node RabbitMQ cluster: one fleet, either hub.

Hub A is a fresh fleet whose fleet.toml names the session's PostgreSQL server (a database of its own) and a 3-node
RabbitMQ cluster (rabbitfixtures; the session's 3-node cluster and its SQLite hub are not touched); hub B is made
with `tessera-hub init --join <A's directory>` (the same CAs, TLS files, audit key, broker secrets and [registry]).
Each hub serves the nodes beside it, as on separate machines: A renders r1 (its auth back end A's loopback listener,
its CRL directory A's), B renders r2 and r3. Then: each node's files name its own hub and all make one cluster;
single-use tokens tried at both hubs at once are spent once (one certificate each, the other answer a refusal) and
the shared audit chain verifies; a device enrolled at A is cut by a revoke issued to B; B's fleet API lists A's
devices; a hub of another fleet, or with another audit key, is refused by serve on that registry; and no hub is a
single point: with A killed, r2 and r3 admit, r1 refuses, sessions up stay up (a publish on a new topic through r1
closes its session: r1 cannot ask its back end), a revoke at B cuts a session on r1, and A restarted makes r1
admit again.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import paho.mqtt.client as mqtt
import pytest

from tests.helpers import free_port
from tests.integration.brokerfixtures import (BROKER_LIMITS, MqttSession, admitted, enroll_device,
                                              sessions, wait_ready)
from tests.integration.hubfixtures import Hub, enroll, init_hub, make_csr, new_key, one_line, run_cli
from tests.integration.pgfixtures import pg_server  # noqa: F401
from tests.integration.rabbitfixtures import RabbitCluster, render_with_driver, require_rabbitmq

pytestmark = pytest.mark.integration

DEVICES = 8  # tokens raced at both hubs
NODES = 3  # r1: hub A's node, r2 and r3: hub B's
CUT_TIMEOUT = 10.0  # a generous bound for the kick (revoke -> cut is measured in bench/)


def registry_query(hub: Hub, sql: str) -> list[dict]:
    """Rows from the shared registry (read in this process: a Registry over fleet.toml's URL)."""
    from hub.config import load_config

    registry = load_config(hub.dir).open_registry()
    try:
        return registry.query(sql)
    finally:
        registry.close()


def stop_hub(hub: Hub) -> None:
    try:
        rc = hub.stop()
    finally:
        hub.kill()
    assert rc == 0, f"serve exited {rc}:\n{hub.stderr_path.read_text(errors='replace')}"


@pytest.fixture(scope="module")
def pg_url(pg_server):  # noqa: F811
    name = pg_server.create_database()
    yield pg_server.url(name)
    pg_server.drop_database(name)


def render_per_node(renders: dict[str, object]):
    """One render callable for the cluster that hands each node to its own hub's driver (renders[node name])."""
    def render(out: Path, nodes):
        dirs = []
        for fn in dict.fromkeys(renders[n.name] for n in nodes):  # each hub once, with its nodes in order
            dirs += fn(out, [n for n in nodes if renders[n.name] is fn])
        return dirs
    return render


@contextlib.contextmanager
def colocated_hubs(base: Path, pg_url: str, nodes: int = NODES) -> Iterator[tuple[Hub, Hub, RabbitCluster]]:
    """(hub A, hub B, cluster): both serving on the one registry; a `nodes`-node cluster whose node r1 is hub A's
    (its auth back end A's loopback listener, its CRL directory A's) and the others are hub B's: the machine layout
    where each hub serves the nodes beside it. Each hub's own MQTT session goes through one of its own nodes.
    On exit the hubs still running are stopped (exit 0 checked) and the cluster is removed."""
    require_rabbitmq()
    cluster = RabbitCluster(base / "rabbit", nodes)
    a = init_hub(base / "a", **BROKER_LIMITS)
    a.configure(kind="rabbitmq", auth_port=free_port(),
                management_urls=[f"http://{n.host}:{n.mgmt_port}" for n in cluster.nodes], url=pg_url)
    a.broker_port = cluster.nodes[0].mqtt_port
    render_with_driver(a)(base / "a-first", cluster.nodes[:1])  # A's driver makes the broker secrets the join copies
    (base / "b").mkdir()
    b = Hub(dir=base / "b" / "hub", broker_port=cluster.nodes[1].mqtt_port)
    proc = run_cli("init", "--join", str(a.dir), "--dir", str(b.dir))
    assert proc.returncode == 0, proc.stderr
    b.configure(auth_port=free_port())  # same machine here: its own auth listener (the nodes of B call B's)
    started: list[Hub] = []
    try:
        cluster.start(render_per_node({n.name: render_with_driver(a if i == 0 else b) for i, n in enumerate(cluster.nodes)}))
        for hub in (a, b):
            hub.start()
            started.append(hub)
            wait_ready(hub)
        yield a, b, cluster
    finally:
        try:
            for hub in reversed(started):
                if hub.proc is not None and hub.proc.poll() is None:
                    stop_hub(hub)
        finally:
            for hub in (a, b):
                hub.kill()
            cluster.stop()


@pytest.fixture(scope="module")
def hubs(tmp_path_factory, pg_url):
    """colocated_hubs: r1 hub A's, r2 and r3 hub B's."""
    with colocated_hubs(tmp_path_factory.mktemp("hubs-pg"), pg_url) as trio:
        yield trio


def test_join_copies_the_fleet_and_keeps_secrets_private(hubs):
    a, b, _ = hubs
    for name in ("ca/root.pem", "ca/device-ca.key", "tls/est.pem", "tls/admin.key", "audit.key",
                 "broker/rabbitmq/auth.secret", "broker/rabbitmq/mgmt.secret"):
        assert (b.dir / name).read_bytes() == (a.dir / name).read_bytes(), name
    for path in [*b.dir.glob("*/*.key"), *b.dir.glob("broker/rabbitmq/*.secret"), b.dir / "audit.key",
                 b.dir / "fleet.toml"]:
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
    fleet_a, fleet_b = (tomllib.loads((h.dir / "fleet.toml").read_text()) for h in (a, b))
    for fleet in (fleet_a, fleet_b):
        fleet["broker"].pop("auth_port")  # each hub its own listener (the fixture set B's after the join)
    assert fleet_b == fleet_a


def test_each_hub_keeps_its_own_mqtt_session(hubs):
    """Both hubs hold the hub's admin certificate; B's session has a client id of its own (hub-id, written by
    --join), so neither takes the other's over (the same client id made them flap several times a second)."""
    a, b, _ = hubs
    assert not (a.dir / "hub-id").exists()
    hub_id = (b.dir / "hub-id").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{8}", hub_id), hub_id
    marks = [h.stderr_path.stat().st_size for h in (a, b)]
    time.sleep(3)
    for hub, mark in zip((a, b), marks):
        with open(hub.stderr_path, errors="replace") as fh:
            fh.seek(mark)
            lost = [line for line in fh if "admin connection lost" in line]
        assert not lost, f"{hub.dir}: the hub's MQTT session keeps being taken over: {lost[:3]}"


def test_each_node_is_rendered_by_the_hub_beside_it(hubs):
    """r1's files name hub A's auth listener and CRL directory, r2's and r3's hub B's; the same auth secret and TLS
    file contents in every node's files, so the three make one cluster."""
    a, b, cluster = hubs
    port = {h.dir: tomllib.loads((h.dir / "fleet.toml").read_text())["broker"]["auth_port"] for h in (a, b)}
    secret = (a.dir / "broker" / "rabbitmq" / "auth.secret").read_text().strip()
    tls = {}
    for node, hub in zip(cluster.nodes, (a, b, b)):
        conf = (cluster.dir / node.name / "rabbitmq.conf").read_text()
        advanced = (cluster.dir / node.name / "advanced.config").read_text()
        assert f"auth_http.user_path = http://127.0.0.1:{port[hub.dir]}/{secret}/user" in conf
        assert f'{{dir, "{hub.dir / "broker" / "rabbitmq" / "crl"}"}}' in advanced, advanced
        files = dict(re.findall(r'\{(cacertfile|certfile|keyfile), "([^"]+)"\}', advanced))
        assert all(Path(f).is_relative_to(hub.dir) for f in files.values()), files
        tls[node.name] = {k: Path(f).read_bytes() for k, f in files.items()}
    assert tls["r1"] == tls["r2"] == tls["r3"] and len(tls["r1"]) == 3
    assert port[a.dir] != port[b.dir]


def test_each_token_is_spent_once_across_both_hubs(hubs):
    a, b, _ = hubs
    ids = [f"race-{i}" for i in range(DEVICES)]
    tokens = {d: (a if i % 2 else b).add_device(d) for i, d in enumerate(ids)}
    csrs = {d: make_csr(new_key(), d) for d in ids}
    with ThreadPoolExecutor(2 * DEVICES) as pool:
        futures = {(d, hub.dir.parent.name): pool.submit(enroll, hub, d, tokens[d], csrs[d])
                   for d in ids for hub in (a, b)}
        answers = {k: f.result() for k, f in futures.items()}
    for d in ids:
        statuses = sorted(answers[(d, h)].status for h in ("a", "b"))
        assert statuses[0] == 200 and statuses[1] in (401, 403), f"{d}: {statuses} (one certificate, one refusal)"
        refused = next(answers[(d, h)] for h in ("a", "b") if answers[(d, h)].status != 200)
        assert refused.body, f"{d}: the refusal says nothing"
    listed = a.device_list()
    for d in ids:
        assert listed[d]["status"] == "active", listed[d]
    counts = {r["device_id"]: r["n"] for r in registry_query(
        a, "SELECT device_id, COUNT(*) AS n FROM certificates WHERE device_id LIKE 'race-%' GROUP BY device_id")}
    assert counts == {d: 1 for d in ids}, counts
    proc = b.cli("audit", "verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_revoke_at_hub_b_cuts_a_device_enrolled_at_hub_a(hubs, tmp_path):
    a, b, cluster = hubs
    dev = enroll_device(a, "cut-me", tmp_path)
    s = MqttSession(a, dev.chain, dev.key, dev.id, port=cluster.nodes[0].mqtt_port, protocol=mqtt.MQTTv311)
    with sessions(s.connect()):
        b.cli_ok("device", "revoke", dev.id, "--reason", "keyCompromise")
        assert s.disconnected.wait(CUT_TIMEOUT), "the revoke at hub B did not cut the session held via hub A"
    assert a.show(dev.id)["device"]["status"] == "revoked"


def test_hub_b_api_lists_devices_enrolled_at_hub_a(hubs, tmp_path):
    a, b, _ = hubs
    enroll_device(a, "seen-from-b", tmp_path)
    row = b.device_list()["seen-from-b"]
    assert row["status"] == "active", row


def _serve_refused(hub_dir: Path) -> str:
    proc = run_cli("serve", "--dir", str(hub_dir), "--est-port", str(free_port()), "--crl-port", "0",
                   "--api-port", str(free_port()), timeout=60)
    assert proc.returncode != 0, proc.stdout
    return one_line(proc.stderr)


def test_serve_refuses_a_hub_of_another_fleet_or_audit_key(hubs, tmp_path, pg_url):
    a, _, _ = hubs
    other = init_hub(tmp_path / "other")
    other.configure(kind="rabbitmq", auth_port=free_port(), management_urls=[f"http://127.0.0.1:{free_port()}"],
                    url=pg_url)
    assert "with another root CA" in _serve_refused(other.dir)  # same name, its own CA and audit key
    shutil.rmtree(other.dir / "ca")
    shutil.copytree(a.dir / "ca", other.dir / "ca")  # the fleet's CA, its own audit key
    assert "with another audit key" in _serve_refused(other.dir)
    text = (other.dir / "fleet.toml").read_text()
    (other.dir / "fleet.toml").write_text(text.replace('name = "acme"', 'name = "other"', 1))
    assert "belongs to fleet 'acme', not 'other'" in _serve_refused(other.dir)
    assert a.device_list(), "hub A still serves"


def test_join_refuses_a_hub_without_its_broker_secrets(tmp_path, pg_url):
    """The RabbitMQ secrets are made at the first hub's first serve (or render); a hub joined before that would
    make its own management password, which the first hub's nodes do not know."""
    src = init_hub(tmp_path / "fresh")
    src.configure(kind="rabbitmq", auth_port=free_port(), management_urls=[f"http://127.0.0.1:{free_port()}"],
                  url=pg_url)
    proc = run_cli("init", "--join", str(src.dir), "--dir", str(tmp_path / "second"))
    assert proc.returncode != 0 and "serve it once first" in one_line(proc.stderr), proc.stderr
    assert not (tmp_path / "second").exists()


def test_join_refuses_a_sqlite_hub(tmp_path):
    src = init_hub(tmp_path / "sqlite")
    proc = run_cli("init", "--join", str(src.dir), "--dir", str(tmp_path / "second"))
    assert proc.returncode != 0 and "needs a shared PostgreSQL registry" in one_line(proc.stderr), proc.stderr
    assert not (tmp_path / "second").exists()


def connects(hub: Hub, dev, port: int) -> bool:
    return admitted(MqttSession(hub, dev.chain, dev.key, dev.id, port=port, protocol=mqtt.MQTTv311))


def crl_serials(hub: Hub) -> set[int]:
    from cryptography import x509

    return {r.serial_number for p in (hub.dir / "broker" / "rabbitmq" / "crl").glob("*.r0")
            for r in x509.load_pem_x509_crl(p.read_bytes())}


def wait_for(what: str, check, timeout: float = CUT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)


def test_each_hub_serves_its_own_nodes_and_none_is_a_single_point(hubs, tmp_path):
    a, b, cluster = hubs
    r1, r2, r3 = (n.mqtt_port for n in cluster.nodes)
    ids = ("co-up1", "co-up2", "co-cut1", "co-cut2", "co-new")
    devs = {d: enroll_device(a if i % 2 else b, d, tmp_path) for i, d in enumerate(ids)}
    up1, cut1 = (MqttSession(a, devs[d].chain, devs[d].key, d, port=r1, protocol=mqtt.MQTTv311)
                 for d in ("co-up1", "co-cut1"))
    up2, cut2 = (MqttSession(b, devs[d].chain, devs[d].key, d, port=r2, protocol=mqtt.MQTTv311)
                 for d in ("co-up2", "co-cut2"))
    with sessions(up1.connect(), up2.connect(), cut1.connect(), cut2.connect()):
        assert up1.publish("devices/co-up1/telemetry", b"1", qos=1) == 0
        # a revoke issued to hub A cuts a session held through B's node r2, and both hubs' CRLs list it
        a.cli_ok("device", "revoke", "co-cut2", "--reason", "keyCompromise")
        assert cut2.disconnected.wait(CUT_TIMEOUT), "the revoke at hub A did not cut the session on B's node r2"
        serial = devs["co-cut2"].cert.serial_number
        for hub in (a, b):
            wait_for(f"{hub.dir.parent.name}'s CRL directory lists the revoked certificate",
                     lambda: serial in crl_serials(hub))
        a.kill()  # SIGKILL, a hub lost: r1's auth back end is gone, r2 and r3 still have B's
        try:
            assert connects(b, devs["co-new"], r2) and connects(b, devs["co-new"], r3), \
                "hub B's nodes stopped admitting when hub A stopped"
            assert not connects(b, devs["co-new"], r1), "r1 admitted a connect with its hub down (fail closed)"
            # a revoke issued to hub B cuts a session held through A's node r1 while A is down
            b.cli_ok("device", "revoke", "co-cut1", "--reason", "keyCompromise")
            assert cut1.disconnected.wait(CUT_TIMEOUT), "the revoke at hub B did not cut the session on r1"
            assert up1.connected and up2.connected, "a session already up dropped when hub A stopped"
            assert up2.publish("devices/co-up2/telemetry", b"2", qos=1) == 0, "B's node refused a publish"
            # a publish on a topic the session has not used yet makes r1 ask its (absent) back end: that fails
            # closed, and RabbitMQ closes the session (one on a topic it used may pass from the connection's cache)
            with pytest.raises(TimeoutError, match="connection closed"):
                up1.publish("devices/co-up1/events", b"2", qos=1)
        finally:
            a.proc = None
            a.start()
            wait_ready(a)  # later tests of the module find A serving again
    assert connects(a, devs["co-new"], r1), "r1 does not admit again once its hub is back"
    assert not connects(a, devs["co-cut1"], r1), "r1 admits a device revoked while its hub was down"
