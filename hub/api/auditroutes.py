"""The fleet API's audit log route: GET /api/v1/audit, newest first, filtered by device, actor, action, time and
whether to show the API's own per-call rows (action `api.<route>`); and GET /api/v1/audit/verify (admin), the
hash chain's check.

Every filter is served by an index (`AUDIT_SCHEMA`, applied by `apply_schema`; idempotent): device -> the registry's
audit(device_id, id), actor -> audit(actor, id), action -> audit(action, id), since -> audit(at) bounding the id
range. Paging is keyset on the row id (`id < last ORDER BY id DESC LIMIT n`), never OFFSET.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import weakref

from aiohttp import web

from hub.registry.store import Registry

from .queries import BadRequest, NotFound, parse_time
from .routing import PREFIX, Route, json_response, q, query_params

AUDIT_SCHEMA = (
    """CREATE INDEX IF NOT EXISTS audit_actor ON audit(actor, id)""",
    """CREATE INDEX IF NOT EXISTS audit_action ON audit(action, id)""",
    """CREATE INDEX IF NOT EXISTS audit_at ON audit(at)""",
)
MAX_LIMIT = 1000
API_CALLS = ("include", "exclude", "only")  # the API's own rows (api.<route>), one per call
DEFAULT_LIMIT = 50
_TEXT_RE = re.compile(r"[\x21-\x7e]{1,128}")
_DEVICE_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_LIMIT_RE = re.compile(r"[0-9]{1,7}")
_CURSOR_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_applied: weakref.WeakSet = weakref.WeakSet()  # registries (not ids: a freed registry's id is reused)


def apply_schema(registry: Registry) -> None:
    """The audit route's indexes (idempotent; once per registry object)."""
    if registry in _applied:
        return
    with registry.write() as db:
        for statement in AUDIT_SCHEMA:
            db.execute(statement)
    _applied.add(registry)


def encode_cursor(before_id: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"before": before_id}).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    if _CURSOR_RE.fullmatch(cursor):
        try:
            data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii"))
        except (binascii.Error, ValueError, RecursionError):
            data = None
        if isinstance(data, dict) and set(data) == {"before"} and type(data["before"]) is int \
                and 0 < data["before"] < 2 ** 62:
            return data["before"]
    raise BadRequest("invalid cursor: use the next_cursor of a previous page", "cursor")


def query_audit(registry: Registry, params: dict[str, str]) -> dict:
    """One page of audit rows, newest first; the cursor for the next (older) page, None on the last."""
    unknown = set(params) - {"device", "actor", "action", "since", "limit", "cursor", "api_calls"}
    if unknown:
        raise BadRequest(f"unknown parameter {sorted(unknown)[0]!r} (device, actor, action, since, api_calls, limit, "
                         "cursor)", sorted(unknown)[0])
    conds, args = [], []
    calls = params.get("api_calls", "include")
    if calls not in API_CALLS:
        raise BadRequest(f"api_calls must be one of {', '.join(API_CALLS)}", "api_calls")
    if calls != "include":  # the API's own per-call rows are the actions api.*
        conds.append("(action >= 'api.' AND action < 'api/')" if calls == "only" else
                     "(action < 'api.' OR action >= 'api/')")
    if "device" in params:
        if not _DEVICE_RE.fullmatch(params["device"]):
            raise BadRequest("device must be a device id (a-z, 0-9 and '-', up to 63 characters)", "device")
        conds.append("device_id = ?")
        args.append(params["device"])
    for key, column in (("actor", "actor"), ("action", "action")):
        if key in params:
            if not _TEXT_RE.fullmatch(params[key]):
                raise BadRequest(f"{key} must be 1-128 printable ASCII characters without spaces", key)
            conds.append(f"{column} = ?")
            args.append(params[key])
    if "since" in params:
        since = parse_time(params["since"], "since")
        conds.append("id >= coalesce((SELECT id FROM audit WHERE at >= ? ORDER BY at LIMIT 1), 9223372036854775807)")
        args.append(since)
    limit = DEFAULT_LIMIT
    if "limit" in params:
        if not _LIMIT_RE.fullmatch(params["limit"]) or not 1 <= int(params["limit"]) <= MAX_LIMIT:
            raise BadRequest(f"limit must be an integer 1-{MAX_LIMIT}", "limit")
        limit = int(params["limit"])
    if "cursor" in params:
        conds.append("id < ?")
        args.append(decode_cursor(params["cursor"]))
    where = " AND ".join(conds) or "1 = 1"
    rows = registry.query(f"SELECT id, at, actor, action, device_id, outcome, detail, source FROM audit "
                          f"WHERE {where} ORDER BY id DESC LIMIT ?", [*args, limit + 1])
    page = rows[:limit]
    return {"items": page, "next_cursor": encode_cursor(page[-1]["id"]) if len(rows) > limit else None}


