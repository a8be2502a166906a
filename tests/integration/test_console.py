"""The fleet console end to end: a real `tessera-hub serve`, real agents (SoftHSM keys, MQTT sessions), headless
Chromium (Debian's, driven by Playwright) logged in with the operator's PKCS#12 as its client certificate.

Screenshots of the main pages go to $TESSERA_SCREENSHOTS (default: a pytest tmp directory; the path is printed).
"""

from __future__ import annotations

import csv
import http.client
import io
import json
import ssl
from pathlib import Path

import pytest

from tests.integration.agentfixtures import wait_until
from tests.integration.brokerfixtures import enroll_device, session
from tests.integration.browserfixtures import AGENTS, PHONE, fleet, page_for  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration
XSS = "<img src=x onerror=alert(1)>"
SCRIPT = "<script>alert(2)</script>"


# --- login -------------------------------------------------------------------------------------------------------

def test_a_browser_without_a_client_certificate_gets_no_page(fleet):
    ctx, page = page_for(fleet, None)
    try:
        with pytest.raises(Exception) as err:
            page.goto(fleet.origin + "/console/")
        # a network error (the TLS handshake: no certificate to present), never an HTTP answer
        assert "net::ERR_" in str(err.value), err.value
        print(str(err.value).splitlines()[0])
    finally:
        ctx.close()


