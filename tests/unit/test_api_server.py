"""The fleet API server's error handling without TLS: every error is problem+json, a crash tells nothing inside."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from hub.api.server import PROBLEM, problems


async def _boom(request):
    raise RuntimeError("secret internal detail /var/lib/tessera-hub")


async def _ok(request):
    return web.json_response({"ok": True})


def _run(checks):
    async def main():
        app = web.Application(middlewares=[problems])
        app.router.add_get("/boom", _boom)
        app.router.add_get("/ok", _ok)
        async with TestClient(TestServer(app)) as client:
            return await checks(client)
    return asyncio.run(main())


def test_unhandled_exception_is_a_500_problem_without_details():
    async def checks(client):
        resp = await client.get("/boom")
        body = await resp.json(content_type=None)
        assert resp.status == 500 and resp.headers["Content-Type"].startswith(PROBLEM)
        assert body["status"] == 500 and "secret" not in str(body) and "/var/lib" not in str(body)
    _run(checks)


def test_404_and_405_are_problems():
    async def checks(client):
        for method, path, status in (("GET", "/nothing", 404), ("POST", "/ok", 405)):
            resp = await client.request(method, path)
            body = await resp.json(content_type=None)
            assert resp.status == status and resp.headers["Content-Type"].startswith(PROBLEM)
            assert set(body) >= {"type", "title", "status", "detail"} and body["status"] == status
        resp = await client.get("/ok")
        assert resp.status == 200 and await resp.json() == {"ok": True}
    _run(checks)
