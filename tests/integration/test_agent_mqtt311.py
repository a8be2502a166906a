"""MQTT 3.1.1 fallback end to end: an agent (SoftHSM token, `mqtt.protocol = "auto"`) against a real RabbitMQ 3.10
node (MQTT 3.1.1 only) falls back, remembers it, publishes telemetry, answers commands and leaves its last will;
the hub side is the hub's own AdminClient speaking 3.1.1. Against Mosquitto the same agent keeps MQTT 5.

The RabbitMQ node is this module's own (one node, internal users from a definitions file, mTLS listener with
ssl_cert_login by CN, topic permissions as the broker driver would set them): tests/integration/rabbitfixtures.py's
cluster is the hub's driver, not needed for the protocol. The node starts once for the module (~10 s).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from hub.authz.policy import HUB_PRINCIPAL
from hub.broker.mqttadmin import AdminClient
from tests.helpers import free_port
from tests.integration.agentfixtures import hub, make_device, wait_until  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("rabbitmq-server") is None, reason="rabbitmq-server not installed")]

DEVICE = "m311-1"
START_TIMEOUT = 90.0


def _definitions(device: str) -> dict:
    """Users without passwords (certificate login only) and the topic permissions the broker driver derives from
    hub/authz/policy.py for a device and the hub (routing keys: MQTT '/' becomes '.')."""
    dev = device.replace(".", r"\.")
    users = [{"name": n, "password_hash": "", "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []}
             for n in (device, HUB_PRINCIPAL)]
    perms = [{"user": n, "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"} for n in (device, HUB_PRINCIPAL)]
    topics = [{"user": device, "vhost": "/", "exchange": "amq.topic",
               "write": rf"^devices\.{dev}\.(telemetry|events|status|commands\.ack)$",
               "read": rf"^devices\.{dev}\.commands$"},
              {"user": HUB_PRINCIPAL, "vhost": "/", "exchange": "amq.topic", "write": ".*", "read": ".*"}]
    return {"users": users, "vhosts": [{"name": "/"}], "permissions": perms, "topic_permissions": topics}


class RabbitNode:
    """One RabbitMQ node (runs as the rabbitmq user, so its files live in a directory it owns)."""

    def __init__(self, hub_dir: Path, device: str):
        self.base = Path(tempfile.mkdtemp(prefix="tessera-rmq311-"))
        self.port = free_port()
        self.name = f"t311-{os.getpid()}@localhost"
        tls = hub_dir / "tls"
        for src, dst in ((hub_dir / "ca" / "root.pem", "ca.pem"), (tls / "est.pem", "server.pem"),
                         (tls / "est.key", "server.key")):
            shutil.copyfile(src, self.base / dst)
        (self.base / "definitions.json").write_text(json.dumps(_definitions(device)))
        (self.base / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        b = self.base
        (b / "rabbitmq.conf").write_text("\n".join([
            f"listeners.tcp.default = 127.0.0.1:{free_port()}", "loopback_users = none",
            "mqtt.listeners.tcp = none", f"mqtt.listeners.ssl.default = 127.0.0.1:{self.port}",
            "mqtt.allow_anonymous = false", "mqtt.ssl_cert_login = true", "ssl_cert_login_from = common_name",
            f"ssl_options.cacertfile = {b}/ca.pem", f"ssl_options.certfile = {b}/server.pem",
            f"ssl_options.keyfile = {b}/server.key", "ssl_options.verify = verify_peer",
            "ssl_options.fail_if_no_peer_cert = true", "ssl_options.depth = 3",
            f"load_definitions = {b}/definitions.json", "management.tcp.port = 0", "log.console = false",
            "log.file.level = info", ""]))
        for d in ("mnesia", "log"):
            (b / d).mkdir()
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(b)], check=True)
        os.chmod(b / "server.key", 0o600)
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(b), "RABBITMQ_NODENAME": self.name,
                    "RABBITMQ_DIST_PORT": str(free_port()), "RABBITMQ_MNESIA_BASE": f"{b}/mnesia",
                    "RABBITMQ_LOG_BASE": f"{b}/log", "RABBITMQ_CONFIG_FILE": f"{b}/rabbitmq.conf",
                    "RABBITMQ_ENABLED_PLUGINS_FILE": f"{b}/enabled_plugins", "RABBITMQ_PID_FILE": f"{b}/pid",
                    "RABBITMQ_ADVANCED_CONFIG_FILE": f"{b}/advanced.config"}
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.base / "server.out", "wb") as out:
            self.proc = subprocess.Popen(["rabbitmq-server"], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"rabbitmq-server exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            if "Starting broker... completed" in self.output():
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1):
                    return
            time.sleep(0.2)
        raise AssertionError(f"RabbitMQ did not start within {START_TIMEOUT} s:\n{self.log()[-3000:]}")

    def output(self) -> str:
        return (self.base / "server.out").read_text(errors="replace")

    def log(self) -> str:
        path = self.base / "log" / f"{self.name}.log"
        return self.output() + (path.read_text(errors="replace") if path.exists() else "")

    def stop(self) -> None:
        pid = None
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.base / "pid").read_text().strip())
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)  # the node's own beam process: a clean shutdown
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="module")
def rabbit(hub):  # noqa: F811
    node = RabbitNode(hub.dir, DEVICE)
    try:
        node.start()
        yield node
    finally:
        node.stop()


class HubSide:
    """The hub's AdminClient on the RabbitMQ node (MQTT 3.1.1): what it receives, in order."""

    def __init__(self, hub, port: int):  # noqa: F811
        self.status: list[tuple[str, dict]] = []
        self.messages: list[tuple[str, str, bytes]] = []
        self._lock = threading.Lock()
        tls = hub.dir / "tls"
        self.client = AdminClient("127.0.0.1", port, hub.root_pem, tls / "admin.pem", tls / "admin.key",
                                  on_status=self._on_status, on_device_message=self._on_message, protocol="3.1.1")

    def _on_status(self, device: str, payload: bytes) -> None:
        with self._lock:
            self.status.append((device, json.loads(payload)))

    def _on_message(self, device: str, kind: str, payload: bytes) -> None:
        with self._lock:
            self.messages.append((device, kind, payload))

    def of(self, kind: str) -> list[dict]:
        with self._lock:
            return [json.loads(p) for d, k, p in self.messages if d == DEVICE and k == kind]

    def last_status(self) -> str | None:
        with self._lock:
            states = [s.get("state") for d, s in self.status if d == DEVICE]
        return states[-1] if states else None


