"""The fleet API's device lifecycle against a real `tessera-hub serve`: create (one or a batch, tokens answered
once), fresh tokens, decommission (DELETE keeps the audit trail), the pending/decommissioned filters and metrics,
and `tessera-hub device decommission` / `device list` on the new statuses.

Reuses tests/integration/test_api.py's module hub (`api`): its own instance for this module.
"""

from __future__ import annotations

import hashlib
import json
import re
import time

import pytest

from agent.estclient import EstClient, EstClientError
from hub.ca.policy import PolicyError, check_device_id
from hub.api.routes import all_routes
from tests.integration.brokerfixtures import ConnectRefused, enroll_device, session
from tests.integration.hubfixtures import make_csr, new_key
from tests.integration.test_api import api, is_problem  # noqa: F401 (the module fixture)

pytestmark = pytest.mark.integration
DEVICES = "/api/v1/devices"


def est_enroll(hub, device_id: str, token: str):
    return EstClient(hub.url, cafile=str(hub.root_pem)).simpleenroll(make_csr(new_key(), device_id), device_id,
                                                                     token)[0]


def device(api, device_id: str) -> dict:
    ans = api.call("GET", f"{DEVICES}/{device_id}")
    assert ans.status == 200, ans.body
    return ans.json()


def validator_message(device_id: str) -> str:
    try:
        check_device_id(device_id)
    except PolicyError as exc:
        return str(exc)
    raise AssertionError(f"{device_id!r} is valid")


# --- create ------------------------------------------------------------------------------------------------------

def test_create_one_device_answers_its_token_once_and_it_is_pending_until_enrolled(api):
    ans = api.call("POST", DEVICES, who="operator",
                   body={"id": "dv-one", "groups": ["line-a"], "labels": {"site": "berlin"}})
    assert ans.status == 201, ans.body
    out = ans.json()
    assert out["created"] == 1 and [d["id"] for d in out["devices"]] == ["dv-one"]
    token = out["devices"][0]["token"]
    assert out["devices"][0]["status"] == "pending" and out["token_expires"]
    d = device(api, "dv-one")
    assert (d["status"], d["groups"], d["labels"], d["certificates"]) == ("pending", ["line-a"], {"site": "berlin"}, [])
    assert token not in json.dumps(d)  # answered once: only its hash is kept
    stored = api.hub.query("SELECT token_hash FROM tokens WHERE device_id = 'dv-one'")
    assert [r["token_hash"] for r in stored] == [hashlib.sha256(token.encode()).hexdigest()]
    rows = api.hub.query("SELECT actor, action FROM audit WHERE device_id = 'dv-one' ORDER BY id")
    assert {"actor": "svc.operator", "action": "device.add"} in rows
    leaf = est_enroll(api.hub, "dv-one", token)
    d = device(api, "dv-one")
    assert d["status"] == "active" and d["certificates"][0]["serial"] == format(leaf.serial_number, "x")


def test_create_a_batch_in_one_transaction(api):
    body = {"devices": [{"id": f"dv-batch-{n}", "groups": ["batch"]} for n in range(3)] + [{"id": "dv-batch-x"}]}
    ans = api.call("POST", DEVICES, who="admin", body=body)
    assert ans.status == 201, ans.body
    out = ans.json()
    assert out["created"] == 4 and len({d["token"] for d in out["devices"]}) == 4
    listed = api.call("GET", f"{DEVICES}?status=pending&id_prefix=dv-batch-").json()["items"]
    assert [d["id"] for d in listed] == ["dv-batch-0", "dv-batch-1", "dv-batch-2", "dv-batch-x"]
    assert [d["id"] for d in api.call("GET", f"{DEVICES}?group=batch").json()["items"]] == [
        "dv-batch-0", "dv-batch-1", "dv-batch-2"]
    at = api.hub.query("SELECT DISTINCT at FROM audit WHERE device_id LIKE 'dv-batch-%' AND action = 'device.add'")
    assert len(at) == 1  # one transaction, one time