def known_device(registry: Registry, device_id: str) -> bool:
    """A registered device (decommissioned ones too: their rows stay), or an id some audit row names (e.g. an
    enrollment attempt for an id never registered)."""
    return bool(registry.query("SELECT 1 FROM devices WHERE id = ? UNION ALL "
                               "SELECT 1 FROM audit WHERE device_id = ? LIMIT 1", [device_id, device_id]))


def audit_page(registry: Registry, params: dict[str, str]) -> dict:
    """GET /audit: `query_audit`, and a 404 for a device filter naming an id the hub has never heard of (an
    empty page would read as "nothing happened to it")."""
    page = query_audit(registry, params)
    if not page["items"] and "device" in params and "cursor" not in params \
            and not known_device(registry, params["device"]):
        raise NotFound(f"no device {params['device']!r}")
    return page


async def audit(api, request: web.Request, principal) -> web.Response:
    params = query_params(request)
    await api.run(apply_schema, api.registry)
    return json_response(await api.run(audit_page, api.registry, params))


def verify_chain(registry: Registry) -> dict:
    """GET /audit/verify: recompute the HMAC chain over every row (hub/registry/audit.py)."""
    v = registry.verify_audit()
    return {"ok": v.ok, "checked": v.checked, "before_chain": v.before_chain, "head_id": v.head_id,
            "head_mac": v.head_mac, "broken_at": v.broken_at, "why": v.why or None}


async def verify(api, request: web.Request, principal) -> web.Response:
    if request.query:
        raise BadRequest("GET /audit/verify takes no parameters", sorted(request.query)[0])
    return json_response(await api.run(verify_chain, api.registry))


_NULLABLE = {"type": ["string", "null"]}
SCHEMAS: dict[str, dict] = {
    "AuditEntry": {"type": "object", "required": ["id", "at", "actor", "action", "outcome"],
                   "properties": {"id": {"type": "integer"}, "at": {"type": "string"}, "actor": {"type": "string"},
                                  "action": {"type": "string"}, "device_id": _NULLABLE,
                                  "outcome": {"type": "string"}, "detail": _NULLABLE, "source": _NULLABLE}},
    "AuditPage": {"type": "object", "required": ["items", "next_cursor"],
                  "properties": {"items": {"type": "array", "items": {"$ref": "#/components/schemas/AuditEntry"}},
                                 "next_cursor": _NULLABLE}},
    "AuditVerdict": {"type": "object",
                     "required": ["ok", "checked", "before_chain", "head_id", "head_mac", "broken_at", "why"],
                     "properties": {"ok": {"type": "boolean"}, "checked": {"type": "integer"},
                                    "before_chain": {"type": "integer"}, "head_id": {"type": ["integer", "null"]},
                                    "head_mac": _NULLABLE, "broken_at": {"type": ["integer", "null"]},
                                    "why": _NULLABLE}},
}
_PRINTABLE = {"type": "string", "pattern": "^[\\x21-\\x7e]{1,128}$"}
ROUTES: tuple[Route, ...] = (
    Route("GET", f"{PREFIX}/audit", "audit.list", "read",
          "The audit log, newest first (keyset paging by row id): every API call, enroll, renew, revoke, denial",
          audit, params=(
              q("device", {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,62}$"}, "rows about this device"),
              q("actor", _PRINTABLE, "rows by this principal (e.g. svc.alice, tessera-hub, est)"),
              q("action", _PRINTABLE, "rows of this action (e.g. device.revoked, api.devices.list)"),
              q("since", {"type": "string", "format": "date-time"}, "rows at or after this time"),
              q("api_calls", {"type": "string", "enum": list(API_CALLS), "default": "include"},
                "the API's own rows (action api.<route>, one per call): include, exclude or only them"),
              q("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
                "page size"),
              q("cursor", {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                "next_cursor of the previous page")),
          response="AuditPage", errors=(400, 403, 404)),
    Route("GET", f"{PREFIX}/audit/verify", "audit.verify", "admin",
          "Recompute the audit log's HMAC chain: rows checked, the head (last id and mac: compare it with one you "
          "kept, to see rows cut off the end) and the first row that does not verify", verify,
          response="AuditVerdict", errors=(400, 403)),
)
