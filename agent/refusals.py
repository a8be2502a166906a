"""What a refused MQTT connection means: TLS alerts and CONNACK refusals explained by the hub's credential status.

A CONNACK refusal (Mosquitto 2.0.11 lets the plugin send only 0x87) is explained by GET /tessera/v1/credential:
`refusal_decision` maps the hub's answer to the agent's state, its backoff cap and a hint for the operator.
"""

from __future__ import annotations

from dataclasses import dataclass

from .backoff import SLOW_CAP

#: CONNACK reason codes that mean "not you": Bad user name or password, Not authorized, Banned, Bad authentication
AUTH_REFUSALS = frozenset({0x86, 0x87, 0x8A, 0x8C})
SUSPENDED_CAP = 5.0     # a resumed device is back within seconds
REFUSED_CAP = 30.0


def classify_tls_error(text: str) -> str | None:
    """'revoked' / 'expired' / 'unknown_ca' for the TLS alerts that mean our certificate is refused."""
    t = text.upper()
    if "CERTIFICATE_REVOKED" in t or "CERTIFICATE REVOKED" in t:
        return "revoked"
    if "CERTIFICATE_EXPIRED" in t or "CERTIFICATE EXPIRED" in t:
        return "expired"
    if "UNKNOWN_CA" in t or "UNKNOWN CA" in t or "BAD_CERTIFICATE" in t:
        return "refused"
    return None


@dataclass(frozen=True)
class Refusal:
    """What a refused connection means: the agent `state`, the cap (s) of its full-jitter backoff, and a hint."""

    state: str
    cap: float
    hint: str


_REENROLL = "get a new token (`tessera-hub device token <id>`) and run `tessera-agent enroll` again"
_REFUSALS = {
    "suspended": Refusal("suspended", SUSPENDED_CAP, "the device is suspended; it is back within seconds of resume"),
    "revoked": Refusal("revoked", SLOW_CAP, "the device is revoked"),
    "superseded": Refusal("refused", REFUSED_CAP, f"this is an old certificate (the hub has a newer one): {_REENROLL}"),
    "expired": Refusal("refused", REFUSED_CAP, "the hub holds this certificate expired: is this device's clock right?"),
    "unknown": Refusal("refused", REFUSED_CAP, f"the hub has no record of this certificate: {_REENROLL}"),
    "active": Refusal("refused", REFUSED_CAP, "the hub says the certificate is active, yet the broker refused it"),
}
_UNEXPLAINED = Refusal("refused", REFUSED_CAP, "the hub could not be asked why")


def refusal_decision(connack: int | None, credential: str | None) -> Refusal | None:
    """The state and backoff for a CONNACK refusal code, given the hub's credential status (None: the hub could
    not be asked). None when `connack` is no authorization refusal: the ordinary reconnect backoff applies."""
    if connack not in AUTH_REFUSALS:
        return None
    return _REFUSALS.get(credential or "", _UNEXPLAINED)
