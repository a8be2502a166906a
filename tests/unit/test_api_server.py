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


def _run_handlers(handlers, checks):
    async def main():
        app = web.Application(middlewares=[problems])
        for path, handler in handlers.items():
            app.router.add_route("*", path, handler)
        async with TestClient(TestServer(app)) as client:
            return await checks(client)
    return asyncio.run(main())


def test_any_exception_is_a_500_problem():
    def raiser(exc):
        async def handler(request):
            raise exc
        return handler

    def deep(n):
        return deep(n + 1)

    async def recursion(request):
        deep(0)

    excs = {"/overflow": OverflowError("x"), "/unicode": UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogate"),
            "/lookup": LookupError("x"), "/key": KeyError("x")}

    async def checks(client):
        for path in [*excs, "/recursion"]:
            resp = await client.get(path)
            assert resp.status == 500 and resp.headers["Content-Type"].startswith(PROBLEM), path
            assert (await resp.json(content_type=None))["status"] == 500
    _run_handlers({**{p: raiser(e) for p, e in excs.items()}, "/recursion": recursion}, checks)


def test_json_bodies_refuse_nesting_and_bad_encodings_as_400():
    from hub.api.queries import BadRequest
    from hub.api.routing import json_body as _body

    async def handler(request):
        try:
            return web.json_response(await _body(request))
        except BadRequest as exc:
            return web.json_response({"bad": str(exc), "param": exc.param}, status=400)

    async def checks(client):
        for data, ctype in ((b"[" * 200_000, "application/json"), (b'{"a": 1}', "application/json; charset=nope"),
                            (b"\xff{}", "application/json"), (b"[]", "application/json")):
            resp = await client.post("/b", data=data, headers={"Content-Type": ctype})
            body = await resp.json()
            if data == b'{"a": 1}':
                assert resp.status == 200 and body == {"a": 1}  # JSON is UTF-8, whatever the charset says
            else:
                assert resp.status == 400 and body["param"] == "body" and "\n" not in body["bad"], data[:10]
    _run_handlers({"/b": handler}, checks)


def test_limit_takes_ascii_digits_only():
    import pytest

    from hub.api.queries import BadRequest
    from hub.api.routing import page_limit as _limit

    assert _limit(None) == 100 and _limit("1") == 1 and _limit("1000") == 1000
    for bad in ("\u00b2", "\u0661", "\uff11", "0", "1001", "-1", "+1", " 1", "1.0", "", "99999999999999999999"):
        with pytest.raises(BadRequest, match="limit"):
            _limit(bad)


def test_a_body_past_the_limit_is_a_413_problem():
    from hub.api.routing import json_body as _body

    async def handler(request):
        return web.json_response(await _body(request))

    async def main():
        app = web.Application(middlewares=[problems], client_max_size=1024)
        app.router.add_post("/b", handler)
        async with TestClient(TestServer(app)) as client:
            resp = await client.post("/b", data=b"[" * 2048, headers={"Content-Type": "application/json"})
            body = await resp.json(content_type=None)
            assert resp.status == 413 and resp.headers["Content-Type"].startswith(PROBLEM)
            assert body["status"] == 413 and "larger than" in body["detail"]
    asyncio.run(main())
