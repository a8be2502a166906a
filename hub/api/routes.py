"""The fleet API's device routes (list, show, add, edit, tokens, decommission, bulk actions, health) and the ONE
route table (`ROUTES`) that joins every route module's routes for the server and the OpenAPI document."""

from __future__ import annotations

import csv
import io
import time
from typing import Callable

from aiohttp import web

from hub.broker import BrokerError
from hub.registry.store import DEVICE_STATUSES
from hub.serve import stats

from . import actions, queries
from .openapi import LABEL_PATTERN, NAME_PATTERN, REASON
from .queries import MAX_LIMIT, BadRequest, NotFound, Selector
from .routing import PREFIX, REASON_RE, Param, Route, json_body, json_response, page_limit, q, query_params

# --- handlers -------------------------------------------------------------------------------------------------------

async def list_devices(api, request: web.Request, principal) -> web.StreamResponse:
    q = query_params(request)
    fmt = q.pop("format", "json")
    if fmt not in ("json", "csv"):
        raise BadRequest("format must be json or csv", "format")
    limit = page_limit(q.pop("limit", None))
    sort = queries.parse_sort(q.pop("sort", None))
    cursor = q.pop("cursor", None)
    after = queries.decode_cursor(cursor, sort) if cursor is not None else None
    sel = Selector.parse(q)
    if fmt == "csv":
        return await _csv(api, request, sel, after, sort)
    items, next_cursor = await api.run(queries.list_devices, api.registry, sel, limit, after, sort)
    return json_response({"items": items, "next_cursor": next_cursor})


async def _csv(api, request: web.Request, sel: Selector, after: queries.Position | None,
               sort: str) -> web.StreamResponse:
    """Every matching device (from the cursor on), streamed a keyset page at a time."""
    resp = web.StreamResponse(headers={"Content-Type": "text/csv; charset=utf-8",
                                       "Content-Disposition": 'attachment; filename="devices.csv"'})
    await resp.prepare(request)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(queries.DEVICE_COLUMNS)
    while True:
        items, cursor = await api.run(queries.list_devices, api.registry, sel, 1000, after, sort)
        for d in items:
            writer.writerow([d["id"], d["status"], ";".join(d["groups"]),
                             ";".join(f"{k}={v}" for k, v in sorted(d["labels"].items())),
                             "true" if d["online"] else "false", d["last_seen"] or "", d["created"],
                             d["cert_not_after"] or ""])
        await resp.write(buf.getvalue().encode())
        buf.seek(0)
        buf.truncate()
        if cursor is None:
            break
        after = queries.decode_cursor(cursor, sort)
    await resp.write_eof()
    return resp


def _detail(api, device_id: str) -> dict:
    device = queries.get_device(api.registry, device_id)
    if device is None:
        raise NotFound(f"no device {device_id!r}")
    return {**device, "certificates": api.registry.certificates_of(device_id)}


async def show_device(api, request: web.Request, principal) -> web.Response:
    return json_response(await api.run(_detail, api, request.match_info["id"]))


async def patch_device(api, request: web.Request, principal) -> web.Response:
    device_id = request.match_info["id"]
    body = await json_body(request)
    done = await api.run(actions.patch_device, api.registry, device_id, body, api.clock(), principal.name,
                         request.remote)
    if done["groups_changed"]:
        await _ring(api)
    return json_response(await api.run(_detail, api, device_id))


async def create_devices(api, request: web.Request, principal) -> web.Response:
    body = await json_body(request)
    result = await api.run(actions.create_devices, api.registry, body, api.cfg.fleet, api.clock(),
                           api.cfg.policy.token_ttl, principal.name)
    return json_response(result, status=201)


async def device_token(api, request: web.Request, principal) -> web.Response:
    result = await api.run(actions.new_token, api.registry, request.match_info["id"], api.clock(),
                           api.cfg.policy.token_ttl, principal.name)
    return json_response(result, status=201)


async def decommission_device(api, request: web.Request, principal) -> web.Response:
    device_id = request.match_info["id"]
    q = query_params(request)
    unknown = set(q) - {"reason"}
    if unknown:
        raise BadRequest(f"unknown parameters {sorted(unknown)}", sorted(unknown)[0])
    reason = q.get("reason", "")
    if not REASON_RE.fullmatch(reason):
        raise BadRequest("reason must be at most 200 printable ASCII characters", "reason")
    before = await api.run(queries.get_device, api.registry, device_id)
    seq_before = await api.run(api.registry.authz_seq)
    result = await api.run(actions.decommission, api.registry, device_id, api.clock(), principal.name, reason)
    kicked, note = None, ""
    if before is not None and before["status"] != "decommissioned":
        t_commit = time.monotonic()
        kicked, note = await _ring(api, seq_before)  # its live sessions end now
        stats.of(api.registry).enforced("decommissioned", time.monotonic() - t_commit, not note)
        if result["revoked_serials"]:
            api.live.crl.changed()
        await api.run(api.audit, "device.decommissioned.enforced", "ok" if not note else "error", principal.name,
                      f"sessions cut: {kicked}{f'; {note}' if note else ''}", device_id, request.remote)
    return json_response({**(await api.run(_detail, api, device_id)), "revoked_serials": result["revoked_serials"],
                  "sessions_cut": kicked, "broker_note": note or None})


