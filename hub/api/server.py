"""The HTTPS fleet API's server: aiohttp on its own TLS listener, operators authenticated by client certificate.

Why aiohttp: the API must see the verified TLS peer certificate of every request (an operator is a service
identity, recognised by issuer and serial). Hypercorn 0.18, Uvicorn 0.54 and Daphne 4.2 do not hand an ASGI
application the peer certificate (none implements the ASGI "tls" extension), so an ASGI stack would have to trust
a header from a proxy. aiohttp's own web server does: `request.transport.get_extra_info("ssl_object")
.getpeercert(binary_form=True)` is the DER certificate OpenSSL verified in the handshake.

TLS: at least 1.2, a client certificate is required (CERT_REQUIRED) and must chain to the fleet root
(`ca/root.pem`); the server certificate is the hub's `tls/est.pem`. A handshake without a certificate, or with one
from another CA, fails before HTTP. Then every request except /healthz and /readyz is authenticated: the
certificate's issuer must be the service CA (a device certificate gets a 403 problem), and (issuer 'service',
serial) must be an active principal with an active, in-validity certificate in the registry's `authz_credentials`
view. Its role's permissions (hub/authz/policy.py `API_PERMISSIONS`) must include what the route declares
(hub/api/routes.py). Every authenticated call is audited with the principal as actor; every error is
`application/problem+json` (RFC 9457).

The server runs in a thread with its own event loop (`start_api`); registry work runs in a small thread pool
(the registry hands each thread its own SQLite connection).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import ssl
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from aiohttp import web
from cryptography import x509

from hub.authz.policy import API_PERMISSIONS
from hub.loopthread import LoopThread
from hub.registry.store import Registry, _ts, serial_hex
from hub.tlsposture import harden

from .queries import BadRequest, Conflict, NotFound, apply_schema

log = logging.getLogger("tessera.api")

DEFAULT_PORT = 8444
MAX_BODY = 8 * 1024 * 1024  # a bulk selector with 100,000 ids fits
PROBLEM = "application/problem+json"


class Forbidden(Exception):
    """Authenticated at TLS, but not an operator this API serves (403)."""


@dataclass(frozen=True)
class Principal:
    name: str
    role: str
    serial: str
    permissions: frozenset[str]


def problem(status: int, title: str, detail: str, code: str | None = None, **extra: Any) -> web.Response:
    """An RFC 9457 problem response."""
    body = {"type": f"urn:tessera:problem:{code}" if code else "about:blank", "title": title, "status": status,
            "detail": detail, **extra}
    return web.Response(status=status, text=json.dumps(body), content_type=PROBLEM)


def tls_context(cfg) -> ssl.SSLContext:
    ctx = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.load_cert_chain(str(cfg.tls_dir / "est.pem"), str(cfg.tls_dir / "est.key"))
    ctx.load_verify_locations(cafile=str(cfg.ca_dir / "root.pem"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class Authenticator:
    """Verified peer certificate -> Principal, from the registry (Forbidden with a safe reason otherwise)."""

    def __init__(self, registry: Registry, service_ca: Path, clock: Callable[[], datetime]):
        self.registry, self.clock = registry, clock
        self.service_subject = x509.load_pem_x509_certificate(service_ca.read_bytes()).subject

    def principal(self, der: bytes | None) -> Principal:
        if not der:
            raise Forbidden("no client certificate")
        cert = x509.load_der_x509_certificate(der)
        if cert.issuer != self.service_subject:
            raise Forbidden("this API serves operators with a service identity (a certificate from the service "
                            "CA), not device certificates")
        serial = serial_hex(cert.serial_number)
        rows = self.registry.query("SELECT principal, kind, role, cert_status, principal_status, not_before, "
                                   "not_after FROM authz_credentials WHERE issuer = 'service' AND serial = ?",
                                   [serial])
        if not rows:
            raise Forbidden(f"certificate {serial} is not a registered service identity")
        row, now = rows[0], _ts(self.clock())
        if row["principal_status"] != "active":
            raise Forbidden(f"identity {row['principal']} is {row['principal_status']}")
        if row["cert_status"] != "active":
            raise Forbidden(f"certificate {serial} is {row['cert_status']}")
        if not row["not_before"] <= now < row["not_after"]:
            raise Forbidden(f"certificate {serial} is outside its validity")
        return Principal(row["principal"], row["role"], serial, API_PERMISSIONS.get(row["role"], frozenset()))


def peer_der(request: web.Request) -> bytes | None:
    sslobj = request.transport.get_extra_info("ssl_object") if request.transport else None
    return sslobj.getpeercert(binary_form=True) if sslobj is not None else None


def _peer_cn(der: bytes | None) -> str:
    try:
        cert = x509.load_der_x509_certificate(der)
        cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return f"cert:{cns[0].value}" if cns else "cert:?"
    except Exception:  # noqa: BLE001
        return "unauthenticated"


class Api:
    """What the handlers share: the live hub, registry, authenticator, a thread pool for blocking work."""

    def __init__(self, cfg, live, clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)):
        self.cfg, self.live, self.clock = cfg, live, clock
        self.registry: Registry = live.registry
        self.auth = Authenticator(self.registry, cfg.ca_dir / "service-ca.pem", clock)
        self.pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="tessera-api")

    async def run(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def audit(self, action: str, outcome: str, actor: str, detail: str = "", device_id: str | None = None,
              source: str | None = None) -> None:
        try:
            detail = detail.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate cannot bind
            self.registry.audit(action, outcome, self.clock(), actor=actor, device_id=device_id, detail=detail,
                                source=source)
        except Exception:  # noqa: BLE001  (an audit failure is logged; the answer is already decided)
            log.exception("API audit row failed")


def cross_site(request: web.Request) -> tuple[int, str] | None:
    """CSRF guard for state-changing requests: a browser attaches the operator's client certificate to a
    cross-site request too, so a non-GET request whose Origin is another origin (or `Sec-Fetch-Site: cross-site`)
    is refused (403), and a body must be JSON (415: no form or text/plain post from another page)."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return None
    if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
        return 403, "cross-site request refused (Sec-Fetch-Site: cross-site)"
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"https://{request.host}":
        return 403, f"cross-origin request refused (Origin {origin[:100]!r} is not this hub)"
    if request.body_exists and request.content_type != "application/json":
        return 415, "the body must be application/json"
    return None


