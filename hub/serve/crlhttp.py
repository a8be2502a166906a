"""The plain-HTTP CRL listener of `serve`: GET/HEAD /crl/device.crl and /crl/service.crl, nothing else.

Why plain HTTP: RFC 5280 (4.2.1.13, 8) has CRLs fetched over http, so that checking a certificate never needs a
TLS connection whose own certificate would have to be checked against the same PKI; a CRL is signed, so it needs
no channel security. Every new device certificate names this listener first and the EST listener's https URL
second (hub.config.HubConfig.crl_urls). What is answered is decided in hub.serve.crlfiles; this module is the
socket side: aiohttp's low-level server (no router, no static files) in its own thread and event loop.

The EST listener's connection limits are reused (hub.est.connlimits, fleet.toml [est]): at most
`max_connections_per_source` connections at once per address (the excess is closed at once) and MAX_OPEN in
all; `header_timeout` from accept to the end of the request headers, then `request_timeout` from accept for the
whole request (the Reaper shuts a connection past its deadline down, whatever it is blocked in); one request per
connection.

The port: fleet.toml [crl] http_port (absent: 8080 if free, else serve runs on without it, like the API's default;
0: off). `serve --crl-port` moves the listener for one run only: the http distribution point of new certificates
is a stable public address and follows fleet.toml ([crl] public_url, or http://<public_host>:<http_port>).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from aiohttp import web

from hub.config import DEFAULT_CRL_HTTP_PORT, HubConfig
from hub.loopthread import LoopThread
from hub.est.connlimits import ConnectionGate, Limits, Reaper, Ticket
from hub.serve.crlfiles import CrlFiles, answer

log = logging.getLogger("tessera.hub.crl")

#: connections open at once on the listener, whatever their sources
MAX_OPEN = 1024
SERVER = "tessera-crl"


class _Handler(web.RequestHandler):
    """aiohttp's connection handler, whose answer to a request it cannot parse (or to a failure in the handler) is
    the bare status: aiohttp's own echoes the offending bytes and logs a traceback per request."""

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:
            log.error("CRL request from %r failed", request.remote, exc_info=exc)
        else:
            log.debug("CRL request from %r refused: %d %r", request.remote, status, str(exc or message)[:200])
        if request.writer.output_size > 0:
            raise ConnectionError("the response was sent already: the connection is broken")
        response = web.Response(status=status, headers={"Server": SERVER})
        response.force_close()
        return response


class _GatedServer(web.Server):
    """aiohttp's low-level server, with admission and deadlines for every connection it accepts."""

    def __init__(self, handler, limits: Limits, loop: asyncio.AbstractEventLoop, **kwargs):
        super().__init__(handler, loop=loop, **kwargs)
        self.limits = limits
        self.gate = ConnectionGate(limits.max_per_source, MAX_OPEN)
        self.reaper = Reaper(tick=min(0.2, limits.header_timeout / 10))
        self._watched: dict[object, tuple[str, Ticket]] = {}

    def __call__(self) -> web.RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        peer = transport.get_extra_info("peername")
        source = str(peer[0]) if peer else "?"
        refusal = "server_busy" if len(self._watched) >= MAX_OPEN else self.gate.admit(source)
        if refusal is not None:
            log.debug("CRL connection from %r refused: %s", source, refusal)
            transport.abort()
            return
        self.gate.started()  # no queue here: the event loop serves every admitted connection at once
        self._watched[handler] = (source, self.reaper.watch(transport.get_extra_info("socket"),
                                                            self.limits.header_timeout))

    def connection_lost(self, handler, exc: BaseException | None = None) -> None:
        entry = self._watched.pop(handler, None)
        if entry is not None:
            source, ticket = entry
            self.reaper.done(ticket)
            self.gate.release(source)
            if ticket.expired:
                log.info("CRL connection from %r cut: past its deadline", source)
        super().connection_lost(handler, exc)

    def headers_read(self, request: web.BaseRequest) -> None:
        """The request's headers came in time: from now on the whole request's deadline."""
        entry = self._watched.get(request.protocol)
        if entry is not None:
            self.reaper.extend(entry[1], self.limits.request_timeout)


class CrlListener(LoopThread):
    """A running listener; call it to stop (idempotent). `port` is the bound port."""

    def __init__(self, loop: asyncio.AbstractEventLoop, runner: web.ServerRunner, server: _GatedServer, port: int):
        self.server = server
        super().__init__(loop, runner, port, "crl-http", after_stop=server.reaper.stop)


def start(cfg: HubConfig, host: str, port: int, limits: Limits | None = None) -> CrlListener:
    """Serve cfg's CRL directory on host:port (0: any free port) in a thread of its own; OSError if it cannot bind."""
    files = CrlFiles(cfg.crl_dir)
    limits = limits or Limits.from_config(cfg)
    loop = asyncio.new_event_loop()
    holder: dict[str, _GatedServer] = {}

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        holder["server"].headers_read(request)
        ans = answer(files, request.method, request.raw_path, request.headers.get("If-None-Match"),
                     request.headers.get("If-Modified-Since"))
        if ans.status >= 400:
            log.debug("CRL %s %r from %r: %d", request.method, request.raw_path[:100], request.remote, ans.status)
        response = web.Response(status=ans.status, body=ans.body, headers={**ans.headers, "Server": SERVER})
        response.force_close()  # one request per connection: its deadlines are the request's
        return response

    async def setup() -> tuple[web.ServerRunner, _GatedServer, int]:
        # keepalive_timeout 0: no timer of aiohttp's own (one request per connection; the Reaper keeps the deadlines)
        server = _GatedServer(handle, limits, loop, access_log=None, keepalive_timeout=0)
        holder["server"] = server
        runner = web.ServerRunner(server, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=128)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            server.reaper.stop()
            raise
        return runner, server, site._server.sockets[0].getsockname()[1]  # noqa: SLF001 (no public accessor)

    try:
        runner, server, bound = loop.run_until_complete(setup())
    except BaseException:
        loop.close()
        raise

    return CrlListener(loop, runner, server, bound)


def configured_port(cfg: HubConfig, override: int | None = None) -> tuple[int, bool]:
    """The port to listen on and whether it was asked for (`serve --crl-port`, fleet.toml [crl] http_port) rather
    than the default; 0: the listener is off."""
    if override is not None:
        return override, True
    if cfg.crl_http_port is not None:
        return cfg.crl_http_port, True
    return DEFAULT_CRL_HTTP_PORT, False


def serve_crls(cfg: HubConfig, host: str, override: int | None,
               on_error: Callable[[str], None]) -> tuple[Callable[[], None] | None, str]:
    """For `serve`: start the listener as configured; returns (its stop callable or None, the announce line). A port
    asked for must bind (OSError); the default one may be taken (another hub on this machine): `on_error` is told
    and serve runs on without it."""
    port, explicit = configured_port(cfg, override)
    if port == 0 and explicit:
        return None, "CRL   not served over plain HTTP ([crl] http_port = 0)"
    try:
        listener = start(cfg, host, port)
    except OSError as exc:
        if explicit:
            raise
        log.error("plain-HTTP CRL listener not started: %s:%d: %s (set [crl] http_port in fleet.toml)",
                  host, port, exc)
        on_error(f"{host}:{port}: {exc}")
        return None, f"CRL   not served over plain HTTP: port {port} unavailable ({exc.strerror or exc})"
    return listener, f"CRL   http://{host}:{listener.port}/crl/device.crl  (plain HTTP, RFC 5280)"