def test_create_10000_devices_in_one_call(api):
    body = {"devices": [{"id": f"dv-tenk-{n:05d}", "groups": ["tenk"]} for n in range(10_000)]}
    t0 = time.monotonic()
    ans = api.call("POST", DEVICES, who="operator", body=body)
    elapsed = time.monotonic() - t0
    print(f"create 10,000 devices with tokens over the API: {elapsed:.2f} s")
    assert ans.status == 201, ans.body[:500]
    assert ans.json()["created"] == 10_000 and elapsed < 30
    assert api.hub.query("SELECT COUNT(*) AS n FROM devices WHERE id LIKE 'dv-tenk-%' AND status = 'pending'"
                         )[0]["n"] == 10_000
    too_many = {"devices": [{"id": f"dv-over-{n:05d}"} for n in range(10_001)]}
    body = is_problem(api.call("POST", DEVICES, who="operator", body=too_many), 400)
    assert "10000" in body["detail"] and body["param"] == "devices"
    assert api.hub.query("SELECT COUNT(*) AS n FROM devices WHERE id LIKE 'dv-over-%'")[0]["n"] == 0


def test_create_problems_write_nothing(api):
    api.call("POST", DEVICES, who="operator", body={"id": "dv-taken"})
    before = api.hub.query("SELECT COUNT(*) AS n FROM devices")[0]["n"]
    body = is_problem(api.call("POST", DEVICES, who="operator", body={"id": "dv-taken"}), 409)
    assert "dv-taken" in body["detail"] and "exists" in body["detail"]
    # one taken id in a batch: the new ones are not created either
    is_problem(api.call("POST", DEVICES, who="operator",
                        body={"devices": [{"id": "dv-fresh-1"}, {"id": "dv-taken"}]}), 409)
    body = is_problem(api.call("POST", DEVICES, who="operator",
                               body={"devices": [{"id": "dv-twice"}, {"id": "dv-twice"}]}), 409)
    assert "twice" in body["detail"]
    for bad_id in ("Bad_ID", "-leading", "x" * 64):
        body = is_problem(api.call("POST", DEVICES, who="operator", body={"devices": [{"id": "dv-ok"},
                                                                                      {"id": bad_id}]}), 400)
        assert body["detail"] == validator_message(bad_id) and body["param"] == "id"
    body = is_problem(api.call("POST", DEVICES, who="operator", body={"id": "dv-g", "groups": ["Not Valid"]}), 400)
    assert "group" in body["detail"] and body["param"] == "groups"
    body = is_problem(api.call("POST", DEVICES, who="operator", body={"id": "dv-l", "labels": {"Bad Key": "v"}}),
                      400)
    assert "label" in body["detail"] and body["param"] == "labels"
    is_problem(api.call("POST", DEVICES, who="operator", body={"id": "dv-l", "labels": {"k": "\n"}}), 400)
    for bad in ({}, {"devices": []}, {"devices": "dv-a"}, {"devices": [{"id": "dv-a"}], "extra": 1},
                {"id": 7}, {"id": "dv-a", "colour": "red"}, {"id": "dv-a", "groups": "g"},
                {"id": "dv-a", "labels": ["k=v"]}, {"devices": ["dv-a"]}, [{"id": "dv-a"}]):
        is_problem(api.call("POST", DEVICES, who="operator", body=bad), 400)
    is_problem(api.call("POST", DEVICES, who="operator", body=b"{not json"), 400)
    is_problem(api.call("POST", DEVICES, who="viewer", body={"id": "dv-viewer"}), 403)
    assert api.hub.query("SELECT COUNT(*) AS n FROM devices")[0]["n"] == before


# --- tokens ------------------------------------------------------------------------------------------------------

def test_a_fresh_token_replaces_the_unused_one(api):
    first = api.call("POST", DEVICES, who="operator", body={"id": "dv-tok"}).json()["devices"][0]["token"]
    ans = api.call("POST", f"{DEVICES}/dv-tok/token", who="operator")
    assert ans.status == 201, ans.body
    fresh = ans.json()
    assert fresh["id"] == "dv-tok" and fresh["token"] != first and fresh["token_expires"]
    with pytest.raises(EstClientError) as err:
        est_enroll(api.hub, "dv-tok", first)
    assert (err.value.status, err.value.code) == (401, "unauthorized")  # generic: the audit says token_used
    est_enroll(api.hub, "dv-tok", fresh["token"])
    assert device(api, "dv-tok")["status"] == "active"
    again = api.call("POST", f"{DEVICES}/dv-tok/token", who="operator")  # re-enrollment of an active device
    assert again.status == 201
    is_problem(api.call("POST", f"{DEVICES}/dv-no-such/token", who="operator"), 404)
    is_problem(api.call("POST", f"{DEVICES}/dv-tok/token", who="viewer"), 403)
    api.call("POST", f"{DEVICES}/actions/suspend", who="operator",
             body={"selector": {"ids": ["dv-tok"]}, "confirm_count": 1})
    body = is_problem(api.call("POST", f"{DEVICES}/dv-tok/token", who="operator"), 409)
    assert "suspended" in body["detail"]


