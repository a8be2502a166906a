"""Broker control: the driver interface the hub uses, so another (clustered) broker can replace Mosquitto."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime


class BrokerError(Exception):
    """The broker could not be started, reloaded or confirmed; the message says what and why."""


@dataclass(frozen=True)
class AclSpec:
    """Who may do what beyond `devices/<own id>/#`: group memberships (device id -> groups)."""

    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Canary:
    """A revoked device-CA client certificate (PEM chain + key) used to prove a CRL is enforced."""

    cert_pem: bytes
    key_pem: bytes
    serial: int
    not_after: datetime


class BrokerDriver(ABC):
    """What the hub needs from a broker: lifecycle, authorization data, revocation and kicks, health."""

    @abstractmethod
    def start(self) -> None:
        """Start (or adopt) the broker with the current CRL and ACL; return once it accepts connections."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the broker and release its resources."""

    @abstractmethod
    def healthy(self) -> bool:
        """True while the broker runs and accepts connections."""

    @abstractmethod
    def install_crl(self, crl_pem: bytes, canary: Canary | None) -> float:
        """Make the broker enforce `crl_pem` (all CRLs, PEM), confirmed with `canary` when given.

        Returns the seconds it took. Raises BrokerError if it cannot be confirmed; the driver must then have
        closed the listener rather than leave it running on an unknown CRL (fail closed).
        """

    @abstractmethod
    def install_acl(self, acl: AclSpec) -> None:
        """Render and load the authorization rules."""

    @abstractmethod
    def kick(self, device_id: str) -> None:
        """Drop every live session of `device_id` now."""