def endpoint(api: Api, route) -> Callable:
    """The aiohttp handler for a route: authenticate, check the route's permission, run it, audit the call."""

    async def handle(request: web.Request) -> web.StreamResponse:
        if route.permission is None:
            return await route.handler(api, request, None)
        source = request.remote
        action = f"api.{route.name}"
        der = peer_der(request)
        try:
            principal = await api.run(api.auth.principal, der)
        except Forbidden as exc:
            await api.run(api.audit, action, "denied", _peer_cn(der), str(exc), None, source)
            return problem(403, "Forbidden", str(exc), "forbidden")
        request["principal"] = principal
        if route.permission not in principal.permissions:
            detail = f"role {principal.role!r} does not have the {route.permission!r} permission"
            await api.run(api.audit, action, "denied", principal.name, detail, None, source)
            return problem(403, "Forbidden", detail, "forbidden")
        refused = cross_site(request)
        if refused is not None:
            await api.run(api.audit, action, "denied", principal.name, refused[1], None, source)
            return problem(refused[0], "Forbidden" if refused[0] == 403 else "Unsupported Media Type", refused[1],
                           "cross_site" if refused[0] == 403 else "unsupported_media_type")
        device_id = request.match_info.get("id")
        try:
            response = await route.handler(api, request, principal)
        except BadRequest as exc:
            await api.run(api.audit, action, "denied", principal.name, str(exc), device_id, source)
            return problem(400, "Bad request", str(exc), "bad_request", **({"param": exc.param} if exc.param else {}))
        except Conflict as exc:
            await api.run(api.audit, action, "denied", principal.name, str(exc), device_id, source)
            return problem(409, "Conflict", str(exc), "conflict")
        except NotFound as exc:
            await api.run(api.audit, action, "denied", principal.name, str(exc), device_id, source)
            return problem(404, "Not found", str(exc), "not_found")
        except web.HTTPException:
            raise
        except Exception:
            log.exception("API %s %s failed", request.method, request.path)
            await api.run(api.audit, action, "error", principal.name, "internal error", device_id, source)
            raise
        detail = f"{request.method} {request.path_qs}"[:500]
        if route.permission == "read":  # reads: one audit row, written off the request path
            api.pool.submit(api.audit, action, "ok", principal.name, detail, device_id, source)
        else:
            await api.run(api.audit, action, "ok", principal.name, detail, device_id, source)
        return response

    handle.__name__ = route.name.replace(".", "_")
    return handle


