"""Device status changes from the CLI (suspend / resume / revoke): one call of the fleet API, one summary line.

Lean on purpose (the revoke command's hot path, hub.cli.entry): only the stdlib client is imported. With no hub
running locally the client answers in-process (hub.cli.offline), and the summary says what that means.
"""

from __future__ import annotations

from typing import Any

from hub.cli.client import ApiClient

ACTIONS = {"suspend": "suspended by operator", "resume": "", "revoke": None}  # action -> default reason
NOT_RUNNING_NOTE = "the hub is not running: recorded; the broker enforces it from the registry when it starts"


def status_change(client: ApiClient, device_id: str, action: str, reason: str) -> dict[str, Any]:
    """POST /api/v1/devices/{id}/status: the API's answer (device, changed, revoked_serials, sessions_cut,
    broker_note, timings). ApiError for a problem (400 an invalid device id: the API checks it, 404 no device, 409 a
    final status)."""
    from urllib.parse import quote

    return client.post(f"/api/v1/devices/{quote(device_id, safe='')}/status", {"action": action, "reason": reason})


def summary(result: dict[str, Any], hub_running: bool) -> str:
    """One line for the operator: the new status, what was revoked, and how (or whether) it was enforced."""
    device = result["device"]
    line = f"{device['id']}: {device['status']}"
    if result["revoked_serials"]:
        line += f"; {len(result['revoked_serials'])} certificate(s) revoked"
    if not result.get("changed", True):
        return line + " (unchanged)"
    if not hub_running:
        return line + "; " + NOT_RUNNING_NOTE
    line += f"; enforced by the running hub in {result['timings']['total_ms']:.0f} ms"
    if result["sessions_cut"] is None:
        line += f" (broker not confirmed: {result['broker_note']}; it applies the change on its next tick)"
    elif result["sessions_cut"]:
        line += f" ({result['sessions_cut']} live session(s) cut)"
    return line
