"""The HTTPS fleet API against a real `tessera-hub serve`: TLS, roles, filters, paging, bulk actions, problems.

One hub for the module, with `serve --api-port`; operators are service identities made by
`tessera-hub identity add NAME --role ROLE` (files under <hub>/identities/NAME/).
"""

from __future__ import annotations

import csv
import http.client
import io
import json
import re
import ssl
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from hub.api.routes import all_routes
from tests.helpers import free_port
from tests.integration.brokerfixtures import (BROKER_LIMITS, add_identity, enroll_device, exchange, session,
                                              sessions, wait_ready)
from tests.integration.hubfixtures import ForeignCA, running_hub

pytestmark = pytest.mark.integration
ROLES = ("viewer", "operator", "admin")
PERMS = {"viewer": {"read"}, "operator": {"read", "act"}, "admin": {"read", "act", "admin"}}


@dataclass
class Cred:
    cert: Path | None
    key: Path | None


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


class ApiHub:
    def __init__(self, hub, port: int):
        self.hub, self.port = hub, port
        self.creds: dict[str, Cred] = {}

    def identity(self, name: str, role: str) -> Cred:
        self.hub.cli_ok("identity", "add", name, "--role", role)
        d = self.hub.dir / "identities" / name
        cred = self.creds[name] = Cred(d / f"{name}.pem", d / f"{name}.key")
        return cred

    def context(self, cred: Cred | None) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cafile=str(self.hub.root_pem))
        if cred is not None and cred.cert is not None:
            ctx.load_cert_chain(str(cred.cert), str(cred.key))
        return ctx

    def call(self, method: str, path: str, who: str | Cred | None = "viewer", body=None) -> Answer:
        cred = self.creds[who] if isinstance(who, str) else who
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context(cred), timeout=30)
        try:
            data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
            resp = conn.getresponse()
            return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    base = tmp_path_factory.mktemp("apihub")
    port = free_port()
    with running_hub(base, api_port=port, **BROKER_LIMITS) as hub:
        wait_ready(hub)
        assert re.search(rf"(?m)^API\s+https://127\.0\.0\.1:{port}/api/v1/$", hub.stdout_text()), hub.stdout_text()
        a = ApiHub(hub, port)
        for role in ROLES:
            a.identity(role, role)
        a.identity("reader", "telemetry-reader")
        yield a


@pytest.fixture(scope="module")
def batch(api):
    """300 devices in one registry batch: groups 'even'/'odd', label site=a|b, ids page-0000..page-0299."""
    from hub.registry.store import Registry

    reg = Registry(api.hub.registry_path)
    try:
        rows = [(f"page-{n:04d}", {"site": "a" if n % 3 else "b"}, ["even" if n % 2 == 0 else "odd"])
                for n in range(300)]
        reg.create_devices_with_tokens(rows, "acme", datetime.now(timezone.utc), timedelta(days=1))
    finally:
        reg.close()
    return 300


def is_problem(ans: Answer, status: int) -> dict:
    assert ans.status == status, (ans.status, ans.body)
    assert ans.headers["content-type"].startswith("application/problem+json"), ans.headers
    body = ans.json()
    assert {"type", "title", "status", "detail"} <= set(body) and body["status"] == status
    return body


# --- TLS and authentication ----------------------------------------------------------------------------------------

def _refused(api: ApiHub, cred: Cred | None) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.RemoteDisconnected)):
        api.call("GET", "/api/v1/devices", who=cred or Cred(None, None))


def test_no_client_certificate_is_refused_at_the_handshake(api):
    _refused(api, None)


def test_certificate_from_another_ca_is_refused_at_the_handshake(api, tmp_path):
    cert, key = ForeignCA(tmp_path / "foreign").client("svc.viewer")
    _refused(api, Cred(cert, key))


def test_device_certificate_gets_403_but_health(api, tmp_path):
    dev = enroll_device(api.hub, "api-dev-0", tmp_path)
    cred = Cred(dev.chain, dev.key)
    body = is_problem(api.call("GET", "/api/v1/devices", who=cred), 403)
    assert "service" in body["detail"]
    is_problem(api.call("POST", "/api/v1/devices/actions/revoke", who=cred, body={"selector": {"ids": ["x"]}}), 403)
    assert api.call("GET", "/healthz", who=cred).json() == {"status": "ok"}
    assert api.call("GET", "/readyz", who=cred).json() == {"status": "ready"}


def test_role_without_api_permissions_and_revoked_identity_get_403(api):
    is_problem(api.call("GET", "/api/v1/devices", who="reader"), 403)
    api.identity("gone", "admin")
    assert api.call("GET", "/api/v1/devices", who="gone").status == 200
    api.hub.cli_ok("identity", "revoke", "gone", "--reason", "test")
    is_problem(api.call("GET", "/api/v1/devices", who="gone"), 403)


