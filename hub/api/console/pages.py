"""The console's server-rendered pages (Jinja2, autoescape on): overview, devices, device, jobs, job, tokens, audit.

Pages only read, through the API's own query functions (hub/api/queries.py, auditroutes, hub/jobs/store). Every
action on a page is a button that the browser's script turns into a JSON call to the fleet API (same client
certificate), so it is authorized and audited there; a role without the `act` permission gets no action buttons.
Every response carries the console's security headers (CSP without inline script, no framing, no referrer).
"""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from hub.api import auditroutes, queries
from hub.api.queries import BadRequest, NotFound, Selector
from hub.registry.store import DEVICE_STATUSES

from . import data

HERE = Path(__file__).parent
ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")), autoescape=True,
                         trim_blocks=True, lstrip_blocks=True)


def _t(value: Any) -> str:
    """A stored timestamp ('2027-01-31T05:06:07.123456+00:00') as '2027-01-31 05:06:07Z'; '—' for none."""
    if not value:
        return "—"
    text = str(value)
    return f"{text[:10]} {text[11:19]}Z" if len(text) >= 19 and text[10] == "T" else text


def _age(seconds: Any) -> str:
    s = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if abs(s) >= size:
            return f"{s // size} {unit}"
    return f"{s} s"


ENV.filters.update(t=_t, age=_age)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
PAGE = 50
FILTER_KEYS = ("status", "group", "label", "online", "id_prefix")
AUDIT_KEYS = ("device", "actor", "action", "since")
_caches: dict[int, dict] = {}


def render(name: str, principal, **ctx: Any) -> web.Response:
    perms = principal.permissions if principal is not None else frozenset()
    html = ENV.get_template(name).render(who=principal, can_act="act" in perms, can_admin="admin" in perms,
                                         statuses=DEVICE_STATUSES, **ctx)
    return web.Response(text=html, content_type="text/html", charset="utf-8", headers=SECURITY_HEADERS)


def _clean(request: web.Request, keys: tuple[str, ...]) -> dict[str, str]:
    """The non-empty query parameters among `keys` (a form submits empty fields)."""
    return {k: v.strip() for k, v in request.query.items() if k in keys and v.strip()}


async def root(api, request: web.Request, principal) -> web.Response:
    raise web.HTTPFound("/console/")


# --- overview -------------------------------------------------------------------------------------------------

def _overview(api) -> dict[str, Any]:
    reg, now = api.registry, api.clock()
    cache = _caches.setdefault(id(api), {})
    admin = getattr(api.live, "admin", None)
    return {"counts": data.device_counts(reg),
            "expiring": {d: data.expiring(reg, now, d) for d in (7, 30)},
            "crl": data.crl_age(api.cfg, now, cache),
            "broker_ok": bool(api.live.broker.healthy()),
            "broker_clients": getattr(admin, "broker_clients", None),
            "chart": data.chart_bars(data.est_chart(reg, now)),
            "jobs": data.active_jobs(reg),
            "recent": auditroutes.query_audit(reg, {"limit": "12"})["items"]}


async def overview(api, request: web.Request, principal) -> web.Response:
    ctx = await api.run(_overview, api)
    return render("overview.html", principal, title="Overview", nav="overview",
                  events="/console/events?presence=1&audit=1&counts=1", **ctx)


# --- devices --------------------------------------------------------------------------------------------------

async def devices(api, request: web.Request, principal) -> web.Response:
    filters = _clean(request, FILTER_KEYS)
    sort = request.query.get("sort") or "id"
    cursor = request.query.get("cursor") or None
    items, next_cursor, error = [], None, None
    try:
        sort = queries.parse_sort(sort)
        sel = Selector.parse(filters)
        after = queries.decode_cursor(cursor, sort) if cursor else None
        items, next_cursor = await api.run(queries.list_devices, api.registry, sel, PAGE, after, sort)
    except BadRequest as exc:
        error = str(exc)
    selector = {k: (v == "true" if k == "online" else v) for k, v in filters.items()}
    next_q = {**filters, "sort": sort, "cursor": next_cursor} if next_cursor else None
    return render("devices.html", principal, title="Devices", nav="devices", items=items, filters=filters,
                  sort=sort, sorts=queries.SORTS, error=error, next_q=next_q, first_page=cursor is None,
                  selector=json.dumps(selector), events="/console/events?presence=1")


