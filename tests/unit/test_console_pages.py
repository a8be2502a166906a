"""The console's templates render every page, escape attacker-controlled values, and leave out actions for a viewer."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from hub.api.console import data, pages

EVIL = "<img src=x onerror=alert(1)>\"'<script>alert(2)</script>"
TS = "2026-12-02T07:19:22.123456+00:00"


def who(*perms: str) -> SimpleNamespace:
    return SimpleNamespace(name="svc.x", role="operator" if "act" in perms else "viewer", serial="ab",
                           permissions=frozenset(perms))


def device(**kw):
    return {"id": "lab-01", "status": "active", "groups": ["lab"], "labels": {"note": EVIL}, "online": True,
            "last_seen": TS, "created": TS, "cert_not_after": TS, **kw}


def audit_row(**kw):
    return {"id": 7, "at": TS, "actor": EVIL, "action": "x", "device_id": "lab-01", "outcome": "ok", "detail": EVIL,
            **kw}


def job():
    counts = {s: 1 for s in ("queued", "sent", "acked", "failed", "timed_out", "offline")}
    return {"id": 3, "name": EVIL, "command": "ping", "args": {"k": EVIL}, "selector": {"group": "lab"},
            "rate_per_minute": 60, "timeout_s": 60, "abort_percent": 20, "offline": "fail", "state": "running",
            "counts": counts, "total": 6, "created_by": "svc.x", "created": TS, "started": TS, "finished": None,
            "reason": EVIL}


PAGES = {
    "overview.html": dict(counts={**{s: 1 for s in pages.DEVICE_STATUSES}, "online": 1}, expiring={7: 0, 30: 1},
                          crl={"age_s": 5, "next_update": TS, "overdue": False}, broker_ok=True, broker_clients=3,
                          chart=data.chart_bars([{"hour": "2026-12-02T07", "ok": 2, "denied": 1}]), jobs=[job()],
                          recent=[audit_row()]),
    "devices.html": dict(items=[device()], filters={"label": EVIL}, sort="id", sorts=("id",), error=EVIL,
                         next_q={"cursor": "abc"}, first_page=False, selector='{"label": "x"}'),
    "device.html": dict(device=device(), certificates=[{"serial": "01", "status": "active", "not_before": TS,
                                                        "not_after": TS, "issued_at": TS, "revoked_at": None}],
                        history=[{"at": TS, "online": 1}], audit=[audit_row()],
                        telemetry={"at": TS, "pretty": EVIL}),
    "jobs.html": dict(items=[job()]),
    "job.html": dict(job=job(), devices=[{"device_id": "lab-01", "state": "acked", "sent_at": TS,
                                          "finished_at": TS, "detail": EVIL}]),
    "tokens.html": dict(ttl_hours=24),
    "audit.html": dict(items=[audit_row()], filters={"actor": EVIL}, error=None, next_q=None),
}


@pytest.mark.parametrize("name", sorted(PAGES))
@pytest.mark.parametrize("perms", [("read",), ("read", "act")])
def test_pages_render_and_escape(name, perms):
    resp = pages.render(name, who(*perms), title=EVIL, nav="x", events="/console/events?x=1", **PAGES[name])
    html = resp.text
    assert "<img" not in html and "onerror=alert(1)>" not in html
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="/console/static/console.js" defer>']
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert resp.headers["Content-Security-Policy"].startswith("default-src 'none'; script-src 'self'")
    assert resp.headers["X-Frame-Options"] == "DENY"
    actions = re.findall(r"data-action=|data-form=|<dialog", html)
    if "act" in perms:
        assert actions or name in ("overview.html", "audit.html")
    else:
        assert actions == [], name


def test_chart_scales_and_handles_an_empty_day():
    bars = data.chart_bars([{"hour": f"2026-12-02T{h:02d}", "ok": h, "denied": 0} for h in range(24)])
    assert bars["top"] == 23 and bars["bars"][-1]["ok_h"] == bars["height"] - 14 and bars["bars"][0]["ok_h"] == 0
    assert data.chart_bars([{"hour": "2026-12-02T00", "ok": 0, "denied": 0}])["top"] == 1


def test_audit_csv_cells_cannot_be_formulas():
    assert pages._cell("=HYPERLINK(1)") == "'=HYPERLINK(1)" and pages._cell("ok") == "ok" and pages._cell(None) == ""


def test_telemetry_tap_keeps_the_newest_payload_per_device_bounded(monkeypatch):
    from datetime import datetime, timezone

    monkeypatch.setattr(data, "TAP_DEVICES", 2)
    tap, now = data.TelemetryTap(), datetime(2026, 12, 2, tzinfo=timezone.utc)
    for n, dev in enumerate(("a", "b", "a", "c")):
        tap.put(dev, f"{n}".encode() + b"\xff" + b"x" * 10000, now)
    assert tap.get("b") is None and tap.get("a")["payload"].startswith("2\ufffd")
    assert len(tap.get("c")["payload"]) == data.TAP_BYTES  # bytes cut, then decoded


@pytest.mark.parametrize("method, headers, body, expected", [
    ("GET", {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}, b"", None),  # reads pass
    ("POST", {"Sec-Fetch-Site": "cross-site", "Content-Type": "application/json"}, b"{}", 403),
    ("POST", {"Origin": "https://evil.example", "Content-Type": "application/json"}, b"{}", 403),
    ("POST", {"Origin": "https://hub:8444", "Content-Type": "application/json"}, b"{}", 403),  # another port
    ("PATCH", {"Origin": "null", "Content-Type": "application/json"}, b"{}", 403),
    ("POST", {"Content-Type": "text/plain"}, b"{}", 415),
    ("POST", {"Content-Type": "application/x-www-form-urlencoded"}, b"a=b", 415),
    ("POST", {"Origin": "https://hub.example:8444", "Content-Type": "application/json; charset=utf-8",
              "Sec-Fetch-Site": "same-origin"}, b"{}", None),
    ("POST", {}, b"", None),  # no body (e.g. a job's cancel), no Origin (curl, the CLI)
    ("DELETE", {"Sec-Fetch-Site": "same-site"}, b"", None),
])
def test_cross_site_guard(method, headers, body, expected):
    from unittest import mock

    from aiohttp.test_utils import make_mocked_request

    from hub.api.server import cross_site

    extra = {"payload": mock.Mock()} if body else {}  # any payload but the empty one: the request has a body
    req = make_mocked_request(method, "/api/v1/x", headers={"Host": "hub.example:8444", **headers}, **extra)
    refused = cross_site(req)
    assert (refused[0] if refused else None) == expected, refused