def _probe(route) -> tuple[str, object]:
    path = route.path.replace("{id}", "api-dev-nobody").replace("{name}", "api-nobody").replace("{batch}", "api-nobody")
    if route.name in ("devices.create", "identities.create"):
        return path, {"devices": []}  # refused after the permission check (400): creates nothing
    if route.name == "devices.status":
        return path, {"action": "suspend"}  # no such device: 404
    if route.name == "identities.revoke":
        return path, {}  # no such identity: 404
    if route.method == "POST":
        return path, {"selector": {"ids": ["api-dev-nobody"]}}  # a dry run: changes nothing
    if route.method == "PATCH":
        return path, {"labels": {}}
    return path, None


@pytest.mark.parametrize("role", ROLES)
def test_every_route_by_role(api, role):
    for route in all_routes():
        path, body = _probe(route)
        ans = api.call(route.method, path, who=role, body=body)
        if route.permission is None or route.permission in PERMS[role]:
            expected = (400,) if route.name in ("devices.create", "identities.create", "manufacturers.add") \
                else (200, 404)
            assert ans.status in expected, (role, route.method, path, ans.status, ans.body)
        else:
            is_problem(ans, 403)


# --- devices -----------------------------------------------------------------------------------------------------

def test_filters_and_cursor_paging(api, batch):
    seen, cursor = [], None
    while True:
        q = "/api/v1/devices?group=even&id_prefix=page-&limit=37" + (f"&cursor={cursor}" if cursor else "")
        page = api.call("GET", q).json()
        assert len(page["items"]) <= 37
        seen += [d["id"] for d in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"page-{n:04d}" for n in range(0, 300, 2)]
    both = api.call("GET", "/api/v1/devices?group=odd&label=site%3Db&limit=1000").json()["items"]
    assert [d["id"] for d in both] == [f"page-{n:04d}" for n in range(300) if n % 2 and n % 3 == 0]
    first = api.call("GET", "/api/v1/devices?id_prefix=page-&status=pending&online=false").json()
    assert len(first["items"]) == 100 and first["next_cursor"]
    assert api.call("GET", "/api/v1/devices?id_prefix=page-&online=true").json()["items"] == []
    assert api.call("GET", "/api/v1/devices?id_prefix=page-&last_seen_before=2100-01-01T00:00:00Z"
                    ).json()["items"] == []  # never seen
    assert api.call("GET", "/api/v1/devices?id_prefix=page-&cert_expires_before=2100-01-01T00:00:00Z"
                    ).json()["items"] == []  # none enrolled


def test_csv_export_streams_every_match(api, batch):
    ans = api.call("GET", "/api/v1/devices?id_prefix=page-&format=csv")
    assert ans.status == 200 and ans.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(ans.body.decode())))
    assert rows[0][:2] == ["id", "status"] and len(rows) == 301


@pytest.mark.parametrize("query", ["status=gone", "group=Bad_Group", "label=site", "online=maybe", "limit=0",
                                   "limit=1001", "cursor=zzz", "cert_expires_before=soon", "colour=red",
                                   "format=xml", "status=active&status=revoked"])
def test_bad_filters_are_problems(api, query):
    body = is_problem(api.call("GET", f"/api/v1/devices?{query}"), 400)
    assert body.get("param")


def test_show_patch_and_problems(api, tmp_path):
    is_problem(api.call("GET", "/api/v1/devices/no-such-device"), 404)
    is_problem(api.call("GET", "/api/v1/nothing-here"), 404)
    is_problem(api.call("DELETE", "/api/v1/devices"), 405)
    api.hub.add_device("api-edit-0", "--group", "before")
    seq = api.hub.query("SELECT COALESCE(MAX(seq), 0) AS s FROM authz_events")[0]["s"]
    ans = api.call("PATCH", "/api/v1/devices/api-edit-0", who="operator",
                   body={"groups": ["after", "lab"], "labels": {"site": "berlin"}})
    assert ans.status == 200, ans.body
    assert ans.json()["groups"] == ["after", "lab"] and ans.json()["labels"] == {"site": "berlin"}
    events = api.hub.query("SELECT principal, reason FROM authz_events WHERE seq > ?", (seq,))
    assert {"principal": "api-edit-0", "reason": "groups changed"} in events
    assert [d["id"] for d in api.call("GET", "/api/v1/devices?group=lab").json()["items"]] == ["api-edit-0"]
    assert api.call("GET", "/api/v1/devices?group=before&id_prefix=api-edit").json()["items"] == []
    is_problem(api.call("PATCH", "/api/v1/devices/api-edit-0", who="operator", body={"groups": ["Not Valid"]}), 400)
    is_problem(api.call("PATCH", "/api/v1/devices/api-edit-0", who="operator", body={"colour": "red"}), 400)
    is_problem(api.call("PATCH", "/api/v1/devices/api-edit-0", who="operator", body=b"{not json"), 400)
    is_problem(api.call("PATCH", "/api/v1/devices/api-edit-0", who="viewer", body={"groups": []}), 403)
    assert api.call("GET", "/api/v1/devices/api-edit-0").json()["groups"] == ["after", "lab"]
    rows = api.hub.query("SELECT actor, detail FROM audit WHERE action = 'device.edit' AND device_id = 'api-edit-0'")
    assert rows and rows[-1]["actor"] == "svc.operator"


