"""Two `tessera-hub serve` processes on one PostgreSQL registry and one RabbitMQ node: one fleet, either hub.

Hub A is a fresh fleet whose fleet.toml names the session's PostgreSQL server (a database of its own) and a 1-node
RabbitMQ cluster (rabbitfixtures; the session's 3-node cluster and its SQLite hub are not touched); hub B is made
with `tessera-hub init --join <A's directory>` (the same CAs, TLS files, audit key, broker secrets and [registry]).
Then: single-use tokens tried at both hubs at once are spent once (one certificate each, the other answer a
refusal) and the shared audit chain verifies; a device enrolled at A is cut by a revoke issued to B; B's fleet API
lists A's devices; a hub of another fleet, or with another audit key, is refused by serve on that registry.
"""

from __future__ import annotations

import shutil
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from tests.helpers import free_port
from tests.integration.brokerfixtures import BROKER_LIMITS, MqttSession, enroll_device, sessions, wait_ready
from tests.integration.hubfixtures import Hub, enroll, init_hub, make_csr, new_key, one_line, run_cli
from tests.integration.pgfixtures import pg_server  # noqa: F401
from tests.integration.rabbitfixtures import RabbitCluster, require_rabbitmq

pytestmark = pytest.mark.integration

DEVICES = 8  # tokens raced at both hubs
CUT_TIMEOUT = 10.0  # a generous bound for the kick (revoke -> cut is measured in bench/)


def render_on(hub: Hub):
    """The node files as the hub's RabbitMQ driver renders them, over the hub's own (PostgreSQL) registry."""
    from hub.broker.rabbitmq import RabbitMQBroker
    from hub.ca.authority import load_ca
    from hub.config import load_config

    def render(out: Path, nodes):
        cfg = load_config(hub.dir)
        registry, ca = cfg.open_registry(), load_ca(cfg.ca_dir)
        try:
            return RabbitMQBroker(cfg.broker_dir, registry, ca, cfg.rabbitmq_management,
                                  cafile=cfg.ca_dir / "device-chain.pem", certfile=cfg.tls_dir / "est.pem",
                                  keyfile=cfg.tls_dir / "est.key", device_ca=cfg.ca_dir / "device-ca.pem",
                                  service_ca=cfg.ca_dir / "service-ca.pem",
                                  auth_port=cfg.rabbitmq_auth_port).render(out, nodes)
        finally:
            registry.close()
            ca.close()
    return render


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


@pytest.fixture(scope="module")
def hubs(tmp_path_factory, pg_url):
    """(hub A, hub B, cluster): both serving, both on the one registry and the one node."""
    require_rabbitmq()
    base = tmp_path_factory.mktemp("hubs-pg")
    cluster = RabbitCluster(base / "rabbit", 1)
    a = init_hub(base / "a", **BROKER_LIMITS)
    a.configure(kind="rabbitmq", auth_port=free_port(),
                management_urls=[f"http://{n.host}:{n.mgmt_port}" for n in cluster.nodes], url=pg_url)
    a.broker_port = cluster.nodes[0].mqtt_port
    (base / "b").mkdir()
    b = Hub(dir=base / "b" / "hub", broker_port=a.broker_port)
    started: list[Hub] = []
    try:
        cluster.start(render_on(a))
        a.start()
        started.append(a)
        wait_ready(a)
        proc = run_cli("init", "--join", str(a.dir), "--dir", str(b.dir))
        assert proc.returncode == 0, proc.stderr
        b.configure(auth_port=free_port())  # same machine: its own auth listener (the node calls A's)
        b.start()
        started.append(b)
        wait_ready(b)
        yield a, b, cluster
    finally:
        try:
            for hub in reversed(started):
                stop_hub(hub)
        finally:
            for hub in (a, b):
                hub.kill()
            cluster.stop()


def test_join_copies_the_fleet_and_keeps_secrets_private(hubs):
    a, b, _ = hubs
    for name in ("ca/root.pem", "ca/device-ca.key", "tls/est.pem", "tls/admin.key", "audit.key",
                 "broker/rabbitmq/auth.secret", "broker/rabbitmq/mgmt.secret"):
        assert (b.dir / name).read_bytes() == (a.dir / name).read_bytes(), name
    for path in [*b.dir.glob("*/*.key"), *b.dir.glob("broker/rabbitmq/*.secret"), b.dir / "audit.key", b.dir / "fleet.toml"]:
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
    fleet_a, fleet_b = (tomllib.loads((h.dir / "fleet.toml").read_text()) for h in (a, b))
    for fleet in (fleet_a, fleet_b):
        fleet["broker"].pop("auth_port")  # each hub its own listener (the fixture set B's after the join)
    assert fleet_b == fleet_a


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


def test_join_refuses_a_sqlite_hub(tmp_path):
    src = init_hub(tmp_path / "sqlite")
    proc = run_cli("init", "--join", str(src.dir), "--dir", str(tmp_path / "second"))
    assert proc.returncode != 0 and "needs a shared PostgreSQL registry" in one_line(proc.stderr), proc.stderr
    assert not (tmp_path / "second").exists()
