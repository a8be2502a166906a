"""The fleet API's plumbing shared by every route module: the Route/Param table entries and request helpers.

A route module (hub/api/routes.py for devices, hub/api/jobroutes.py, ...) declares a tuple of `Route`s; routes.py
joins them into ONE table (`ROUTES`) that both the server and the OpenAPI document use.

Each route says its method, path, the permission it needs (`read`, `act`, `admin`; None: no authentication beyond
TLS), a summary, its parameters and its request/response schemas (names in hub/api/openapi.py's components).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from aiohttp import web

from .openapi import MAX_REASON
from .queries import MAX_LIMIT, BadRequest

REASON_RE = re.compile(rf"[\x20-\x7e]{{0,{MAX_REASON}}}")  # as documented (openapi.REASON)
_LIMIT_RE = re.compile(r"[0-9]{1,7}")  # ASCII digits only (str.isdigit also takes '\u00b2', int() does not)
PREFIX = "/api/v1"


@dataclass(frozen=True)
class Param:
    name: str
    where: str  # 'query' or 'path'
    schema: dict
    description: str
    required: bool = False


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    name: str
    permission: str | None
    summary: str
    handler: Callable[..., Awaitable[web.StreamResponse]]
    params: tuple[Param, ...] = ()
    body: str | None = None  # a component schema name
    response: str | None = None  # a component schema name (JSON) ...
    content_type: str = "application/json"  # ... or this media type
    also: tuple[str, ...] = ()  # other media types a successful answer may have (e.g. text/csv), a string each
    errors: tuple[int, ...] = (403,)
    success: int = 200  # the status code of a successful answer
    more: tuple[tuple[int, str], ...] = ()  # other successful answers: (status, component schema name)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(data), content_type="application/json")


def query_params(request: web.Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in request.query.items():
        if key in out:
            raise BadRequest(f"parameter {key!r} given twice", key)
        out[key] = value
    return out


async def json_body(request: web.Request) -> dict:
    """The JSON object body (UTF-8, whatever charset the request claims); BadRequest for anything else."""
    raw = await request.read()  # (aiohttp raises 413 past client_max_size)
    try:
        body = json.loads(raw.decode("utf-8"))
    except ValueError:  # (UnicodeDecodeError and json.JSONDecodeError are ValueErrors)
        raise BadRequest("the body must be a JSON object (UTF-8)", "body") from None
    except RecursionError:  # e.g. 200,000 '['
        raise BadRequest("the body is nested too deeply", "body") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", "body")
    return body


def page_limit(value: str | None) -> int:
    if value is None:
        return 100
    if not _LIMIT_RE.fullmatch(value) or not 1 <= int(value) <= MAX_LIMIT:
        raise BadRequest(f"limit must be an integer 1-{MAX_LIMIT}", "limit")
    return int(value)


def check_reason(value: object) -> str:
    if not isinstance(value, str) or not REASON_RE.fullmatch(value):
        raise BadRequest(f"reason must be at most {MAX_REASON} printable ASCII characters", "reason")
    return value


def q(name: str, schema: dict, description: str) -> Param:
    """A query parameter."""
    return Param(name, "query", schema, description)