async def _ring(api, after: int | None = None) -> tuple[int | None, str]:
    """Ask the broker to apply the committed authz events now: (sessions cut, '' or why it was not confirmed).
    `after`: the authz event seq read before the commit, so the count includes the sessions the plugin's own tick
    cut first (it follows the registry by itself within 100 ms). Unconfirmed is not lost either way."""
    try:
        return (await api.run(lambda: api.live.broker.sync(after=after))).kicked, ""
    except BrokerError as exc:
        return None, str(exc)


def _bulk(action: str) -> Callable:
    async def handler(api, request: web.Request, principal) -> web.Response:
        body = await json_body(request)
        unknown = set(body) - {"selector", "reason", "confirm_count"}
        if unknown:
            raise BadRequest(f"unknown fields {sorted(unknown)}", "body")
        raw = body.get("selector")
        if not isinstance(raw, dict):
            raise BadRequest("selector must be an object of filters, or {\"ids\": [...]}", "selector")
        sel = Selector.parse(raw, allow_ids=True)
        if sel.empty():
            raise BadRequest("the selector needs at least one filter or ids", "selector")
        reason = body.get("reason", "")
        if not isinstance(reason, str) or not REASON_RE.fullmatch(reason):
            raise BadRequest("reason must be at most 200 printable ASCII characters", "reason")
        confirm = body.get("confirm_count")
        if confirm is None:
            return json_response({"matched": await api.run(queries.count, api.registry, sel), "dry_run": True})
        if isinstance(confirm, float) and confirm.is_integer():  # JSON Schema: 3.0 is an integer
            confirm = int(confirm)
        if isinstance(confirm, bool) or not isinstance(confirm, int) or confirm < 0:
            raise BadRequest("confirm_count must be a non-negative integer (the dry run's count)", "confirm_count")
        t0 = time.monotonic()
        seq_before = await api.run(api.registry.authz_seq)
        result = await api.run(actions.bulk_status, api.registry, action, sel, confirm, reason, api.clock(),
                               principal.name, request.remote)
        t_registry = time.monotonic()
        kicked, note = None, ""
        if result["changed"]:
            kicked, note = await _ring(api, seq_before)  # ONE broker sync for the whole batch
            stats.of(api.registry).enforced(actions.ACTIONS[action], time.monotonic() - t_registry, not note)
            api.live.crl.changed()  # one CRL publication (coalesced by the publisher)
        total_ms = (time.monotonic() - t0) * 1000
        await api.run(api.audit, f"devices.{action}.enforced", "ok" if not note else "error", principal.name,
                      f"{len(result['changed'])} devices; sessions cut: {kicked}; {total_ms:.0f} ms {note}".strip(),
                      None, request.remote)
        return json_response({"matched": result["matched"], "changed": len(result["changed"]), "skipped": result["skipped"],
                      "revoked_certificates": result["revoked_certificates"], "dry_run": False,
                      "sessions_cut": kicked, "broker_note": note or None,
                      "timings": {"registry_ms": (t_registry - t0) * 1000, "total_ms": total_ms}})
    return handler


async def openapi(api, request: web.Request, principal) -> web.Response:
    from .openapi import document

    return json_response(document(all_routes()))


async def metrics(api, request: web.Request, principal) -> web.Response:
    from .metrics import render

    body, content_type = await api.run(render, api)
    return web.Response(body=body, headers={"Content-Type": content_type})


async def healthz(api, request: web.Request, principal) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(api, request: web.Request, principal) -> web.Response:
    from .server import problem

    if await api.run(api.live.broker.healthy):
        return json_response({"status": "ready"})
    return problem(503, "Service Unavailable", "the broker is not running", "not_ready")


# --- the table ------------------------------------------------------------------------------------------------------

_TIME = {"type": "string", "format": "date-time"}
_NAME = {"type": "string", "pattern": NAME_PATTERN}
FILTER_PARAMS = (
    q("status", {"type": "string", "enum": list(DEVICE_STATUSES)}, "device status"),
    q("group", _NAME, "member of this group"),
    q("label", {"type": "string", "pattern": LABEL_PATTERN}, "label key=value"),
    q("online", {"type": "string", "enum": ["true", "false"]}, "connected to the broker now"),
    q("id_prefix", _NAME, "device id starts with this"),
    q("cert_expires_before", _TIME, "the active certificate expires before this time"),
    q("last_seen_before", _TIME, "last seen before this time (never-seen devices do not match)"),
)
_ID = Param("id", "path", {"type": "string"}, "device id", required=True)