def test_patch_groups_changes_a_live_sessions_rights(api, tmp_path):
    dev = enroll_device(api.hub, "api-grp-0", tmp_path / "d", groups=("before",))
    cmd = add_identity(api.hub, "api-cmd", "commander", tmp_path / "c")
    with sessions(session(api.hub, dev), session(api.hub, cmd)) as (d, c):
        assert d.subscribe("fleet/groups/before/#") < 0x80
        exchange(c, d, "fleet/groups/before/x", b"one")
        assert d.subscribe("fleet/groups/after/#") >= 0x80  # not a member yet
        ans = api.call("PATCH", "/api/v1/devices/api-grp-0", who="operator", body={"groups": ["after"]})
        assert ans.status == 200, ans.body
        assert d.subscribe("fleet/groups/after/#") < 0x80
        exchange(c, d, "fleet/groups/after/x", b"two")
        c.publish("fleet/groups/before/x", b"three")
        exchange(c, d, "fleet/groups/after/x", b"four")  # after 'three' on the same connection
        assert b"three" not in [m.payload for m in d.received] and d.connected


# --- bulk actions ----------------------------------------------------------------------------------------------------

def test_bulk_revoke_of_a_group_cuts_a_live_session(api, tmp_path):
    devs = [enroll_device(api.hub, f"api-doomed-{n}", tmp_path, groups=("doomed",)) for n in range(2)]
    for n in range(20):
        api.hub.add_device(f"api-doomed-x{n:02d}", "--group", "doomed")
    path = "/api/v1/devices/actions/revoke"
    sel = {"selector": {"group": "doomed"}, "reason": "keyCompromise"}
    live = session(api.hub, devs[0])
    try:
        is_problem(api.call("POST", path, who="viewer", body={**sel, "confirm_count": 22}), 403)
        assert api.call("POST", path, who="operator", body=sel).json() == {"matched": 22, "dry_run": True}
        before = api.hub.state()
        body = is_problem(api.call("POST", path, who="operator", body={**sel, "confirm_count": 21}), 409)
        assert "22" in body["detail"]
        assert api.hub.state() == before and live.connected
        t0 = time.monotonic()
        ans = api.call("POST", path, who="operator", body={**sel, "confirm_count": 22})
        assert ans.status == 200, ans.body
        out = ans.json()
        assert (out["matched"], out["changed"], out["dry_run"], out["revoked_certificates"]) == (22, 22, False, 2)
        assert live.disconnected.wait(5), "the live session was not cut"
        assert live.disconnect_at - t0 < 5
    finally:
        live.close()
    statuses = api.hub.query("SELECT status, COUNT(*) AS n FROM devices WHERE id LIKE 'api-doomed-%' GROUP BY status")
    assert statuses == [{"status": "revoked", "n": 22}]
    certs = api.hub.query("SELECT status FROM certificates WHERE device_id LIKE 'api-doomed-%'")
    assert [c["status"] for c in certs] == ["revoked", "revoked"]
    audit = api.hub.query("SELECT actor FROM audit WHERE action = 'device.revoked' AND device_id LIKE 'api-doomed-%'")
    assert len(audit) == 22 and {a["actor"] for a in audit} == {"svc.operator"}
    again = api.call("POST", "/api/v1/devices/actions/resume", who="admin",
                     body={"selector": {"group": "doomed"}, "confirm_count": 22}).json()
    assert (again["changed"], again["skipped"]) == (0, 22)  # revocation is final


