"""Publishing the device CRL from the registry: build, sign, validate on disk, swap in atomically."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from .ca import FleetCA
from .crl import crl_needs_refresh, current_crl, next_crl_number, write_crl_atomically
from .registry import Registry

CRL_LIFETIME = timedelta(days=7)


def _revoked_entries(registry: Registry):
    for row in registry.revoked_certificates():
        yield int(row["serial"], 16), datetime.fromisoformat(row["revoked_at"]), row["reason"] or "unspecified"


def publish_crl(ca: FleetCA, registry: Registry, crl_dir: Path, now: datetime) -> Path:
    """Regenerate the device CRL from the registry's revoked certificates and install it; returns the DER path."""
    crl_dir.mkdir(parents=True, exist_ok=True)
    crl = ca.build_crl(_revoked_entries(registry), now, next_update=CRL_LIFETIME,
                       crl_number=next_crl_number(crl_dir))
    return write_crl_atomically(crl, crl_dir, ca.device_ca, now)


def refresh_if_due(ca: FleetCA, registry: Registry, crl_dir: Path, now: datetime) -> bool:
    """Re-issue the CRL when it is missing, unreadable, or past half its lifetime. True if re-issued."""
    crl = current_crl(crl_dir, ca.device_ca)
    if crl is None or crl_needs_refresh(crl, now):
        publish_crl(ca, registry, crl_dir, now)
        return True
    return False
