"""Broker control: the driver interface the hub uses, so another (clustered) broker can replace Mosquitto.

Authorization is not rendered into broker files any more: every driver enforces the registry's state and the
roles in hub/authz/policy.py itself (the Mosquitto driver through its plugin). What the hub asks of a driver is a
lifecycle, health, and `sync()`: "apply the registry's latest authorization events now".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


class BrokerError(Exception):
    """The broker could not be started or did not answer; the message says what and why."""


@dataclass(frozen=True)
class SyncResult:
    """What the broker reported after applying the registry's authorization events."""

    seq: int       # the newest authz event the broker has applied
    kicked: int    # sessions it cut off while doing so
    seconds: float


class BrokerDriver(ABC):
    """What the hub needs from a broker: lifecycle, health, and immediate enforcement of registry changes."""

    #: the MQTT protocol the hub's own client (hub.broker.mqttadmin) speaks to this broker: "5", or "3.1.1" for a
    #: broker without MQTT 5 (RabbitMQ 3.10); devices find out by themselves (agent/mqttproto.py)
    mqtt_protocol: str = "5"

    @abstractmethod
    def start(self) -> None:
        """Start (or adopt) the broker; return once it accepts connections and enforces the registry."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the broker and release its resources."""

    @abstractmethod
    def healthy(self) -> bool:
        """True while the broker runs and accepts connections."""

    @abstractmethod
    def sync(self, timeout: float = 2.0, after: int | None = None) -> SyncResult:
        """Make the broker apply every committed authz event now (re-check and cut off live sessions).

        `kicked` counts the sessions cut for events newer than `after` (the authz seq before the caller's commit),
        also when the broker had already applied them by itself; without `after`, those cut by this call.

        Raises BrokerError if the broker did not confirm in time; the broker still applies the events by itself
        (the Mosquitto plugin follows the registry every ~100 ms), so a commit is never lost.
        """