# --- decommission ------------------------------------------------------------------------------------------------

def test_decommission_cuts_the_live_session_and_keeps_the_audit_trail(api, tmp_path):
    dev = enroll_device(api.hub, "dv-retire", tmp_path)
    live = session(api.hub, dev)
    try:
        is_problem(api.call("DELETE", f"{DEVICES}/dv-retire", who="operator"), 403)  # admin only
        assert live.connected
        t0 = time.monotonic()
        ans = api.call("DELETE", f"{DEVICES}/dv-retire?reason=end%20of%20life", who="admin")
        assert ans.status == 200, ans.body
        out = ans.json()
        assert out["status"] == "decommissioned" and out["revoked_serials"] == [format(dev.cert.serial_number, "x")]
        assert live.disconnected.wait(5), "the live session was not cut"
        assert live.disconnect_at - t0 < 5
    finally:
        live.close()
    with pytest.raises(ConnectRefused):
        session(api.hub, dev).close()
    certs = api.hub.query("SELECT status, revocation_reason FROM certificates WHERE device_id = 'dv-retire'")
    assert certs == [{"status": "revoked", "revocation_reason": "cessationOfOperation"}]
    d = device(api, "dv-retire")  # the row stays
    assert d["status"] == "decommissioned" and d["certificates"][0]["status"] == "revoked"
    trail = [r["action"] for r in api.hub.query("SELECT action FROM audit WHERE device_id = 'dv-retire' ORDER BY id")]
    assert trail[:3] == ["device.add", "token.create", "enroll"] and "device.decommissioned" in trail
    row = api.hub.query("SELECT actor, detail FROM audit WHERE device_id = 'dv-retire' "
                        "AND action = 'device.decommissioned'")[0]
    assert row["actor"] == "svc.admin" and "end of life" in row["detail"]
    enforced = api.hub.query("SELECT detail FROM audit WHERE device_id = 'dv-retire' "
                             "AND action = 'device.decommissioned.enforced'")
    assert len(enforced) == 1 and enforced[0]["detail"].startswith("sessions cut: 1")
    again = api.call("DELETE", f"{DEVICES}/dv-retire", who="admin")  # idempotent
    assert again.status == 200 and again.json()["revoked_serials"] == []
    is_problem(api.call("POST", f"{DEVICES}/dv-retire/token", who="operator"), 409)
    is_problem(api.call("POST", DEVICES, who="operator", body={"id": "dv-retire"}), 409)  # the id stays taken
    resumed = api.call("POST", f"{DEVICES}/actions/resume", who="operator",
                       body={"selector": {"ids": ["dv-retire"]}, "confirm_count": 1}).json()
    assert (resumed["changed"], resumed["skipped"]) == (0, 1)  # final
    is_problem(api.call("DELETE", f"{DEVICES}/dv-never-was", who="admin"), 404)
    is_problem(api.call("DELETE", f"{DEVICES}/dv-retire?colour=red", who="admin"), 400)


def test_decommission_a_pending_device_voids_its_token(api):
    token = api.call("POST", DEVICES, who="operator", body={"id": "dv-unborn"}).json()["devices"][0]["token"]
    ans = api.call("DELETE", f"{DEVICES}/dv-unborn", who="admin")
    assert ans.status == 200 and ans.json()["status"] == "decommissioned"
    with pytest.raises(EstClientError) as err:
        est_enroll(api.hub, "dv-unborn", token)
    assert (err.value.status, err.value.code) == (401, "unauthorized")  # generic: the audit says token_used


# --- filters, metrics, the document, the CLI ------------------------------------------------------------------------

