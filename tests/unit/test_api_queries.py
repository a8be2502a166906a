"""Fleet API queries without a server: selector parsing, indexed plans, keyset paging, the bulk transaction."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from hub.api import actions, queries
from hub.api.openapi import document
from hub.api.queries import BadRequest, Conflict, NotFound, Selector
from hub.api.routes import ROUTES
from hub.authz.policy import API_PERMISSIONS, DEFAULT_ROLES, GRANTABLE_ROLES
from hub.registry import Registry

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def reg(tmp_path):
    r = Registry(tmp_path / "registry.sqlite3")
    rows = [(f"dev-{n:04d}", {"site": "a" if n % 2 else "b"}, ["even"] if n % 2 == 0 else ["odd", "all"])
            for n in range(250)]
    r.create_devices_with_tokens(rows, "acme", NOW, timedelta(days=1))
    queries.apply_schema(r)
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
def test_every_filter_uses_an_index(reg, raw):
    source, where, params, key = Selector.parse(raw).sql()
    plan = [r["detail"] for r in reg.query(
        f"EXPLAIN QUERY PLAN SELECT d.id FROM {source} WHERE {where} AND {key} > ? ORDER BY {key} LIMIT 101",
        [*params, ""])]
    assert all(step.startswith(("SEARCH", "LIST SUBQUERY")) for step in plan), plan  # no SCAN, no sort


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
    doc = document(ROUTES)
    assert doc["openapi"].startswith("3.1")
    listed = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert listed == {(r.method, r.path) for r in ROUTES}
    json.dumps(doc)


def test_openapi_document_is_valid_openapi_3_1():
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(document(ROUTES))