DEVICE_ROUTES: tuple[Route, ...] = (
    Route("GET", f"{PREFIX}/openapi.json", "openapi", "read", "This OpenAPI document", openapi,
          response="OpenApiDocument"),
    Route("GET", f"{PREFIX}/devices", "devices.list", "read",
          "List devices (filters, sort, keyset paging; format=csv streams every match)", list_devices,
          params=(*FILTER_PARAMS,
                  q("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 100}, "page size"),
                  q("sort", {"type": "string", "enum": list(queries.SORTS), "default": "id"},
                    "order: id, created, last_seen (never seen first) or cert_expires (only devices with an active "
                    "certificate); a leading '-' reverses it"),
                  q("cursor", {"type": "string", "minLength": 1, "maxLength": queries.MAX_CURSOR,
                              "pattern": "^[A-Za-z0-9_-]+$"},
                     "next_cursor of the previous page with the same sort (absent for the first page; an empty or "
                     "altered cursor is a 400)"),
                  q("format", {"type": "string", "enum": ["json", "csv"], "default": "json"}, "json or csv")),
          response="DevicePage", also=("text/csv",), errors=(400, 403)),
    Route("POST", f"{PREFIX}/devices", "devices.create", "act",
          "Register one device or a batch (at most 10,000, one transaction): each is pending, with a one-time "
          "enrollment token answered only here", create_devices, body="DeviceCreate", response="DevicesCreated",
          errors=(400, 403, 409), success=201),
    Route("POST", f"{PREFIX}/devices/{{id}}/token", "devices.token", "act",
          "A fresh one-time enrollment token for a pending or active device (its unused older ones stop working)",
          device_token, params=(_ID,), response="TokenIssued", errors=(403, 404, 409), success=201),
    Route("DELETE", f"{PREFIX}/devices/{{id}}", "devices.decommission", "admin",
          "Decommission a device for good: certificates revoked (cessationOfOperation), tokens void, live sessions "
          "cut; the device row and its audit trail are kept", decommission_device,
          params=(_ID, q("reason", REASON, "why (kept in the audit log)")),
          response="Decommissioned", errors=(400, 403, 404)),
    Route("GET", f"{PREFIX}/devices/{{id}}", "devices.show", "read", "One device and its certificates",
          show_device, params=(_ID,), response="DeviceDetail", errors=(403, 404)),
    Route("PATCH", f"{PREFIX}/devices/{{id}}", "devices.edit", "act",
          "Replace a device's groups and/or labels (group rights change in live sessions at once)", patch_device,
          params=(_ID,), body="DevicePatch", response="DeviceDetail", errors=(400, 403, 404)),
    *(Route("POST", f"{PREFIX}/devices/actions/{action}", f"devices.{action}", "act",
            f"{action.capitalize()} every device a selector matches: a dry run without confirm_count, else one "
            "transaction if confirm_count is still the match count", _bulk(action),
            body="BulkRequest", response="BulkResult", errors=(400, 403, 409))
      for action in actions.ACTIONS),
    Route("GET", "/metrics", "metrics", "read", "Prometheus metrics", metrics,
          content_type="text/plain; version=0.0.4"),
    Route("GET", "/healthz", "healthz", None, "The API answers (TLS only)", healthz, response="Status", errors=()),
    Route("GET", "/readyz", "readyz", None, "The broker is running (TLS only)", readyz, response="Status",
          errors=(503,)),
)


def all_routes() -> tuple[Route, ...]:
    """Every route of the API: the device routes here, then each route module's `ROUTES` (one table)."""
    from . import auditroutes, identityroutes, statusroutes

    from . import jobroutes

    from . import reportroutes

    from . import manufacturerroutes

    return DEVICE_ROUTES + statusroutes.ROUTES + identityroutes.ROUTES + auditroutes.ROUTES + jobroutes.ROUTES \
        + reportroutes.ROUTES + manufacturerroutes.ROUTES


def all_schemas() -> dict:
    """The OpenAPI component schemas route modules declare (`SCHEMAS`) besides hub/api/openapi.py's COMPONENTS."""
    from . import auditroutes, identityroutes, statusroutes

    from . import jobroutes

    from . import reportroutes

    from . import manufacturerroutes

    return {**statusroutes.SCHEMAS, **identityroutes.SCHEMAS, **auditroutes.SCHEMAS, **jobroutes.SCHEMAS,
            **reportroutes.SCHEMAS, **manufacturerroutes.SCHEMAS}
