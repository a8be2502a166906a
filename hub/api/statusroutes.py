"""The fleet API's single-device status change: POST /api/v1/devices/{id}/status (suspend, resume, revoke).

The one-device path of `tessera-hub device suspend|resume|revoke` (the stolen-device command): one request, no dry
run, the registry's own semantics (`Registry.set_status`: setting the current status is a no-op, revoked and
decommissioned are final -> 409, resuming a device that never enrolled makes it pending). The commit is followed
by a broker sync (live sessions cut now, counted), presence set offline, a CRL publication request and an
`device.<status>.enforced` audit row, as for the bulk actions of hub/api/routes.py.
"""

from __future__ import annotations

import time

from aiohttp import web

from hub.broker import BrokerError
from hub.ca.policy import PolicyError, check_device_id
from hub.registry.store import DeviceNotActive, UnknownDevice
from hub.serve import stats

from .openapi import REASON
from .queries import BadRequest, Conflict, NotFound, get_device
from .routing import PREFIX, Param, Route, check_reason, json_body, json_response

#: action -> the status it sets
STATUSES = {"suspend": "suspended", "resume": "active", "revoke": "revoked"}


def _commit(api, device_id: str, status: str, reason: str, actor: str) -> tuple[int, dict]:
    before = api.registry.authz_seq()
    try:
        return before, api.registry.set_status(device_id, status, api.clock(), actor=actor, reason=reason)
    except UnknownDevice as exc:
        raise NotFound(str(exc)) from None
    except DeviceNotActive as exc:
        raise Conflict(str(exc)) from None


async def change_status(api, request: web.Request, principal) -> web.Response:
    device_id = request.match_info["id"]
    try:  # the one device id rule, here rather than in the CLI's fast path (hub.ca.policy costs it ~8 ms)
        check_device_id(device_id)
    except PolicyError as exc:
        raise BadRequest(str(exc), "id") from None
    body = await json_body(request)
    unknown = set(body) - {"action", "reason"}
    if unknown:
        raise BadRequest(f"unknown fields {sorted(unknown)} (a status change has action and reason)", "body")
    action = body.get("action")
    if action not in STATUSES:
        raise BadRequest(f"action must be one of {', '.join(STATUSES)}", "action")
    reason = check_reason(body.get("reason", ""))
    status = STATUSES[action]
    t0 = time.monotonic()
    before = await api.run(get_device, api.registry, device_id)
    seq, result = await api.run(_commit, api, device_id, status, reason, principal.name)
    t_registry = time.monotonic()
    changed = before is not None and before["status"] != result["device"]["status"]
    kicked, note = None, ""
    if changed:
        try:
            kicked = (await api.run(lambda: api.live.broker.sync(after=seq))).kicked
        except BrokerError as exc:  # the plugin follows the registry's events by itself within a broker tick
            note = str(exc)
        stats.of(api.registry).enforced(status, time.monotonic() - t_registry, not note)
        if status != "active":
            await api.run(api.registry.mark_presence, device_id, False, api.clock())  # a kick sends no will
        api.live.crl.changed()
    t_sync = time.monotonic()
    timings = {"registry_ms": (t_registry - t0) * 1000, "sync_ms": (t_sync - t_registry) * 1000,
               "total_ms": (t_sync - t0) * 1000}
    if changed:
        await api.run(api.audit, f"device.{status}.enforced", "ok" if not note else "error", principal.name,
                      f"sessions cut: {kicked if kicked is not None else 'pending'}; {timings['total_ms']:.0f} ms"
                      + (f"; {note}" if note else ""), device_id, request.remote)
    device = await api.run(get_device, api.registry, device_id)
    return json_response({"device": device, "changed": changed, "revoked_serials": result["revoked_serials"],
                          "sessions_cut": kicked, "broker_note": note or None, "timings": timings})


SCHEMAS: dict[str, dict] = {
    "StatusChange": {"type": "object", "required": ["action"], "additionalProperties": False,
                     "properties": {"action": {"type": "string", "enum": list(STATUSES)}, "reason": REASON}},
    "StatusChanged": {
        "type": "object", "required": ["device", "changed", "revoked_serials", "sessions_cut", "broker_note",
                                       "timings"],
        "properties": {"device": {"$ref": "#/components/schemas/Device"}, "changed": {"type": "boolean"},
                       "revoked_serials": {"type": "array", "items": {"type": "string"}},
                       "sessions_cut": {"type": ["integer", "null"]}, "broker_note": {"type": ["string", "null"]},
                       "timings": {"type": "object", "additionalProperties": {"type": "number"}}}},
}
ROUTES: tuple[Route, ...] = (
    Route("POST", f"{PREFIX}/devices/{{id}}/status", "devices.status", "act",
          "Suspend, resume or revoke one device now (an invalid device id is a 400; revoked and decommissioned are "
          "final: 409); its live sessions are cut before the answer", change_status,
          params=(Param("id", "path", {"type": "string"}, "device id", required=True),),
          body="StatusChange", response="StatusChanged", errors=(400, 403, 404, 409)),
)