def test_bulk_revoke_of_10000_devices_is_one_transaction(api):
    from hub.registry.store import Registry

    reg = Registry(api.hub.registry_path)
    try:
        reg.create_devices_with_tokens([(f"tenk-{n:05d}", None, ["tenk"]) for n in range(10_000)], "acme",
                                       datetime.now(timezone.utc), timedelta(days=1))
    finally:
        reg.close()
    seq = api.hub.query("SELECT COALESCE(MAX(seq), 0) AS s FROM authz_events")[0]["s"]
    mark = api.hub.last_audit_id()
    body = {"selector": {"group": "tenk"}, "reason": "superseded"}
    path = "/api/v1/devices/actions/revoke"
    assert api.call("POST", path, who="admin", body=body).json() == {"matched": 10_000, "dry_run": True}
    t0 = time.monotonic()
    out = api.call("POST", path, who="admin", body={**body, "confirm_count": 10_000}).json()
    elapsed = time.monotonic() - t0
    print(f"revoke 10,000 by selector over the API: {elapsed:.2f} s; {out['timings']}")
    assert out["changed"] == 10_000 and elapsed < 20, (out, elapsed)
    events = api.hub.query("SELECT COUNT(*) AS n FROM authz_events WHERE seq > ? AND principal LIKE 'tenk-%'",
                           (seq,))[0]["n"]
    assert events == 10_000
    rows = api.hub.query("SELECT at, action FROM audit WHERE id > ? AND device_id LIKE 'tenk-%'", (mark,))
    assert len(rows) == 10_000 and len({r["at"] for r in rows}) == 1  # one transaction, one time
    enforced = api.hub.query("SELECT detail FROM audit WHERE id > ? AND action = 'devices.revoke.enforced'", (mark,))
    assert len(enforced) == 1 and enforced[0]["detail"].startswith("10000 devices")


def test_bulk_suspend_and_resume_by_ids(api):
    ids = [f"api-sus-{n}" for n in range(3)]
    for i in ids:
        api.hub.add_device(i)
    path = "/api/v1/devices/actions/"
    sel = {"selector": {"ids": ids + ["api-sus-missing"]}}
    assert api.call("POST", path + "suspend", who="operator", body=sel).json()["matched"] == 3
    assert api.call("POST", path + "suspend", who="operator", body={**sel, "confirm_count": 3}).json()["changed"] == 3
    assert {d["status"] for d in api.call("GET", "/api/v1/devices?id_prefix=api-sus-").json()["items"]} \
        == {"suspended"}
    assert api.call("POST", path + "resume", who="operator", body={**sel, "confirm_count": 3}).json()["changed"] == 3
    for bad in ({"selector": {}}, {"selector": {"status": "nope"}}, {"selector": {"ids": ids}, "confirm_count": "3"},
                {"selector": {"ids": ids}, "colour": 1}, {"selector": "all"}):
        is_problem(api.call("POST", path + "suspend", who="operator", body=bad), 400)


# --- documents, metrics, audit ---------------------------------------------------------------------------------------

def test_openapi_lists_every_route(api):
    doc = api.call("GET", "/api/v1/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    assert {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops} == {(r.method, r.path) for r in all_routes()}


def test_metrics(api, batch):
    ans = api.call("GET", "/metrics")
    assert ans.status == 200 and ans.headers["content-type"].startswith("text/plain")
    text = ans.body.decode()
    pending = int(float(re.search(r'^tessera_devices\{status="pending"\} (\S+)$', text, re.M).group(1)))
    assert pending >= 300  # the batch never enrolled
    assert re.search(r'^tessera_devices_online \S+$', text, re.M)
    assert re.search(r'^tessera_certificates_expiring\{within="7d"\} \S+$', text, re.M)
    assert re.search(r'^tessera_certificates_expiring\{within="30d"\} \S+$', text, re.M)


def test_calls_are_audited_with_the_principal(api):
    mark = api.hub.last_audit_id()
    api.call("GET", "/api/v1/devices?limit=1", who="admin")
    api.call("POST", "/api/v1/devices/actions/revoke", who="viewer", body={"selector": {"ids": ["x"]}})
    rows = api.hub.wait_audit(mark, lambda r: r["action"] == "api.devices.revoke")
    assert {"actor": "svc.admin", "outcome": "ok"} in [{k: r[k] for k in ("actor", "outcome")} for r in rows
                                                       if r["action"] == "api.devices.list"]
    denied = [r for r in rows if r["action"] == "api.devices.revoke"]
    assert denied[0]["actor"] == "svc.viewer" and denied[0]["outcome"] == "denied"


def test_serve_without_api_settings_still_runs(tmp_path):
    """No [api] in fleet.toml: the default port 8444; if that is taken (another hub here), serve runs on without
    the API and says so (an explicitly configured port that is taken stops serve instead)."""
    with running_hub(tmp_path, api_port=None, **BROKER_LIMITS) as hub:
        wait_ready(hub)
        line = next(x for x in hub.stdout_text().splitlines() if x.startswith("API "))
        assert re.fullmatch(r"API\s+(https://127\.0\.0\.1:8444/api/v1/|not started: port 8444 unavailable .*)",
                            line), line
