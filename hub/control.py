"""Device status changes (suspend, resume, revoke) and their effects: registry, audit, CRL."""

from __future__ import annotations

from datetime import datetime

from .ca import load_ca
from .config import HubConfig
from .registry import Registry
from .revocation import publish_crl


def apply_status_change(cfg: HubConfig, device_id: str, status: str, reason: str, now: datetime,
                        actor: str = "cli") -> str:
    """Record the change and, for a revocation, publish a new CRL at once. Returns a one-line summary."""
    registry = Registry(cfg.registry_path)
    try:
        result = registry.set_status(device_id, status, now, actor=actor, reason=reason)
        serials = result.get("revoked_serials", [])
        if serials:
            ca = load_ca(cfg.ca_dir, cfg.ca_token)
            try:
                publish_crl(ca, registry, cfg.crl_dir, now)
            finally:
                ca.close()
        summary = f"{device_id}: {result['device']['status']}"
        if serials:
            summary += f"; {len(serials)} certificate(s) revoked and published in the CRL"
        return summary
    finally:
        registry.close()
