"""MQTT 3.1.1 fallback end to end, with a real RabbitMQ 3.10 cluster (MQTT 3.1.1 only) behind a hub whose broker
driver is RabbitMQ (tests/integration/rabbitfixtures.py: the session's 3-node cluster and hub; its own admin client
speaks 3.1.1): an agent (SoftHSM token, `mqtt.protocol = "auto"`) falls back, remembers it across a restart,
publishes telemetry that arrives, answers commands (`tessera-hub device send`, a job), takes no retained command,
and its last will marks it offline when killed. Against Mosquitto an agent keeps MQTT 5 (and, with
mqtt.protocol = "3.1.1" forced, is commanded without the MQTT 5 role stamp).

An `admin` service identity (`tessera-hub identity add`) watches the device's topics over 3.1.1 and publishes the
retained command (the hub's CLI never retains). Cost: the cluster's start when no other module started it yet
(~30 s), then seconds.
"""

from __future__ import annotations

import json
import ssl
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from tests.integration.agentfixtures import hub, make_device, new_device, wait_until  # noqa: F401  (fixtures)
from tests.integration.rabbitfixtures import rabbit_cluster_hub  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

DEVICE = "m311-1"


class Watcher:
    """A 3.1.1 client with an admin-role service identity: what it receives on devices/<DEVICE>/#, in order."""

    def __init__(self, hub, port: int, name: str = "t311-watch"):  # noqa: F811
        info = hub.cli_json("identity", "add", name, "--role", "admin")
        files = Path(info["dir"])
        ctx = ssl.create_default_context(cafile=str(hub.root_pem))
        ctx.load_cert_chain(str(files / f"{name}.pem"), str(files / f"{name}.key"))
        self.got: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self.subscribed = threading.Event()
        c = self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=info["principal"],
                                      protocol=mqtt.MQTTv311)
        c.tls_set_context(ctx)
        self.events: list[str] = []  # connect/subscribe outcomes, for failure messages
        c.on_connect = self._on_connect
        c.on_subscribe = lambda cl, u, mid, codes, props: (self.events.append(f"suback {codes}"),
                                                           self.subscribed.set())
        c.on_disconnect = lambda cl, u, flags, rc, props: self.events.append(f"disconnect {rc}")
        c.on_message = self._on_message
        c.connect("127.0.0.1", port)
        c.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.events.append(f"connack {reason_code}")
        if not reason_code.is_failure:
            client.subscribe([(f"devices/{DEVICE}/{k}", 1) for k in ("status", "telemetry", "commands/ack")])

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.got.append((msg.topic, msg.payload, msg.retain))

    def of(self, kind: str) -> list[dict]:
        with self._lock:
            return [json.loads(p) for t, p, _ in self.got if t == f"devices/{DEVICE}/{kind}" and p]

    def last_status(self) -> str | None:
        states = [s.get("state") for s in self.of("status")]
        return states[-1] if states else None

    def publish(self, kind: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(f"devices/{DEVICE}/{kind}", payload, qos=1, retain=retain).wait_for_publish(10)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_auto_falls_back_to_311_on_rabbitmq(rabbit_cluster_hub, tmp_path):  # noqa: F811
    hub_r, cluster = rabbit_cluster_hub
    watch = Watcher(hub_r, cluster.nodes[0].mqtt_port)
    dev, token = new_device(hub_r, tmp_path, DEVICE, interval=0.2)  # [mqtt] protocol: the default, auto
    try:
        assert watch.subscribed.wait(20), f"the watcher's subscription: {watch.events}"
        dev.enroll_ok(token)
        dev.start()
        st = dev.wait_state("online", 40)
        assert st["mqtt_protocol"] == "3.1.1", st
        assert "refused MQTT 5" in dev.log_text()
        remembered = json.loads((dev.state / "mqtt-protocol.json").read_text())
        assert remembered["broker"] == f"localhost:{hub_r.mqtt_port}" and remembered["protocol"] == "3.1.1"

        # presence (registry and watcher) and telemetry; seq without gaps; the spool empties on PUBACKs
        wait_until(lambda: hub_r.device_list()[DEVICE]["online"], 20, "the registry shows the device online")
        wait_until(lambda: watch.last_status() == "online", 20, "the online status")
        tel = wait_until(lambda: (t := watch.of("telemetry")) and len(t) >= 5 and t, 20, "5 telemetry messages")
        seqs = [t["seq"] for t in tel]
        assert sorted(set(seqs)) == list(range(1, max(seqs) + 1)), seqs
        wait_until(lambda: dev.status_file().get("spool_depth") == 0, 20, "an empty spool")

        # a command through the hub (its 3.1.1 client), the ack read back by command id
        proc = hub_r.cli("device", "send", DEVICE, "ping", "--wait", "15")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert json.loads(proc.stdout)["result"] == {"pong": True}
        # and a job (hub/jobs: acks matched by the id in the payload)
        job = json.loads(hub_r.cli_ok("job", "create", "311 ping", "--command", "ping", "--id", DEVICE, "--yes",
                                      "--json"))
        done = json.loads(hub_r.cli_ok("job", "wait", str(job["id"]), "--timeout", "60", "--json"))
        assert done["state"] == "completed" and done["counts"]["acked"] == 1, done

        # a retained command, delivered at subscribe with the retain flag, is not run; a live one after it is
        dev.stop()
        watch.publish("commands", json.dumps({"id": "c311-retained", "command": "ping"}).encode(), retain=True)
        dev.start()
        dev.wait_state("online", 40)
        proc = hub_r.cli("device", "send", DEVICE, "report", "--wait", "15")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert json.loads(proc.stdout)["result"]["pid"] == dev.proc.pid
        assert "retained message; commands are only taken live" in dev.log_text()
        assert not [a for a in watch.of("commands/ack") if a["id"] == "c311-retained"]
        watch.publish("commands", b"", retain=True)  # the retained command cleared
        # the restart used the remembered 3.1.1 directly: no refused MQTT 5 attempt this time
        assert "refused MQTT 5" not in dev.log_text() and dev.status_file()["mqtt_protocol"] == "3.1.1"
        shown = dev.status()  # and `tessera-agent status` says so, with the broker it is on
        assert shown["mqtt_protocol"] == "3.1.1" and shown["broker"] == f"localhost:{hub_r.mqtt_port}", shown

        # killed: the last will (retained offline status) reaches the watcher and the registry
        wait_until(lambda: watch.last_status() == "online", 20, "online again")
        dev.kill9()
        wait_until(lambda: watch.last_status() == "offline", 30, "the last will")
        wait_until(lambda: not hub_r.device_list()[DEVICE]["online"], 30, "the registry shows the device offline")
    finally:
        dev.destroy()
        watch.stop()


def test_mosquitto_keeps_mqtt5_and_serves_a_forced_311(hub, make_device):  # noqa: F811
    dev, token = make_device("m5-1", interval=0.5)
    dev.enroll_ok(token)
    dev.start()
    st = dev.wait_state("online", 40)
    assert st["mqtt_protocol"] == "5", st
    assert "refused MQTT 5" not in dev.log_text()
    assert not (dev.state / "mqtt-protocol.json").exists()

    # forced 3.1.1 on Mosquitto: no role stamp on commands (no properties), the plugin's publish ACL is the check
    dev.stop()
    with dev.config.open("a") as fh:
        fh.write('\n[mqtt]\nprotocol = "3.1.1"\n')
    dev.start()
    assert dev.wait_state("online", 40)["mqtt_protocol"] == "3.1.1"
    proc = hub.cli("device", "send", "m5-1", "ping", "--wait", "15")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["result"] == {"pong": True}
    assert not (dev.state / "mqtt-protocol.json").exists()  # an explicit setting records nothing