def test_status_filters_and_metrics_know_every_status(api):
    api.call("POST", DEVICES, who="operator", body={"devices": [{"id": "dv-st-p"}, {"id": "dv-st-d"}]})
    api.call("DELETE", f"{DEVICES}/dv-st-d", who="admin")
    assert [d["id"] for d in api.call("GET", f"{DEVICES}?status=pending&id_prefix=dv-st-").json()["items"]] \
        == ["dv-st-p"]
    assert [d["id"] for d in api.call("GET", f"{DEVICES}?status=decommissioned&id_prefix=dv-st-").json()["items"]] \
        == ["dv-st-d"]
    text = api.call("GET", "/metrics").body.decode()
    counts = {s: int(float(v)) for s, v in re.findall(r'^tessera_devices\{status="([a-z]+)"\} (\S+)$', text, re.M)}
    assert set(counts) == {"pending", "active", "suspended", "revoked", "decommissioned"}
    assert counts["pending"] >= 1 and counts["decommissioned"] >= 1


def test_openapi_documents_the_new_routes(api):
    doc = api.call("GET", "/api/v1/openapi.json").json()
    assert "201" in doc["paths"]["/api/v1/devices"]["post"]["responses"]
    assert "201" in doc["paths"]["/api/v1/devices/{id}/token"]["post"]["responses"]
    assert doc["paths"]["/api/v1/devices/{id}"]["delete"]["x-permission"] == "admin"
    assert {"409", "400"} <= set(doc["paths"]["/api/v1/devices"]["post"]["responses"])
    assert doc["components"]["schemas"]["Device"]["properties"]["status"]["enum"] == [
        "pending", "active", "suspended", "revoked", "decommissioned"]
    assert {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops} == {(r.method, r.path) for r in all_routes()}


def test_cli_decommission_and_device_list(api, tmp_path):
    enroll_device(api.hub, "dv-cli-live", tmp_path)
    api.hub.add_device("dv-cli-new")
    out = api.hub.cli_ok("device", "decommission", "dv-cli-live", "--reason", "scrapped")
    assert "dv-cli-live: decommissioned" in out and "1 certificate(s) revoked" in out
    rows = {r["id"]: r for r in json.loads(api.hub.cli_ok("device", "list", "--id-prefix", "dv-cli-", "--json"))}
    assert rows["dv-cli-live"]["status"] == "decommissioned" and rows["dv-cli-new"]["status"] == "pending"
    table = api.hub.cli_ok("device", "list", "--id-prefix", "dv-cli-")
    lines = {line.split()[0]: line for line in table.splitlines() if line.startswith("dv-cli-")}
    assert "decommissioned" in lines["dv-cli-live"] and "pending" in lines["dv-cli-new"]  # whole, not wrapped
    proc = api.hub.cli("device", "resume", "dv-cli-live")
    assert proc.returncode != 0 and "decommissioned" in proc.stderr


def test_sort_orders_page_through_the_api_and_the_csv_export(api):
    ids = [f"dv-so-{c}" for c in "abcde"]
    api.call("POST", DEVICES, who="operator", body={"devices": [{"id": i} for i in ids]})
    seen, cursor = [], None
    while True:
        ans = api.call("GET", f"{DEVICES}?id_prefix=dv-so-&sort=-id&limit=2" + (f"&cursor={cursor}" if cursor else ""))
        assert ans.status == 200, ans.body
        page = ans.json()
        seen += [d["id"] for d in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    first = api.call("GET", f"{DEVICES}?id_prefix=dv-so-&sort=-id&limit=2").json()["next_cursor"]
    mixed = api.call("GET", f"{DEVICES}?id_prefix=dv-so-&sort=id&limit=2&cursor={first}")
    is_problem(mixed, 400)  # a cursor belongs to its sort order
    csv_rows = api.call("GET", f"{DEVICES}?id_prefix=dv-so-&sort=-id&format=csv").body.decode().splitlines()
    assert [r.split(",")[0] for r in csv_rows[1:]] == ids[::-1]
    bad = api.call("GET", f"{DEVICES}?sort=color")
    assert "sort must be one of" in is_problem(bad, 400)["detail"]
    rows = json.loads(api.hub.cli_ok("device", "list", "--id-prefix", "dv-so-", "--sort=-id", "--json"))
    assert [r["id"] for r in rows] == ids[::-1]
    proc = api.hub.cli("device", "list", "--id-prefix", "dv-so-", "--sort=-id", "--limit", "2")
    assert proc.returncode == 0 and "--sort=-id" in proc.stderr  # the hint continues in the same order
    proc = api.hub.cli("device", "list", "--sort", "color")
    assert proc.returncode == 1 and "sort must be one of" in proc.stderr
