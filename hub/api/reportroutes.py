"""The fleet API's report routes: GET /api/v1/reports/expiring, the certificate expiry report (hub/reports/expiry.py)
as JSON pages (keyset cursor) or CSV (every row from the cursor on, streamed a page at a time)."""

from __future__ import annotations

import csv
import io
import re

from aiohttp import web

from hub.reports import expiry

from .queries import BadRequest
from .routing import PREFIX, Route, json_response, q, query_params

DEFAULT_DAYS = 14
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
CSV_COLUMNS = ("device", "serial", "not_after", "days_left", "online", "last_seen", "groups", "verdict", "renew_at",
               "reason")
_PARAMS = ("days", "limit", "cursor", "format", "include_due")
_INT_RE = re.compile(r"[0-9]{1,7}")
_CURSOR_RE = re.compile(r"[A-Za-z0-9_-]{1,200}")


def _int(value: str | None, name: str, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    if not _INT_RE.fullmatch(value) or not low <= int(value) <= high:
        raise BadRequest(f"{name} must be an integer {low}-{high}", name)
    return int(value)


def parse(params: dict[str, str]) -> dict:
    """The report's query parameters, validated (BadRequest names the first bad one)."""
    unknown = sorted(set(params) - set(_PARAMS))
    if unknown:
        raise BadRequest(f"unknown parameter {unknown[0]!r} ({', '.join(_PARAMS)})", unknown[0])
    fmt = params.get("format", "json")
    if fmt not in ("json", "csv"):
        raise BadRequest("format must be json or csv", "format")
    include_due = params.get("include_due", "false")
    if include_due not in ("true", "false"):
        raise BadRequest("include_due must be true or false", "include_due")
    after = None
    if "cursor" in params:
        after = expiry.decode_cursor(params["cursor"]) if _CURSOR_RE.fullmatch(params["cursor"]) else None
        if after is None:
            raise BadRequest("invalid cursor: use the next_cursor of a previous page", "cursor")
    return {"days": _int(params.get("days"), "days", DEFAULT_DAYS, 0, expiry.MAX_DAYS),
            "limit": _int(params.get("limit"), "limit", DEFAULT_LIMIT, 1, MAX_LIMIT), "after": after,
            "format": fmt, "include_due": include_due == "true"}


async def expiring(api, request: web.Request, principal) -> web.StreamResponse:
    p = parse(query_params(request))
    now = api.clock()
    if p["format"] == "csv":
        return await _csv(api, request, p, now)
    items, cursor = await api.run(expiry.expiring, api.registry, now, p["days"], p["limit"], p["after"],
                                  p["include_due"])
    return json_response({"generated_at": now.isoformat(), "days": p["days"], "include_due": p["include_due"],
                          "items": items, "next_cursor": cursor})


async def _csv(api, request: web.Request, p: dict, now) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/csv; charset=utf-8",
                                       "Content-Disposition": 'attachment; filename="expiring.csv"'})
    await resp.prepare(request)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    after = p["after"]
    while True:
        items, cursor = await api.run(expiry.expiring, api.registry, now, p["days"], MAX_LIMIT, after,
                                      p["include_due"])
        for r in items:
            writer.writerow([r["device"], r["serial"], r["not_after"], f"{r['days_left']:.2f}",
                             "true" if r["online"] else "false", r["last_seen"] or "", ";".join(r["groups"]),
                             r["verdict"], r["renew_at"], r["reason"]])
        await resp.write(buf.getvalue().encode())
        buf.seek(0)
        buf.truncate()
        if cursor is None:
            break
        after = expiry.decode_cursor(cursor)
    await resp.write_eof()
    return resp


_NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
SCHEMAS: dict[str, dict] = {
    "ExpiringDevice": {
        "type": "object",
        "required": ["device", "serial", "not_after", "days_left", "online", "last_seen", "groups", "verdict",
                     "renew_at", "reason"],
        "properties": {
            "device": {"type": "string"}, "serial": {"type": "string"},
            "not_after": {"type": "string", "format": "date-time"},
            "days_left": {"type": "number", "description": "negative: expired that many days ago"},
            "online": {"type": "boolean"}, "last_seen": _NULLABLE_TIME,
            "groups": {"type": "array", "items": {"type": "string"}},
            "verdict": {"type": "string", "enum": list(expiry.VERDICTS)},
            "renew_at": {"type": "string", "format": "date-time",
                         "description": "when the agent renews (2/3 of the lifetime)"},
            "reason": {"type": "string", "description": "the verdict in words"},
        },
    },
    "ExpiryReport": {
        "type": "object", "required": ["generated_at", "days", "include_due", "items", "next_cursor"],
        "properties": {
            "generated_at": {"type": "string", "format": "date-time"}, "days": {"type": "integer"},
            "include_due": {"type": "boolean"},
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/ExpiringDevice"}},
            "next_cursor": {"type": ["string", "null"]},
        },
    },
}
ROUTES: tuple[Route, ...] = (
    Route("GET", f"{PREFIX}/reports/expiring", "reports.expiring", "read",
          "Active devices whose certificate expires within `days` (expired ones first), soonest first, each with "
          "the verdict why it will lose it: expired, offline, renewal_overdue (listed by default), renewal_due "
          "(the agent renews it by itself: only with include_due=true)", expiring,
          params=(q("days", {"type": "integer", "minimum": 0, "maximum": expiry.MAX_DAYS, "default": DEFAULT_DAYS},
                    "the window: certificates expiring within this many days from now"),
                  q("include_due", {"type": "string", "enum": ["true", "false"], "default": "false"},
                    "also list devices that will renew by themselves (renewal_due)"),
                  q("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
                    "page size"),
                  q("cursor", {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,200}$"},
                    "next_cursor of the previous page (same days and include_due)"),
                  q("format", {"type": "string", "enum": ["json", "csv"], "default": "json"},
                    "json (a page) or csv (every row from the cursor on)")),
          response="ExpiryReport", also=("text/csv",), errors=(400, 403)),
)
