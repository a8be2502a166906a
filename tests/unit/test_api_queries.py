"""Fleet API queries without a server: selector parsing, indexed plans, keyset paging, the bulk transaction."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from hub.api import actions, queries
from hub.api.openapi import document
from hub.api.queries import BadRequest, Conflict, NotFound, Selector
from hub.api.routes import all_routes
from hub.authz.policy import API_PERMISSIONS, DEFAULT_ROLES, GRANTABLE_ROLES
from hub.registry.store import Registry, _ts
from tests.integration.pgfixtures import any_registry, pg_server, pg_url, registry_target  # noqa: F401

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def _fleet(r: Registry) -> Registry:
    rows = [(f"dev-{n:04d}", {"site": "a" if n % 2 else "b"}, ["even"] if n % 2 == 0 else ["odd", "all"])
            for n in range(250)]
    r.create_devices_with_tokens(rows, "acme", NOW, timedelta(days=1))
    queries.apply_schema(r)
    return r


@pytest.fixture
def reg(any_registry):  # noqa: F811 - on each dialect
    return _fleet(any_registry)


@pytest.fixture
def sqlite_reg(tmp_path):
    """SQLite only: its query plans."""
    r = _fleet(Registry(tmp_path / "registry.sqlite3"))
    yield r
    r.close()


def test_roles_and_permissions_are_data():
    assert API_PERMISSIONS["viewer"] == {"read"} and API_PERMISSIONS["operator"] == {"read", "act"}
    assert API_PERMISSIONS["admin"] == {"read", "act", "admin"}
    assert DEFAULT_ROLES["viewer"] == () and DEFAULT_ROLES["operator"] == ()
    assert {"viewer", "operator"} <= set(GRANTABLE_ROLES)


@pytest.mark.parametrize("raw", [{"status": "gone"}, {"group": "Bad_Name"}, {"label": "site"}, {"online": "yes"},
                                 {"id_prefix": "A"}, {"cert_expires_before": "tomorrow"},
                                 {"last_seen_before": "2026-01-01T00:00:00"}, {"colour": "red"}])
def test_bad_filters_are_refused(raw):
    with pytest.raises(BadRequest):
        Selector.parse(raw)


def test_ids_only_in_selectors_and_not_with_filters():
    with pytest.raises(BadRequest):
        Selector.parse({"ids": ["a"]})
    with pytest.raises(BadRequest):
        Selector.parse({"ids": ["a"], "status": "active"}, allow_ids=True)
    assert Selector.parse({"ids": ["a", "a"]}, allow_ids=True).ids == ["a"]


def test_filters_and_paging(reg):
    assert queries.count(reg, Selector.parse({"group": "odd"})) == 125
    assert queries.count(reg, Selector.parse({"label": "site=b", "group": "even"})) == 125
    assert queries.count(reg, Selector.parse({"id_prefix": "dev-01"})) == 100
    assert queries.count(reg, Selector.parse({"online": "false", "status": "pending"})) == 250
    seen, after = [], None
    while True:
        page, cursor = queries.list_devices(reg, Selector.parse({"group": "all"}), 40, after)
        seen += [d["id"] for d in page]
        if cursor is None:
            break
        after = queries.decode_cursor(cursor)
    assert seen == sorted(seen) and len(seen) == len(set(seen)) == 125
    with pytest.raises(BadRequest):
        queries.decode_cursor("not-a-cursor")


def test_triggers_follow_group_edits(reg):
    assert actions.patch_device(reg, "dev-0000", {"groups": ["lab"]}, NOW, "svc.ops")["groups_changed"]
    assert queries.count(reg, Selector.parse({"group": "lab"})) == 1
    assert queries.count(reg, Selector.parse({"group": "even"})) == 124
    events = reg.query("SELECT principal, reason FROM authz_events WHERE principal = 'dev-0000'")
    assert events == [{"principal": "dev-0000", "reason": "groups changed"}]
    assert actions.patch_device(reg, "dev-0000", {"groups": ["lab"]}, NOW, "svc.ops") == \
        {"changed": False, "groups_changed": False}
    assert actions.patch_device(reg, "dev-0000", {"labels": {"a": "b"}}, NOW, "svc.ops") == \
        {"changed": True, "groups_changed": False}
    with pytest.raises(BadRequest):
        actions.patch_device(reg, "dev-0000", {"groups": ["No!"]}, NOW, "svc.ops")
    with pytest.raises(NotFound):
        actions.patch_device(reg, "nope", {"labels": {}}, NOW, "svc.ops")


@pytest.mark.parametrize("raw", [{"status": "active"}, {"group": "odd"}, {"label": "site=a"}, {"online": "true"},
                                 {"id_prefix": "dev-1"}, {"cert_expires_before": "2027-01-01T00:00:00Z"},
                                 {"last_seen_before": "2027-01-01T00:00:00Z"}])
def test_every_filter_uses_an_index(sqlite_reg, raw):
    source, where, params, key = Selector.parse(raw).sql()
    plan = [r["detail"] for r in sqlite_reg.query(
        f"EXPLAIN QUERY PLAN SELECT d.id FROM {source} WHERE {where} AND {key} > ? ORDER BY {key} LIMIT 101",
        [*params, ""])]
    assert all(step.startswith(("SEARCH", "LIST SUBQUERY")) for step in plan), plan  # no SCAN, no sort


def test_bulk_suspend_marks_the_online_ones_offline_and_last_seen_now(reg):
    with reg.write() as db:
        db.execute("UPDATE devices SET online = 1, last_seen = '2026-01-01T00:00:00.000000+00:00' "
                   "WHERE id IN ('dev-0001', 'dev-0003')")
    actions.bulk_status(reg, "suspend", Selector.parse({"ids": ["dev-0001", "dev-0002"]}, allow_ids=True), 2, "",
                        NOW, "svc.ops")
    rows = {r["id"]: r for r in reg.query("SELECT id, online, last_seen FROM devices WHERE id IN "
                                         "('dev-0001', 'dev-0002', 'dev-0003')")}
    assert rows["dev-0001"]["online"] == 0 and rows["dev-0001"]["last_seen"] == _ts(NOW)
    assert rows["dev-0002"]["online"] == 0 and rows["dev-0002"]["last_seen"] is None  # never seen stays so
    assert rows["dev-0003"]["online"] == 1  # not selected


def test_bulk_revoke_is_one_transaction_with_events(reg):
    sel = Selector.parse({"group": "odd"})
    before = reg.authz_seq()
    with pytest.raises(Conflict):
        actions.bulk_status(reg, "revoke", sel, 124, "test", NOW, "svc.ops")
    assert reg.authz_seq() == before and queries.count(reg, Selector.parse({"status": "revoked"})) == 0
    out = actions.bulk_status(reg, "revoke", sel, 125, "keyCompromise", NOW, "svc.ops")
    assert len(out["changed"]) == 125 and out["skipped"] == 0
    assert queries.count(reg, Selector.parse({"status": "revoked"})) == 125
    assert reg.authz_seq() - before == 125
    rows = reg.query("SELECT actor, detail FROM audit WHERE action = 'device.revoked'")
    assert len(rows) == 125 and all(r["actor"] == "svc.ops" and "keyCompromise" in r["detail"] for r in rows)
    again = actions.bulk_status(reg, "resume", sel, 125, "", NOW, "svc.ops")
    assert again["changed"] == [] and again["skipped"] == 125  # revocation is final


def test_openapi_lists_every_route():
    doc = document(all_routes())
    assert doc["openapi"].startswith("3.1")
    listed = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert listed == {(r.method, r.path) for r in all_routes()}
    json.dumps(doc)


def test_openapi_document_is_valid_openapi_3_1():
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(document(all_routes()))


# --- fuzz findings (tests/integration/test_api_fuzz.py) at the unit level -------------------------------------------

@pytest.mark.parametrize("value", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "2026-13-01T00:00Z",
                                   "not a time", "2026-01-01T00:00:00"])
def test_parse_time_refuses_out_of_range_and_invalid_times(value):
    with pytest.raises(BadRequest) as exc:
        queries.parse_time(value, "last_seen_before")
    assert exc.value.param == "last_seen_before" and "\n" not in str(exc.value)


def test_parse_time_keeps_the_edges_of_the_range_in_utc():
    assert queries.parse_time("0001-01-01T00:00:00Z", "t").startswith("0001-01-01T00:00:00")
    assert queries.parse_time("9999-12-31T23:59:59+00:00", "t").startswith("9999-12-31T23:59:59")


def _b64(raw: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize("cursor", [
    "", "====", "a b", "\u00b2", _b64(b"[" * 90), _b64(b"[" * 5000), _b64(b'{"after": "\\ud800"}'),
    _b64(b'{"after": "Dev-1"}'), _b64(b'{"after": ""}'), _b64(b'{"after": 1}'), _b64(b'{"after": "dev-1", "x": 1}'),
    _b64(b'["dev-1"]'), _b64('{"after": "d\u00e9v"}'.encode()), _b64(b"\xff\xfe"),
])
def test_decode_cursor_is_strict(cursor):
    with pytest.raises(BadRequest, match="invalid cursor") as exc:
        queries.decode_cursor(cursor)
    assert exc.value.param == "cursor"


def test_decode_cursor_takes_what_encode_cursor_hands_out():
    longest = "d" * 63
    assert queries.decode_cursor(queries.encode_cursor("dev-0001")) == "dev-0001"
    assert queries.decode_cursor(queries.encode_cursor(longest)) == longest
    assert len(queries.encode_cursor(longest)) <= queries.MAX_CURSOR


@pytest.mark.parametrize("label", ["site=\ud800", "site=caf\u00e9", "site= a", "site=a\n", "site=" + "a" * 129])
def test_label_filter_values_are_printable_ascii(label):
    with pytest.raises(BadRequest, match="label value"):
        Selector.parse({"label": label})


def test_selector_time_overflow_is_bad_input():
    with pytest.raises(BadRequest, match="out of range"):
        Selector.parse({"cert_expires_before": "0001-01-01T00:00:00+01:00"}, allow_ids=True)


def _schema(doc, name):
    import jsonschema

    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": doc["components"]})


def test_openapi_schemas_carry_the_servers_constraints():
    doc = document(all_routes())
    patch, selector, bulk = (_schema(doc, n) for n in ("DevicePatch", "Selector", "BulkRequest"))
    assert patch.is_valid({"groups": ["lab-1"], "labels": {"site": "s 1"}})
    for bad in ({"groups": ["Lab"]}, {"labels": {"Site": "x"}}, {"labels": {"site": ""}}, {"labels": {"s": " x"}},
                {"labels": {"s": "x" * 129}}, {"labels": {"s": "caf\u00e9"}}):
        assert not patch.is_valid(bad), bad
    assert selector.is_valid({"ids": ["a"]}) and selector.is_valid({"status": "active", "label": "site=s1"})
    for bad in ({"ids": ["a"], "status": "active"}, {"label": "site"}, {"group": "Lab"}, {"id_prefix": "-"}, {}):
        assert not selector.is_valid(bad), bad
    assert bulk.is_valid({"selector": {"ids": ["a"]}, "reason": "r" * 200})
    for bad in ("caf\u00e9", "a\tb", "r" * 201):
        assert not bulk.is_valid({"selector": {"ids": ["a"]}, "reason": bad}), bad
    listing = doc["paths"]["/api/v1/devices"]["get"]
    assert set(listing["responses"]["200"]["content"]) == {"application/json", "text/csv"}
    cursor = next(p for p in listing["parameters"] if p["name"] == "cursor")["schema"]
    assert cursor["minLength"] == 1  # an empty cursor is a 400, and documented so
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert ("413" in op["responses"]) == ("requestBody" in op), (method, path)


def test_audit_of_a_device_never_heard_of_is_404_not_an_empty_page(reg):
    """GET /audit?device=: 404 for an id neither registered nor named by any audit row; an unregistered id that
    tried to enroll has its denial rows; a device with nothing matching gets an empty page."""
    from hub.api.auditroutes import audit_page

    with pytest.raises(NotFound, match="no device 'nosuch'"):
        audit_page(reg, {"device": "nosuch"})
    reg.audit("est.enroll", "denied", NOW, actor="ghost-1", device_id="ghost-1", detail="unauthorized")
    assert [r["action"] for r in audit_page(reg, {"device": "ghost-1"})["items"]] == ["est.enroll"]
    assert audit_page(reg, {"device": "ghost-1", "action": "device.revoked"})["items"] == []
    assert audit_page(reg, {"device": "dev-0001", "action": "device.revoked"})["items"] == []
