"""Which MQTT protocol the agent speaks to a broker: MQTT 5 first, MQTT 3.1.1 where the broker refuses 5.

`mqtt.protocol = "auto"` (the default) tries MQTT 5; a broker that only speaks 3.1.1 refuses it in one of two
ways, both recognised by `v5_refused`:
- RabbitMQ 3.10's MQTT plugin cannot parse a v5 CONNECT (the properties length byte) and closes the connection
  right after the TLS handshake, without a CONNACK (its log: "MQTT cannot parse a frame");
- a 3.1.1 broker that reads the protocol level answers a 3.1.1 CONNACK with return code 1, "unacceptable protocol
  version" (paho reports 0x84, Unsupported Protocol Version, or the raw 1).
The agent then connects again at once with 3.1.1, and once that succeeded records the choice for this broker
address in the state directory (`mqtt-protocol.json`), so a restart does not pay the refused attempt again.
MQTT 5 is tried again after REPROBE_AFTER (a broker upgrade is picked up within a day), and the record is ignored
when the broker address changes or `mqtt.protocol` is set to "5" or "3.1.1".

What MQTT 5 gave the agent and the hub and its 3.1.1 equivalent: MQTT311_CONTRACT (printed into docs/topics.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

PROTOCOLS = ("auto", "5", "3.1.1")
V5, V311 = "5", "3.1.1"
MEMORY_FILE = "mqtt-protocol.json"
REPROBE_AFTER = timedelta(hours=24)
#: CONNACK codes meaning "not this protocol version": 0x84 (MQTT 5's Unsupported Protocol Version, also what paho
#: makes of a 3.1.1 return code 1) and 1 itself (a 3.1.1 CONNACK read as MQTT 5)
V5_REFUSAL_CODES = frozenset({0x84, 0x01})

#: the topic/payload contract on a 3.1.1 broker (docs/generate.py prints it into docs/topics.md)
MQTT311_CONTRACT = (
    "On an MQTT 3.1.1 broker (RabbitMQ 3.10's MQTT plugin: the agent falls back to 3.1.1 when the broker refuses "
    "MQTT 5, `mqtt.protocol` in agent.toml; the hub's own client speaks what its broker driver says it supports) "
    "the topics and payloads are the same, and what MQTT 5 carried in properties is carried as follows. "
    "Command acks: correlated by the command's `id` in both payloads (no response topic or correlation data, in "
    "MQTT 5 neither). Who may command: there are no user properties, so no `tessera-sender`/`tessera-role` "
    "stamp; a device takes a live (not retained) message on its commands topic as a command because the broker "
    "lets only the roles `commander`, `admin` and `hub` publish there (the broker driver enforces the table above "
    "as topic permissions). Presence: the same retained `devices/<id>/status` and last will (QoS 1, retained); "
    "RabbitMQ keeps retained messages per node (its local retained store), so a subscriber connected to another "
    "cluster node than the device's does not get the device's retained status when it subscribes, only the live "
    "ones from then on (the hub's client stays subscribed, so it sees every change live). Sessions: the agent "
    "connects with clean_session=true (as its MQTT 5 session, which expires at disconnect: commands are only taken "
    "live); the hub's client with clean_session=false (MQTT 5: session expiry 1 h), so the broker queues the "
    "fleet's QoS 1 messages while it reconnects. Message expiry is not used on either protocol. Reason codes: the "
    "3.1.1 CONNACK return codes 4 and 5 are read as MQTT 5's 0x86 and 0x87 (refused, explained by the hub), and a "
    "3.1.1 PUBACK has no reason code (accepted). QoS: 1 for everything, also on 3.1.1 (RabbitMQ downgrades 2 to 1).")


def broker_key(host: str, port: int) -> str:
    return f"{host}:{port}"


@dataclass(frozen=True)
class Remembered:
    """What a previous run found out about one broker address."""
    broker: str
    protocol: str
    since: str  # ISO 8601, when the choice was recorded


def load_memory(state: Path) -> Remembered | None:
    """The recorded choice, or None (missing or damaged: a damaged record only costs one MQTT 5 attempt)."""
    try:
        data = json.loads((state / MEMORY_FILE).read_text())
        mem = Remembered(str(data["broker"]), str(data["protocol"]), str(data["since"]))
        datetime.fromisoformat(mem.since)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return mem if mem.protocol in (V5, V311) else None


def save_memory(state: Path, broker: str, protocol: str, now: datetime) -> Remembered:
    from .state import write_atomic

    mem = Remembered(broker, protocol, now.isoformat())
    write_atomic(state / MEMORY_FILE, json.dumps(mem.__dict__).encode(), 0o600)
    return mem


def forget_memory(state: Path) -> None:
    (state / MEMORY_FILE).unlink(missing_ok=True)


def choose(setting: str, memory: Remembered | None, broker: str, now: datetime) -> str:
    """The protocol to connect with: the setting when it names one; for "auto", 3.1.1 when a recorded 3.1.1 choice
    for this very broker is younger than REPROBE_AFTER, else MQTT 5."""
    if setting in (V5, V311):
        return setting
    if setting != "auto":
        raise ValueError(f"mqtt.protocol must be one of {', '.join(PROTOCOLS)}, not {setting!r}")
    if memory is None or memory.broker != broker or memory.protocol != V311:
        return V5
    age = now - datetime.fromisoformat(memory.since)
    return V311 if timedelta(0) <= age < REPROBE_AFTER else V5


def v5_refused(connack_code: int | None, handshake_done: bool, closed_before_connack: bool,
               tls_refusal: str | None) -> bool:
    """Whether a failed MQTT 5 attempt means "this broker does not speak MQTT 5": a CONNACK saying so, or the
    connection closed after a completed TLS handshake without any CONNACK and without a TLS alert refusing our
    certificate (a revoked or unknown certificate is the certificate's problem, not the protocol's)."""
    if connack_code is not None:
        return connack_code in V5_REFUSAL_CODES
    return handshake_done and closed_before_connack and tls_refusal is None


def after_success(setting: str, used: str, fell_back: bool, memory: Remembered | None) -> str:
    """What to do with the record once a connection with `used` succeeded: "save" after a fallback to 3.1.1 (a
    first one, or a re-probe that found MQTT 5 still refused: the record's age starts again), "forget" when MQTT 5
    worked while a record exists (the broker was upgraded or the address changed), else "keep"."""
    if setting != "auto":
        return "keep"
    if used == V311:
        return "save" if fell_back else "keep"
    return "forget" if memory is not None else "keep"
