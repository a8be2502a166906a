"""Issuance policy: what a valid device id is and what the hub puts in a device certificate (pure, no I/O)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import timedelta

DEVICE_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
#: Names the hub's own identities use; a device can never be called this.
RESERVED_IDS = frozenset({"tessera-hub", "tessera-canary", "hub", "admin", "root"})


class PolicyError(ValueError):
    """A request the issuance policy refuses (message is safe to show to the requester)."""


def check_device_id(device_id: str) -> str:
    """Return device_id if it is a valid, unreserved device id; raise PolicyError otherwise."""
    if not isinstance(device_id, str) or not DEVICE_ID_RE.fullmatch(device_id):
        raise PolicyError(f"invalid device id {device_id!r}: use 1-63 characters a-z, 0-9 and '-', "
                          "starting with a letter or digit")
    if device_id in RESERVED_IDS:
        raise PolicyError(f"device id {device_id!r} is reserved for the hub")
    return device_id


@dataclass(frozen=True)
class Policy:
    """Fleet issuance policy (from fleet.toml)."""

    fleet: str
    validity: timedelta = timedelta(days=30)
    #: Accept EC curves and minimum RSA size in device CSRs.
    ec_curves: tuple[str, ...] = ("secp256r1", "secp384r1")
    rsa_min_bits: int = 2048
    #: Subject alternative names from the CSR are ignored unless this is set (then only DNS names equal to the id).
    allow_csr_san: bool = False
    token_ttl: timedelta = timedelta(days=7)
    extra_ou: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.fleet or len(self.fleet) > 64:
            raise PolicyError("fleet name must be 1..64 characters")
        if self.validity <= timedelta(0):
            raise PolicyError("certificate validity must be positive")
