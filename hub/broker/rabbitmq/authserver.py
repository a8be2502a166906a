"""The HTTP endpoint RabbitMQ's auth back end calls: POST /<secret>/{user,vhost,resource,topic} on loopback.

A thin adapter over auth.AuthBackend. RabbitMQ authenticates itself with the secret path segment (it is only in
the nodes' 0600 rabbitmq.conf and the hub's 0600 secret file; compared in constant time); any other path is a
404 with nothing decided. Runs on its own loop thread (hub/loopthread.py).
"""

from __future__ import annotations

import asyncio
import hmac
import logging

from aiohttp import web

from hub.loopthread import LoopThread

from .auth import AuthBackend

log = logging.getLogger("tessera.hub.broker.rabbitmq")
PATHS = ("user", "vhost", "resource", "topic")


class AuthServer(LoopThread):
    """A running auth endpoint; call it to stop. `port` is the bound port."""


def start(backend: AuthBackend, secret: str, host: str = "127.0.0.1", port: int = 0) -> AuthServer:
    loop = asyncio.new_event_loop()

    async def handle(request: web.Request) -> web.Response:
        given, what = request.match_info["secret"], request.match_info["what"]
        if not hmac.compare_digest(given.encode(), secret.encode()) or what not in PATHS:
            log.warning("rabbitmq auth endpoint: request with a wrong path from %s", request.remote)
            raise web.HTTPNotFound()
        form = await request.post()
        params = {k: str(v) for k, v in form.items()}
        return web.Response(text=backend.answer(what, params))

    async def setup():
        app = web.Application()
        app.router.add_post("/{secret}/{what}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        return runner, site._server.sockets[0].getsockname()[1]

    try:
        runner, bound = loop.run_until_complete(setup())
    except BaseException:
        loop.close()
        raise
    return AuthServer(loop, runner, bound, "rabbitmq-auth")
