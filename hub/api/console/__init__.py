"""The Tessera fleet console: a web UI served on the fleet API's listener, operators logged in by client certificate.

`ROUTES` (pages, the live event stream, static files) are served by hub/api/server.py `make_app` through the same
`endpoint` as the API: the verified client certificate is the login, the role decides (every page needs `read`;
action buttons are rendered for `act` only, and the API refuses them anyway), each page view is audited. They are
not part of the API's route table (hub/api/routes.py `all_routes`), so the OpenAPI document stays the API.
`attach(app, api)` starts the live feed with the app and ends every stream on shutdown.
"""

from __future__ import annotations

import mimetypes
import re
from pathlib import Path

from aiohttp import web

from hub.api.routing import Param, Route

from . import data, pages
from .feed import Feed, Stream

STATIC = Path(__file__).parent / "static"
_STATIC_FILES = {p.name for p in STATIC.iterdir() if p.is_file()} if STATIC.is_dir() else set()
_JOB_RE = re.compile(r"[0-9]{1,18}")
_feeds: dict[int, Feed] = {}


async def events(api, request: web.Request, principal) -> web.StreamResponse:
    """Server-sent events: ?presence=1 &audit=1 &counts=1 &device=ID (only that device) &job=N (repeatable)."""
    feed = _feeds.get(id(api))
    if feed is None:
        raise web.HTTPServiceUnavailable(text="the live feed is not running")
    q = request.query
    device = q.get("device") or None
    if device is not None and not pages.queries._PREFIX_RE.fullmatch(device):  # noqa: SLF001
        raise pages.BadRequest("device must be a device id", "device")
    jobs = q.getall("job", [])
    if len(jobs) > 50 or not all(_JOB_RE.fullmatch(j) for j in jobs):
        raise pages.BadRequest("job must be up to 50 job ids", "job")
    stream = Stream(presence=q.get("presence") == "1", audit=q.get("audit") == "1",
                    jobs=frozenset(int(j) for j in jobs), device=device, counts=q.get("counts") == "1")
    return await feed.serve(request, stream, [])


async def static(api, request: web.Request, principal) -> web.Response:
    name = request.match_info["name"]
    if name not in _STATIC_FILES:
        raise web.HTTPNotFound()
    ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return web.Response(body=(STATIC / name).read_bytes(), content_type=ctype,
                        headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"})


def attach(app: web.Application, api) -> None:
    """Start the feed (and the telemetry tap) with the app; end every stream before the server shuts down."""
    feed = Feed(api)
    tap = data.TelemetryTap()

    async def start(app: web.Application) -> None:
        _feeds[id(api)] = feed
        pages._caches.setdefault(id(api), {})["tap"] = tap  # noqa: SLF001
        if getattr(api.live, "admin", None) is not None:  # a running hub (not the CLI's in-process API)
            tap.attach(api.live, api.clock)
            await feed.start()

    async def stop(app: web.Application) -> None:
        await feed.stop()
        _feeds.pop(id(api), None)
        pages._caches.pop(id(api), None)  # noqa: SLF001

    app.on_startup.append(start)
    app.on_shutdown.append(stop)


_ID = Param("id", "path", {"type": "string"}, "device id", required=True)
_JOB = Param("job", "path", {"type": "string"}, "job id", required=True)
ROUTES: tuple[Route, ...] = (
    Route("GET", "/", "console.root", None, "To the console", pages.root, content_type="text/html"),
    Route("GET", "/console/", "console.overview", "read", "Overview", pages.overview, content_type="text/html"),
    Route("GET", "/console/devices", "console.devices", "read", "Devices", pages.devices, content_type="text/html"),
    Route("GET", "/console/devices/{id}", "console.device", "read", "A device", pages.device, params=(_ID,),
          content_type="text/html"),
    Route("GET", "/console/jobs", "console.jobs", "read", "Jobs", pages.jobs, content_type="text/html"),
    Route("GET", "/console/jobs/{job}", "console.job", "read", "A job", pages.job, params=(_JOB,),
          content_type="text/html"),
    Route("GET", "/console/tokens", "console.tokens", "read", "Tokens and factory batches", pages.tokens,
          content_type="text/html"),
    Route("GET", "/console/audit", "console.audit", "read", "Audit log", pages.audit, content_type="text/html"),
    Route("GET", "/console/audit.csv", "console.audit_csv", "read", "Audit log export", pages.audit_csv,
          content_type="text/csv"),
    Route("GET", "/console/events", "console.events", "read", "Live events", events,
          content_type="text/event-stream"),
    Route("GET", "/console/static/{name}", "console.static", None, "Static files", static),
)