def test_security_headers_and_csrf_guard(fleet):
    status, headers, body = fleet.call("GET", "/console/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    csp = headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    sel = {"selector": {"ids": ["lab-03"]}, "reason": "csrf"}
    before = fleet.hub.state()
    path = "/api/v1/devices/actions/revoke"
    for extra in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
        status, _, body = fleet.call("POST", path, {**sel, "confirm_count": 1}, headers=extra)
        assert status == 403 and json.loads(body)["type"].endswith("cross_site"), (extra, body)
    status, _, body = fleet.call("POST", path, raw=json.dumps({**sel, "confirm_count": 1}).encode(),
                                 headers={"Content-Type": "text/plain"})
    assert status == 415, body
    status, _, body = fleet.call("POST", path, raw=b"selector=x", headers={"Content-Type":
                                                                          "application/x-www-form-urlencoded"})
    assert status == 415, body
    assert fleet.hub.state() == before  # nothing changed
    rows = fleet.hub.query("SELECT actor, outcome, detail FROM audit WHERE action = 'api.devices.revoke' "
                           "ORDER BY id DESC LIMIT 5")
    assert {r["actor"] for r in rows} == {"svc.ops"} and {r["outcome"] for r in rows} == {"denied"}
    # the same request from this hub's own origin is served (a dry run: nothing changes)
    status, _, body = fleet.call("POST", path, sel, headers={"Origin": fleet.origin, "Sec-Fetch-Site": "same-origin"})
    assert status == 200 and json.loads(body) == {"matched": 1, "dry_run": True}


# --- the operator's way: find, revoke, watch it go offline -------------------------------------------------------------

def test_operator_finds_a_device_and_revokes_it_live(fleet):
    ctx, page = page_for(fleet, fleet.ops)
    try:
        page.goto(fleet.origin + "/")  # -> /console/
        assert page.url.endswith("/console/")
        page.locator("header .who").wait_for()
        assert "svc.ops" in page.locator("header .who").inner_text()
        assert int(page.locator("#count-online").inner_text()) >= len(AGENTS)
        page.wait_for_function("() => document.body.dataset.live === 'open'")
        fleet.shot(page, "overview")

        with page.expect_navigation():
            page.click("nav >> text=Devices")
        page.fill("#f-id-prefix", "lab-0")
        with page.expect_navigation():
            page.click("#f-apply")
        rows = page.locator("table.devices tbody tr")
        assert rows.count() == len(AGENTS)
        fleet.shot(page, "device-list")
        page.fill("#f-id-prefix", "lab-02")
        with page.expect_navigation():
            page.click("#f-apply")
        assert rows.count() == 1
        with page.expect_navigation():
            page.click("table.devices >> text=lab-02")
        assert page.url.endswith("/console/devices/lab-02")
        presence = page.locator("h1 [data-presence='lab-02']")
        assert presence.inner_text() == "online"
        page.wait_for_function("() => document.body.dataset.live === 'open'")
        assert page.locator("table >> text=active").count() >= 1  # the certificate history
        fleet.shot(page, "device-detail")

        overview = ctx.new_page()
        overview.goto(fleet.origin + "/console/")
        overview.wait_for_function("() => document.body.dataset.live === 'open'")
        online_before = int(overview.locator("#count-online").inner_text())
        page.evaluate("window.__sameDocument = true")  # gone if the page reloads
        page.click("#revoke")
        dialog = page.locator("dialog#confirm[open]")
        assert "Revoke device lab-02?" in dialog.inner_text() and "final" in dialog.inner_text()
        page.click("dialog#confirm >> text=Cancel")  # a cancelled confirmation changes nothing
        assert fleet.hub.query("SELECT status FROM devices WHERE id = 'lab-02'")[0]["status"] == "active"
        page.click("#revoke")
        page.fill("#confirm-reason", "stolen from the lab")
        page.click("#confirm-ok")
        page.wait_for_function("() => document.querySelector(\"h1 [data-presence='lab-02']\").textContent === 'offline'",
                               timeout=15_000)
        assert page.evaluate("window.__sameDocument === true"), "the page reloaded instead of updating live"
        assert page.locator("h1 [data-status='lab-02']").inner_text() == "revoked"
        assert page.locator("tr[data-serial] .cert-status").first.inner_text() == "revoked"
        assert page.locator("#timeline li").first.inner_text().startswith("offline")  # presence history, live
        assert page.locator("#device-actions button, #command-panel").count() == 0  # nothing left to do
        page.locator("#audit-live >> text=device.revoked").first.wait_for(timeout=10_000)
        fleet.shot(page, "device-revoked")
        overview.locator(f"#count-online:text-is('{online_before - 1}')").wait_for(timeout=10_000)  # live too
        assert overview.locator("#count-revoked").inner_text() == "1"
    finally:
        ctx.close()
    dev = fleet.hub.query("SELECT status, online FROM devices WHERE id = 'lab-02'")[0]
    assert dev == {"status": "revoked", "online": 0}
    rows = fleet.hub.query("SELECT actor FROM audit WHERE action = 'device.revoked' AND device_id = 'lab-02'")
    assert [r["actor"] for r in rows] == ["svc.ops"]
    api = fleet.hub.query("SELECT actor, outcome FROM audit WHERE action = 'api.devices.status' AND device_id = 'lab-02'")
    assert api == [{"actor": "svc.ops", "outcome": "ok"}]
    agent = next(d for d in fleet.agents if d.id == "lab-02")
    wait_until(lambda: agent.status_file().get("state") != "online", 30, "the revoked agent's session to end")


def test_send_a_command_and_see_its_acknowledgement(fleet):
    ctx, page = page_for(fleet, fleet.ops)
    try:
        page.goto(fleet.origin + "/console/devices/lab-01")
        page.fill("[data-form=command] [name=command]", "ping")
        page.click("#command-send")
        result = page.locator("#command-result")
        result.filter(has_text="acknowledged").wait_for(timeout=15_000)
        assert '"pong": true' in result.inner_text()
    finally:
        ctx.close()
    rows = fleet.hub.query("SELECT actor FROM audit WHERE action = 'api.devices.send' AND device_id = 'lab-01'")
    assert [r["actor"] for r in rows] == ["svc.ops"]


def test_viewer_sees_no_action_and_the_api_refuses_them_anyway(fleet):
    ctx, page = page_for(fleet, fleet.viewer)
    try:
        for path in ("/console/devices", "/console/devices/lab-01", "/console/jobs", "/console/tokens"):
            page.goto(fleet.origin + path)
            assert "svc.eve" in page.locator("header .who").inner_text()
            assert page.locator("button[data-action], form[data-form], #bulk, dialog#confirm").count() == 0, path
        page.goto(fleet.origin + "/console/devices/lab-01")
        assert page.locator("button").count() == 0  # not one button: no action at all
        answer = page.evaluate("""async () => {
            const r = await fetch('/api/v1/devices/lab-01/status', {method: 'POST',
                headers: {'Content-Type': 'application/json'}, body: JSON.stringify({action: 'revoke'})});
            return [r.status, await r.text()]; }""")
        assert answer[0] == 403 and "permission" in answer[1]
    finally:
        ctx.close()
    assert fleet.hub.query("SELECT status FROM devices WHERE id = 'lab-01'")[0]["status"] == "active"


def test_a_job_started_from_the_ui_completes_with_live_progress(fleet):
    ctx, page = page_for(fleet, fleet.ops)
    try:
        page.goto(fleet.origin + "/console/jobs")
        page.fill("#job-form [name=name]", "ping the lab")
        page.fill("#job-form [name=group]", "lab")
        page.select_option("#job-form [name=status]", "active")
        page.fill("#job-form [name=rate_per_minute]", "30")
        page.click("#job-start")
        page.locator("dialog#confirm[open]").wait_for()  # after the API's dry run
        assert "to 2 devices" in page.locator("#confirm-text").inner_text()  # lab-02 is revoked
        page.click("#confirm-ok")
        page.wait_for_url("**/console/jobs/*")
        page.evaluate("""() => { window.__seen = [];
            new MutationObserver(() => window.__seen.push(document.querySelector('#job-done').textContent))
                .observe(document.querySelector('#job-done'), {childList: true, characterData: true, subtree: true}); }""")
        page.wait_for_function("() => document.querySelector('#job-state').textContent === 'completed'", timeout=60_000)
        assert page.locator("#jc-acked").inner_text() == "2"
        assert page.locator("#job-done").inner_text() == "2"
        seen = page.evaluate("window.__seen")
        assert seen and seen[-1] == "2", seen  # the count moved on the open page (server-sent events)
        page.locator("#job-devices td:text-is('acked')").nth(1).wait_for(timeout=10_000)  # the table follows too
        fleet.shot(page, "job")
        job_id = int(page.url.rsplit("/", 1)[1])
    finally:
        ctx.close()
    job = fleet.hub.query("SELECT state, created_by, n_acked FROM jobs WHERE id = ?", (job_id,))[0]
    assert job == {"state": "completed", "created_by": "svc.ops", "n_acked": 2}


def test_markup_in_a_label_and_in_telemetry_renders_as_text(fleet, tmp_path):
    dev = enroll_device(fleet.hub, "xss-dev", tmp_path)
    status, _, body = fleet.call("PATCH", "/api/v1/devices/xss-dev", {"labels": {"note": XSS, "more": SCRIPT}})
    assert status == 200, body
    payload = json.dumps({"temp": 21.5, "msg": XSS + SCRIPT, "</pre>": "<b>bold</b>"})
    live = session(fleet.hub, dev)
    try:
        assert live.publish("devices/xss-dev/telemetry", payload.encode()) == 0
        ctx, page = page_for(fleet, fleet.ops)
        try:
            def shown():
                page.goto(fleet.origin + "/console/devices/xss-dev")
                return page.locator("#telemetry").count() > 0
            wait_until(shown, 20, "the telemetry on the device page", interval=0.5)
            assert XSS in page.locator("#labels").inner_text() and SCRIPT in page.locator("#labels").inner_text()
            text = page.locator("#telemetry").inner_text()
            assert XSS in text and SCRIPT in text and "<b>bold</b>" in text
            assert page.locator("main img, main script, main b").count() == 0
            page.goto(fleet.origin + "/console/devices?id_prefix=xss")
            assert XSS in page.locator("table.devices").inner_text()
            assert page.locator("main img, main script").count() == 0
            # an audit row carrying markup, streamed live into the open overview (server-sent event -> textContent)
            page.goto(fleet.origin + "/console/")
            page.wait_for_function("() => document.body.dataset.live === 'open'")
            from datetime import datetime, timezone

            from hub.registry.store import Registry

            reg = Registry(fleet.hub.registry_path)
            try:
                reg.audit("test.markup", "denied", datetime.now(timezone.utc), actor=XSS, device_id="xss-dev",
                          detail=SCRIPT + XSS)
            finally:
                reg.close()
            row = page.locator("#audit-live tr.fresh", has_text="test.markup")
            row.wait_for(timeout=10_000)
            assert XSS in row.inner_text() and SCRIPT in row.inner_text()
            page.goto(fleet.origin + "/console/audit?device=xss-dev")  # and server-rendered
            assert page.locator("#audit-live", has_text="test.markup").count() == 1
            assert page.locator("main img, main script").count() == 0
            assert page.dialogs == [], page.dialogs
        finally:
            ctx.close()
    finally:
        live.close()


def test_tokens_batch_csv_downloads_once_and_audit_exports(fleet):
    ctx, page = page_for(fleet, fleet.ops, viewport=PHONE)
    try:
        page.goto(fleet.origin + "/console/tokens")
        page.fill("#token-form [name=prefix]", "line3-")
        page.fill("#token-form [name=count]", "3")
        page.fill("#token-form [name=group]", "line3")
        page.click("#token-create")
        page.locator("#token-download").wait_for()
        with page.expect_download() as info:
            page.click("#token-download")
        rows = list(csv.reader(io.StringIO(Path(info.value.path()).read_text())))
        assert rows[0] == ["device_id", "token", "token_expires"] and [r[0] for r in rows[1:]] == \
            ["line3-1", "line3-2", "line3-3"]
        assert all(len(r[1]) >= 20 for r in rows[1:])
        page.wait_for_function("() => !document.querySelector('#token-download').getAttribute('href')")
        assert rows[1][1] not in page.content()  # the tokens left the page
        fleet.shot(page, "tokens-phone")
        page.goto(fleet.origin + "/console/devices?group=line3")
        assert page.locator("table.devices tbody tr").count() == 3
        fleet.shot(page, "device-list-phone")
        page.goto(fleet.origin + "/console/devices/line3-2")  # one device's fresh token, shown once
        page.click("#new-token")
        page.locator("dialog#confirm[open]").wait_for()
        page.click("#confirm-ok")
        page.locator("#token-once:not([hidden])").wait_for()
        token = page.locator("#token-once").inner_text().splitlines()[-1]
        assert len(token) >= 20 and token != rows[2][1]
    finally:
        ctx.close()
    tokens = fleet.hub.query("SELECT used_from FROM tokens WHERE device_id = 'line3-2' ORDER BY id")
    assert [t["used_from"] for t in tokens] == ["superseded", None]  # the batch's token stopped working
    status, headers, body = fleet.call("GET", "/console/audit.csv?actor=svc.ops")
    assert status == 200 and headers["content-type"].startswith("text/csv")
    exported = list(csv.DictReader(io.StringIO(body.decode())))
    assert any(r["action"] == "api.devices.create" for r in exported) and {r["actor"] for r in exported} == {"svc.ops"}


def test_bulk_selection_uses_the_dry_run_count_and_a_confirmation(fleet):
    """line3-1..3 (from the token test): two picked by hand are suspended, then every match of the filter resumed."""
    ctx, page = page_for(fleet, fleet.ops)
    try:
        page.goto(fleet.origin + "/console/devices?group=line3")
        page.check("input.sel[value='line3-1']")
        page.check("input.sel[value='line3-3']")
        assert page.locator("#bulk-count").inner_text() == "2 selected"
        page.click("#bulk button[data-op=suspend]")
        page.locator("dialog#confirm[open]").wait_for()
        assert page.locator("#confirm-text").inner_text() == "Suspend 2 devices?"
        page.fill("#confirm-reason", "audit of line 3")
        with page.expect_navigation():  # the list reloads after the change
            page.click("#confirm-ok")
        statuses = {r["id"]: r["status"] for r in fleet.hub.query(
            "SELECT id, status FROM devices WHERE id LIKE 'line3-%'")}
        assert statuses == {"line3-1": "suspended", "line3-2": "pending", "line3-3": "suspended"}
        assert page.locator("[data-status='line3-1']").inner_text() == "suspended"

        page.goto(fleet.origin + "/console/devices?group=line3&status=suspended")
        page.check("#bulk-all-matching")
        page.click("#bulk button[data-op=resume]")
        page.locator("dialog#confirm[open]").wait_for()
        assert page.locator("#confirm-text").inner_text() == "Resume 2 devices?"
        with page.expect_navigation():
            page.click("#confirm-ok")
    finally:
        ctx.close()
    rows = fleet.hub.query("SELECT id, status FROM devices WHERE id LIKE 'line3-%' AND status != 'pending'")
    assert rows == []  # never enrolled: resumed to pending
    bulk = fleet.hub.query("SELECT action, actor, detail FROM audit WHERE action IN ('api.devices.suspend', "
                           "'api.devices.resume') AND outcome = 'ok' ORDER BY id")
    assert [(r["action"], r["actor"]) for r in bulk] == [("api.devices.suspend", "svc.ops")] * 2 + \
        [("api.devices.resume", "svc.ops")] * 2  # each: the dry run, then the confirmed run


def test_a_job_can_be_aborted_from_its_page(fleet):
    """A job waiting for offline devices (the pending line3 batch never connects) runs until it is aborted."""
    ctx, page = page_for(fleet, fleet.ops)
    try:
        page.goto(fleet.origin + "/console/jobs")
        page.fill("#job-form [name=name]", "wait for line 3")
        page.fill("#job-form [name=group]", "line3")
        page.select_option("#job-form [name=offline]", "wait")
        page.click("#job-start")
        page.locator("dialog#confirm[open]").wait_for()
        assert "to 3 devices" in page.locator("#confirm-text").inner_text()
        page.click("#confirm-ok")
        page.wait_for_url("**/console/jobs/*")
        assert page.locator("#job-state").inner_text() == "running"
        page.click("#job-actions button[data-op=cancel]")
        page.locator("dialog#confirm[open]").wait_for()
        page.click("#confirm-ok")
        page.locator("#job-state:text-is('cancelled')").wait_for(timeout=15_000)
        job_id = int(page.url.rsplit("/", 1)[1])
    finally:
        ctx.close()
    job = fleet.hub.query("SELECT state FROM jobs WHERE id = ?", (job_id,))[0]
    assert job["state"] == "cancelled"
    assert fleet.hub.query("SELECT actor FROM audit WHERE action = 'api.jobs.cancel' AND outcome = 'ok'") == \
        [{"actor": "svc.ops"}]


def test_renew_from_the_device_page_issues_a_new_certificate(fleet):
    before = fleet.hub.cert_count("lab-03")
    ctx, page = page_for(fleet, fleet.ops)
    try:
        page.goto(fleet.origin + "/console/devices/lab-03")
        page.click("button[data-action=renew]")
        page.locator("dialog#confirm[open]").wait_for()
        assert "1 device" in page.locator("#confirm-text").inner_text()
        page.click("#confirm-ok")
        page.wait_for_url("**/console/jobs/*")
        page.locator("#job-state:text-is('completed')").wait_for(timeout=60_000)
        wait_until(lambda: fleet.hub.cert_count("lab-03") == before + 1, 30, "the renewed certificate")
        page.goto(fleet.origin + "/console/devices/lab-03")
        assert page.locator("tr[data-serial]").count() == before + 1
    finally:
        ctx.close()


def test_paging_and_a_live_stream_ends_with_the_hub(fleet):
    from datetime import datetime, timedelta, timezone

    from hub.registry.store import Registry

    reg = Registry(fleet.hub.registry_path)
    try:
        reg.create_devices_with_tokens([(f"bulk-{n:04d}", {}, ["bulk"]) for n in range(120)], "acme",
                                       datetime.now(timezone.utc), timedelta(days=1))
    finally:
        reg.close()
    status, _, body = fleet.call("GET", "/console/devices?group=bulk")
    html = body.decode()
    assert status == 200 and html.count('class="sel"') == 50 and "bulk-0049" in html and "bulk-0050" not in html
    assert 'id="next-page"' in html
    status, _, body = fleet.call("GET", "/console/devices?status=nonsense")
    assert status == 200 and "status must be one of" in body.decode()
    # an open event stream gets a first line at once and ends when the hub stops (SIGTERM: exit 0 within 10 s)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(fleet.hub.root_pem))
    d = fleet.hub.dir / "identities" / "ops"
    ctx.load_cert_chain(str(d / "ops.pem"), str(d / "ops.key"))
    conn = http.client.HTTPSConnection("127.0.0.1", fleet.port, context=ctx, timeout=20)
    conn.request("GET", "/console/events?presence=1&audit=1")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    assert resp.readline() == b"retry: 3000\n"
    for dev in fleet.agents:
        dev.stop()
    assert fleet.hub.stop() == 0
    rest = resp.read()
    assert b"event: bye" in rest  # the stream was ended by the hub (Hub.stop: exit 0 within its 10 s)
    conn.close()