@pytest.fixture(scope="module")
def hub_side(hub, rabbit):  # noqa: F811
    side = HubSide(hub, rabbit.port)
    side.client.start(timeout=20)
    yield side
    side.client.stop()


def test_auto_falls_back_to_311_on_rabbitmq(hub, rabbit, hub_side, make_device):  # noqa: F811
    dev, token = make_device(DEVICE, interval=0.2)
    dev.enroll_ok(token)
    dev.write_config(mqtt_host="127.0.0.1", mqtt_port=rabbit.port)  # [mqtt] protocol: the default, auto

    dev.start()
    st = dev.wait_state("online", 40)
    assert st["mqtt_protocol"] == "3.1.1", st
    assert "refused MQTT 5" in dev.log_text()
    # what RabbitMQ 3.10 does with a v5 CONNECT: it cannot parse it and closes the connection (no CONNACK)
    with contextlib.suppress(AssertionError):
        wait_until(lambda: "MQTT cannot parse a frame" in rabbit.log(), 5, "RabbitMQ's parse error")
    assert "MQTT cannot parse a frame" in rabbit.log(), rabbit.log()[-6000:]
    remembered = json.loads((dev.state / "mqtt-protocol.json").read_text())
    assert remembered["broker"] == f"127.0.0.1:{rabbit.port}" and remembered["protocol"] == "3.1.1"

    # presence and telemetry reach the hub's 3.1.1 client; seq without gaps; the spool empties on PUBACKs
    wait_until(lambda: hub_side.last_status() == "online", 20, "online status on the hub side")
    tel = wait_until(lambda: (t := hub_side.of("telemetry")) and len(t) >= 5 and t, 20, "5 telemetry messages")
    seqs = [t["seq"] for t in tel]
    assert sorted(set(seqs)) == list(range(1, max(seqs) + 1)), seqs
    wait_until(lambda: dev.status_file().get("spool_depth") == 0, 20, "an empty spool")

    # a command from the hub's client is answered; the ack names the command id (payload correlation)
    hub_side.client.publish(f"devices/{DEVICE}/commands", json.dumps({"id": "c311-ping", "command": "ping"}).encode())
    ack = wait_until(lambda: next((a for a in hub_side.of("commands/ack") if a["id"] == "c311-ping"), None), 20,
                     "the ping ack")
    assert ack["ok"] is True and ack["result"] == {"pong": True}
    # a retained command, delivered at subscribe with the retain flag (RabbitMQ keeps it), is not run; a live one is
    dev.stop()
    hub_side.client.client.publish(f"devices/{DEVICE}/commands", json.dumps({"id": "c311-retained", "command": "ping"})
                                   .encode(), qos=1, retain=True).wait_for_publish(5)
    dev.start()
    dev.wait_state("online", 40)
    hub_side.client.publish(f"devices/{DEVICE}/commands", json.dumps({"id": "c311-live", "command": "report"}).encode())
    ack = wait_until(lambda: next((a for a in hub_side.of("commands/ack") if a["id"] == "c311-live"), None), 20,
                     "the report ack")
    assert ack["result"]["device"] == DEVICE and ack["result"]["pid"] == dev.proc.pid
    assert not [a for a in hub_side.of("commands/ack") if a["id"] == "c311-retained"]
    assert "retained message; commands are only taken live" in dev.log_text()
    # the restart used the remembered 3.1.1 directly: no refused MQTT 5 attempt
    assert "refused MQTT 5" not in dev.log_text() and dev.status_file()["mqtt_protocol"] == "3.1.1"
    hub_side.client.client.publish(f"devices/{DEVICE}/commands", b"", qos=1, retain=True).wait_for_publish(5)

    # killed: the last will (retained offline status) reaches the hub side
    wait_until(lambda: hub_side.last_status() == "online", 20, "online again")
    dev.kill9()
    wait_until(lambda: hub_side.last_status() == "offline", 30, "the last will on the hub side")


def test_auto_keeps_mqtt5_on_mosquitto(hub, make_device):  # noqa: F811
    dev, token = make_device("m5-1", interval=0.5)
    dev.enroll_ok(token)
    dev.start()
    st = dev.wait_state("online", 40)
    assert st["mqtt_protocol"] == "5", st
    assert "refused MQTT 5" not in dev.log_text()
    assert not (dev.state / "mqtt-protocol.json").exists()