@web.middleware
async def problems(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Every error, aiohttp's own (404, 405, 413) and unhandled exceptions (500, no details), as problem+json.

    Whatever a handler raises (any Exception: RecursionError, UnicodeError, OverflowError, ...) answers a 500
    problem, which every operation documents; nothing but a problem+json leaves here for an error."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 413:
            detail = f"the body is larger than {MAX_BODY} bytes"
        else:
            detail = {404: f"no resource {request.path}", 405: f"{request.method} is not allowed on {request.path}"
                      }.get(exc.status, exc.text or exc.reason or "error")
        return problem(exc.status, exc.reason or "Error", detail)
    except BadRequest as exc:  # a handler outside `endpoint` (none today)
        return problem(400, "Bad request", str(exc), "bad_request", **({"param": exc.param} if exc.param else {}))
    except Exception as exc:  # noqa: BLE001
        try:
            log.error("API %s %s: unhandled error", request.method, request.path, exc_info=exc)
        except Exception:  # noqa: BLE001  (e.g. a RecursionError's traceback): the answer does not depend on it
            pass
        return problem(500, "Internal Server Error", "the hub could not answer this request; see its log",
                       "internal_error")


def make_app(api: Api) -> web.Application:
    from .routes import all_routes

    from . import console

    app = web.Application(middlewares=[problems], client_max_size=MAX_BODY)
    for route in (*all_routes(), *console.ROUTES):  # the console is served here, not in the API's route table
        app.router.add_route(route.method, route.path, endpoint(api, route))
    console.attach(app, api)
    return app


class ApiServer(LoopThread):
    """A running API listener; call it to stop (idempotent). `port` is the bound port."""

    def __init__(self, loop: asyncio.AbstractEventLoop, runner: web.AppRunner, api: Api, port: int):
        self.api = api
        # after the loop: pending audit rows are written before the registry closes
        super().__init__(loop, runner, port, "tessera-api", after_stop=lambda: api.pool.shutdown(wait=True))


def start_api(cfg, live, host: str, port: int) -> ApiServer:
    """Start the API on host:port (0: any free port) in its own thread and event loop; returns the stop callable.
    Binding errors (OSError) are raised here, before anything runs."""
    apply_schema(live.registry)
    from .metrics import prepare; prepare(live)  # noqa: E702  (metrics and expiry report schemas, $SYS)
    api = Api(cfg, live)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(make_app(api), access_log=None, handle_signals=False)
    try:
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, host, port, ssl_context=tls_context(cfg), backlog=128)
        loop.run_until_complete(site.start())
    except BaseException:
        loop.run_until_complete(runner.cleanup())
        loop.close()
        api.pool.shutdown(wait=False)
        raise
    bound = site._server.sockets[0].getsockname()[1]  # noqa: SLF001  (aiohttp exposes no public accessor)

    return ApiServer(loop, runner, api, bound)


def configured_port(cfg) -> tuple[int, bool]:
    """The API port and whether it was configured (fleet.toml `[api] port`); default 8444, not explicit."""
    if cfg.api_port is not None:
        return int(cfg.api_port), True
    return DEFAULT_PORT, False
