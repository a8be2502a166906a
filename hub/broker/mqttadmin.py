"""The hub's own MQTT connection (admin certificate from the service CA): presence and broker control.

It speaks the protocol its broker driver supports (`BrokerDriver.mqtt_protocol`): MQTT 5 with a session expiry, or
on a 3.1.1 broker (RabbitMQ) clean_session=false, the same persistent session. Nothing else here needs MQTT 5:
commands and their acks are correlated by the id in the payload (agent/mqttproto.py, MQTT311_CONTRACT).
"""

from __future__ import annotations

import logging
import re
import secrets
import socket
import ssl
import threading
from pathlib import Path
from typing import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from hub.authz.policy import CONTROL_RESPONSE, CONTROL_TOPIC, HUB_PRINCIPAL

from . import BrokerError

log = logging.getLogger("tessera.hub.admin-mqtt")

CLIENT_ID = HUB_PRINCIPAL
STATUS_TOPIC = "devices/+/status"
DEVICE_TOPICS = ("devices/+/telemetry", "devices/+/events", "devices/+/commands/ack")
_RESPONSE_RE = re.compile(r"([A-Za-z0-9-]{1,64}) (ok seq=(\d+) kicked=(\d+)|error (.*))", re.S)
SESSION_EXPIRY = 3600  # seconds the broker keeps the hub's subscriptions and queue while it is away
PROTOCOLS = ("5", "3.1.1")
SYS_CLIENTS = "$SYS/broker/clients/connected"  # Mosquitto's own count, retained, refreshed every sys_interval


class AdminClient:
    """One paho session (the broker forces client id = CN, so there is exactly one) used for everything."""

    def __init__(self, host: str, port: int, cafile: Path, certfile: Path, keyfile: Path,
                 on_status: Callable[[str, bytes], None],
                 on_device_message: Callable[[str, str, bytes], None] = lambda device, kind, payload: None,
                 protocol: str = "5", client_id: str = CLIENT_ID):
        """`client_id`: tessera-hub, or tessera-hub.<hub-id> for a hub joined to a fleet (HubConfig.admin_client_id)."""
        if protocol not in PROTOCOLS:
            raise BrokerError(f"the hub's MQTT client speaks MQTT {' or '.join(PROTOCOLS)}, not {protocol[:16]!r}")
        self.protocol = protocol
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cafile=str(cafile))
        ctx.load_cert_chain(str(certfile), str(keyfile))
        self.on_status, self.on_device_message = on_status, on_device_message
        self.connected = threading.Event()
        self.broker_clients: int | None = None  # SYS_CLIENTS once watch_broker_clients() (None: not known now)
        self._sys = False
        self._responses: dict[str, re.Match] = {}
        self._cond = threading.Condition()
        if protocol == "5":
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        else:
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                            clean_session=False)
        self.client = c
        c.tls_set_context(ctx)
        c.reconnect_delay_set(min_delay=0.05, max_delay=2)
        c.on_connect, c.on_disconnect, c.on_message = self._on_connect, self._on_disconnect, self._on_message
        self.host, self.port = host, port

    def start(self, timeout: float = 10.0) -> None:
        # A persistent session: while this connection is briefly down the broker queues the fleet's QoS 1
        # messages for the hub instead of dropping them (3.1.1: clean_session=false, kept until the broker's own
        # limit, e.g. RabbitMQ's durable queue for the client id).
        if self.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY
            self.client.connect_async(self.host, self.port, keepalive=30, clean_start=False, properties=props)
        else:
            self.client.connect_async(self.host, self.port, keepalive=30)
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
        # Nagle + the broker's delayed ACK held a doorbell behind this session's PUBACKs for up to 40 ms
        sock = client.socket()
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.subscribe([(STATUS_TOPIC, 1), (CONTROL_RESPONSE, 1), *((t, 1) for t in DEVICE_TOPICS),
                          *([(SYS_CLIENTS, 0)] if self._sys else [])])
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        self.broker_clients = None
        log.info("admin connection lost (%s); paho reconnects", reason_code)

    def watch_broker_clients(self) -> None:
        """Follow the broker's connected-clients count (the hub role must be allowed to read SYS_CLIENTS)."""
        self._sys = True
        self.client.subscribe(SYS_CLIENTS, 0)

    def _on_message(self, client, userdata, msg) -> None:
        if msg.topic == SYS_CLIENTS:
            self.broker_clients = int(msg.payload) if msg.payload.strip().isdigit() else None
            return
        if msg.topic == CONTROL_RESPONSE:
            match = _RESPONSE_RE.fullmatch(msg.payload.decode("utf-8", "replace"))
            if match:
                with self._cond:
                    self._responses[match.group(1)] = match
                    if len(self._responses) > 1000:
                        self._responses.pop(next(iter(self._responses)))
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

    def sync(self, timeout: float = 2.0, after: int | None = None) -> tuple[int, int]:
        """Ring the broker plugin: it applies every committed authz event now. Returns (seq applied, kicked):
        kicked counts the sessions cut for events newer than `after` when given (see BrokerDriver.sync)."""
        if not self.connected.wait(timeout):
            raise BrokerError("the hub's admin connection to the broker is down")
        rid = secrets.token_hex(8)
        request = f"sync {rid}" if after is None else f"sync {rid} {int(after)}"
        # QoS 0: the response is the confirmation (a lost request times out, and the plugin's tick applies the
        # events anyway), so no PUBACK round trip is waited for
        self.client.publish(CONTROL_TOPIC, request.encode(), qos=0)
        with self._cond:
            if not self._cond.wait_for(lambda: rid in self._responses, timeout):
                raise BrokerError(f"the broker did not confirm the authorization sync within {timeout:.1f} s")
            match = self._responses.pop(rid)
        if match.group(5) is not None:
            raise BrokerError(f"the broker could not apply the registry's changes: {match.group(5)[:200]}")
        return int(match.group(3)), int(match.group(4))
