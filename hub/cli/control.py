"""Device status changes from the CLI: through the running hub (immediate effect) or, offline, directly.

The online path imports nothing heavy (it is the revoke command's hot path: see hub.cli.entry); the offline one loads
the registry and the CA only when no hub answers.
"""

from __future__ import annotations

from datetime import datetime

from hub.serve import admin
from hub.config import HubConfig


def apply_status_change(cfg: HubConfig, device_id: str, status: str, reason: str, now: datetime,
                        actor: str = "cli") -> str:
    """Suspend / resume / revoke. Returns a one-line summary for the operator."""
    try:
        result = admin.call(cfg.admin_socket, {"op": "set_status", "device": device_id, "status": status,
                                               "reason": reason, "actor": actor})
    except admin.AdminUnavailable:
        return _offline(cfg, device_id, status, reason, now, actor)
    t = result["timings"]
    summary = f"{device_id}: {result['device']['status']}"
    if result["revoked_serials"]:
        summary += f"; {len(result['revoked_serials'])} certificate(s) revoked"
    summary += f"; enforced by the running hub in {t['total_ms']:.0f} ms"
    if result["kicked"] is None:
        summary += " (broker not confirmed; it applies the change on its next tick)"
    elif result["kicked"]:
        summary += f" ({result['kicked']} live session(s) cut)"
    return summary


def _offline(cfg: HubConfig, device_id: str, status: str, reason: str, now: datetime, actor: str) -> str:
    from hub.ca.authority import load_ca
    from hub.registry.store import Registry
    from hub.ca.revocation import publish_crl

    registry = Registry(cfg.registry_path)
    try:
        result = registry.set_status(device_id, status, now, actor=actor, reason=reason)
        ca = load_ca(cfg.ca_dir, cfg.ca_token)
        try:
            publish_crl(ca, registry, cfg.crl_dir, now)
        finally:
            ca.close()
    finally:
        registry.close()
    summary = f"{device_id}: {result['device']['status']}"
    if result["revoked_serials"]:
        summary += f"; {len(result['revoked_serials'])} certificate(s) revoked"
    return summary + "; the hub is not running: recorded, the broker enforces it from the registry when it starts"