def _device(api, device_id: str) -> dict[str, Any]:
    device = queries.get_device(api.registry, device_id)
    if device is None:
        raise NotFound(f"no device {device_id!r}")
    tap = _caches.setdefault(id(api), {}).get("tap")
    telemetry = tap.get(device_id) if tap is not None else None
    if telemetry is not None:
        try:
            telemetry["pretty"] = json.dumps(json.loads(telemetry["payload"]), indent=2, ensure_ascii=False)
        except ValueError:
            telemetry["pretty"] = telemetry["payload"]
    return {"device": device, "certificates": api.registry.certificates_of(device_id),
            "history": data.presence_history(api.registry, device_id),
            "audit": auditroutes.query_audit(api.registry, {"device": device_id, "limit": "30"})["items"],
            "telemetry": telemetry}


async def device(api, request: web.Request, principal) -> web.Response:
    device_id = request.match_info["id"]
    if not queries._PREFIX_RE.fullmatch(device_id):  # noqa: SLF001  (the device id rule)
        raise NotFound(f"no device {device_id[:64]!r}")
    ctx = await api.run(_device, api, device_id)
    return render("device.html", principal, title=device_id, nav="devices",
                  events=f"/console/events?presence=1&audit=1&device={device_id}", **ctx)


# --- jobs -----------------------------------------------------------------------------------------------------

async def jobs(api, request: web.Request, principal) -> web.Response:
    items = await api.run(data.active_jobs, api.registry, 50)
    return render("jobs.html", principal, title="Jobs", nav="jobs", items=items,
                  events="/console/events?" + "&".join(f"job={j['id']}" for j in items[:20]))


def _job(api, job_id: int) -> dict[str, Any]:
    from hub.jobs import store

    job = store.get_job(api.registry, job_id)
    devices, _ = store.list_job_devices(api.registry, job_id, 100)
    return {"job": job, "devices": devices}


async def job(api, request: web.Request, principal) -> web.Response:
    raw = request.match_info["job"]
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise NotFound(f"no job {raw[:40]!r}")
    ctx = await api.run(_job, api, int(raw))
    return render("job.html", principal, title=f"Job {raw}", nav="jobs", events=f"/console/events?job={raw}",
                  **ctx)


# --- tokens ---------------------------------------------------------------------------------------------------

async def tokens(api, request: web.Request, principal) -> web.Response:
    ttl = api.cfg.policy.token_ttl
    return render("tokens.html", principal, title="Tokens", nav="tokens",
                  ttl_hours=int(ttl / timedelta(hours=1)) if ttl else None, events="")


# --- audit ----------------------------------------------------------------------------------------------------

async def audit(api, request: web.Request, principal) -> web.Response:
    params = _clean(request, AUDIT_KEYS)
    if request.query.get("cursor"):
        params["cursor"] = request.query["cursor"]
    page, error = {"items": [], "next_cursor": None}, None
    try:
        page = await api.run(auditroutes.query_audit, api.registry, params)
    except BadRequest as exc:
        error = str(exc)
    filters = {k: v for k, v in params.items() if k != "cursor"}
    live = not params  # the newest page, unfiltered: new rows stream in
    return render("audit.html", principal, title="Audit log", nav="audit", items=page["items"], filters=filters,
                  error=error, next_q={**filters, "cursor": page["next_cursor"]} if page["next_cursor"] else None,
                  events="/console/events?audit=1" if live else "")


async def audit_csv(api, request: web.Request, principal) -> web.StreamResponse:
    """Every matching audit row, newest first, streamed a keyset page at a time (CSV; cells that a spreadsheet
    would run as a formula are prefixed with a quote)."""
    params = _clean(request, AUDIT_KEYS)
    first = await api.run(auditroutes.query_audit, api.registry, {**params, "limit": "1000"})  # BadRequest: 400
    resp = web.StreamResponse(headers={"Content-Type": "text/csv; charset=utf-8", "X-Content-Type-Options": "nosniff",
                                       "Content-Disposition": 'attachment; filename="audit.csv"'})
    await resp.prepare(request)
    columns = ("id", "at", "actor", "action", "device_id", "outcome", "detail", "source")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(columns)
    page = first
    while True:
        for row in page["items"]:
            writer.writerow([_cell(row[c]) for c in columns])
        await resp.write(buf.getvalue().encode())
        buf.seek(0)
        buf.truncate()
        if not page["next_cursor"]:
            break
        page = await api.run(auditroutes.query_audit, api.registry,
                             {**params, "limit": "1000", "cursor": page["next_cursor"]})
    await resp.write_eof()
    return resp


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
