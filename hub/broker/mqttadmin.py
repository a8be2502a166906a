"""The hub's own MQTT connection (admin certificate from the service CA): presence and broker control."""

from __future__ import annotations

import json
import logging
import ssl
import threading
from pathlib import Path
from typing import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from . import BrokerError

log = logging.getLogger("tessera.hub.admin-mqtt")

CLIENT_ID = "tessera-hub"
STATUS_TOPIC = "devices/+/status"
DEVICE_TOPICS = ("devices/+/telemetry", "devices/+/events", "devices/+/commands/ack")
DYNSEC_RESPONSE = "$CONTROL/dynamic-security/v1/response"
SESSION_EXPIRY = 3600  # seconds the broker keeps the hub's subscriptions and queue while it is away


class AdminClient:
    """One paho session (the broker forces client id = CN, so there is exactly one) used for everything."""

    def __init__(self, host: str, port: int, cafile: Path, certfile: Path, keyfile: Path,
                 on_status: Callable[[str, bytes], None],
                 on_device_message: Callable[[str, str, bytes], None] = lambda device, kind, payload: None):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cafile=str(cafile))
        ctx.load_cert_chain(str(certfile), str(keyfile))
        self.on_status, self.on_device_message = on_status, on_device_message
        self.connected = threading.Event()
        self._responses: list[dict] = []
        self._cond = threading.Condition()
        self._lock = threading.Lock()  # one control request at a time: responses carry no correlation id
        c = self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=CLIENT_ID, protocol=mqtt.MQTTv5)
        c.tls_set_context(ctx)
        c.reconnect_delay_set(min_delay=0.05, max_delay=2)
        c.on_connect, c.on_disconnect, c.on_message = self._on_connect, self._on_disconnect, self._on_message
        self.host, self.port = host, port

    def start(self, timeout: float = 10.0) -> None:
        # A persistent session: while this connection is briefly down the broker queues the fleet's QoS 1
        # messages for the hub instead of dropping them.
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY
        self.client.connect_async(self.host, self.port, keepalive=30, clean_start=False, properties=props)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            raise BrokerError(f"the hub's admin client could not connect to the broker at {self.host}:{self.port}")

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("admin connection refused: %s", reason_code)
            return
        client.subscribe([(STATUS_TOPIC, 1), (DYNSEC_RESPONSE, 1), *((t, 1) for t in DEVICE_TOPICS)])
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        log.info("admin connection lost (%s); paho reconnects", reason_code)

    def _on_message(self, client, userdata, msg) -> None:
        if msg.topic == DYNSEC_RESPONSE:
            try:
                data = json.loads(msg.payload)
            except ValueError:
                return
            with self._cond:
                self._responses.append(data)
                self._cond.notify_all()
            return
        parts = msg.topic.split("/")
        if len(parts) < 3 or parts[0] != "devices":
            return
        try:
            if parts[2] == "status" and len(parts) == 3:
                self.on_status(parts[1], msg.payload)
            else:
                self.on_device_message(parts[1], "/".join(parts[2:]), msg.payload)
        except Exception:
            log.exception("handling %s failed", msg.topic)

    def publish(self, topic: str, payload: bytes, qos: int = 1, timeout: float = 5.0) -> None:
        if not self.connected.wait(timeout):
            raise BrokerError("the hub's admin connection to the broker is down")
        info = self.client.publish(topic, payload, qos=qos)
        info.wait_for_publish(timeout)

    def control(self, topic: str, payload: bytes, timeout: float = 3.0) -> dict:
        """Publish a $CONTROL request and wait for its response."""
        with self._lock:
            if not self.connected.wait(timeout):
                raise BrokerError("the hub's admin connection to the broker is down")
            with self._cond:
                self._responses.clear()
            info = self.client.publish(topic, payload, qos=1)
            with self._cond:
                if not self._cond.wait_for(lambda: self._responses, timeout):
                    raise BrokerError(f"no answer from the broker on {topic} within {timeout:.0f} s")
                response = self._responses.pop(0)
            info.wait_for_publish(timeout)
        errors = [r for r in response.get("responses", []) if r.get("error") and r.get("command") != "createClient"]
        if errors:
            raise BrokerError(f"broker refused {errors[0].get('command')}: {errors[0].get('error')}")
        return response
