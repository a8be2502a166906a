"""The fleet API's registry work on both dialects where they differ: side tables kept by triggers, bulk dry run and
confirm, audit and identity routes' queries, watch's group members, the expiry report's julianday and PG plans."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from hub.api import actions, queries
from hub.api.queries import Conflict, Selector
from hub.registry.store import Registry, _ts
from hub.reports import expiry
from tests.integration.pgfixtures import any_registry, pg_server, pg_url, registry_target  # noqa: F401

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
DAY = timedelta(days=1)


def _devices(reg: Registry, n: int, prefix: str = "dev") -> None:
    reg.create_devices_with_tokens([(f"{prefix}-{i:02d}", {"site": "a" if i % 2 else "b"},
                                     ["odd"] if i % 2 else ["even"]) for i in range(n)], "acme", NOW, DAY)


def _side_tables_match(reg: Registry) -> None:
    groups, labels = set(), set()
    for d in reg.query("SELECT id, groups, labels FROM devices"):
        groups |= {(g, d["id"]) for g in json.loads(d["groups"])}
        labels |= {(k, v, d["id"]) for k, v in json.loads(d["labels"]).items()}
    assert {(r["grp"], r["device_id"]) for r in reg.query("SELECT grp, device_id FROM device_groups")} == groups
    assert {(r["key"], r["value"], r["device_id"])
            for r in reg.query("SELECT key, value, device_id FROM device_labels")} == labels


def test_side_tables_follow_every_writer(any_registry):  # noqa: F811
    reg = any_registry
    _devices(reg, 6)
    queries.apply_schema(reg)  # backfill of the devices already there
    _side_tables_match(reg)
    assert queries.count(reg, Selector.parse({"group": "odd"})) == 3
    _devices(reg, 2, prefix="new")  # insert trigger
    actions.patch_device(reg, "dev-01", {"groups": ["lab", "odd"], "labels": {"site": "c", "rack": "7"}}, NOW, "t")
    with reg.write() as db:  # another writer (the CLI, another hub) changes the JSON columns directly
        db.execute("UPDATE devices SET groups = '[]', labels = '{}' WHERE id = 'dev-03'")
        db.execute("DELETE FROM tokens WHERE device_id = 'dev-05'")
        db.execute("DELETE FROM devices WHERE id = 'dev-05'")  # delete trigger
    queries.apply_schema(reg)  # idempotent: no second backfill, no duplicate
    _side_tables_match(reg)
    assert [d["id"] for d in queries.list_devices(reg, Selector.parse({"group": "odd"}), 10, None)[0]] == \
        ["dev-01", "new-01"]
    assert queries.count(reg, Selector.parse({"group": "lab", "label": "rack=7"})) == 1
    assert queries.count(reg, Selector.parse({"label": "site=a"})) == 1  # new-01 (dev-01 moved, 03 cleared, 05 gone)
    assert queries.count(reg, Selector.parse({"label": "site=a", "group": "odd"})) == 1
    assert [d["id"] for d in queries.list_devices(reg, Selector.parse({"group": "odd"}), 10, None, "-created")[0]]\
        == ["new-01", "dev-01"]  # the same created: id DESC breaks the tie
    assert {d["id"] for d in queries.iter_devices(reg, Selector.parse({"group": "odd"}), page=1, sort="-last_seen")} \
        == {"dev-01", "new-01"}


def test_bulk_dry_run_then_confirm(any_registry):  # noqa: F811
    reg = any_registry
    _devices(reg, 6)
    queries.apply_schema(reg)
    sel = Selector.parse({"label": "site=a", "status": "pending"})
    dry = queries.count(reg, sel)  # what the route answers without confirm_count
    assert dry == 3
    before = reg.authz_seq()
    with pytest.raises(Conflict):
        actions.bulk_status(reg, "suspend", sel, dry + 1, "", NOW, "svc.ops")
    assert reg.authz_seq() == before and queries.count(reg, Selector.parse({"status": "suspended"})) == 0
    out = actions.bulk_status(reg, "suspend", sel, dry, "maintenance", NOW, "svc.ops")
    assert out["changed"] == ["dev-01", "dev-03", "dev-05"] and out["matched"] == 3 and out["skipped"] == 0
    assert reg.authz_seq() - before == 3
    ids = Selector.parse({"ids": ["dev-01", "dev-02", "dev-05", "nosuch"]}, allow_ids=True)
    assert queries.count(reg, ids) == 3
    again = actions.bulk_status(reg, "resume", ids, 3, "", NOW, "svc.ops")  # never enrolled: back to pending
    assert again["changed"] == ["dev-01", "dev-05"] and again["skipped"] == 1
    assert {d["id"]: d["status"] for d in queries.list_devices(reg, ids, 10, None)[0]} == \
        {"dev-01": "pending", "dev-02": "pending", "dev-05": "pending"}
    revoke = actions.bulk_status(reg, "revoke", Selector.parse({"id_prefix": "dev-0"}), 6, "", NOW, "svc.ops")
    assert len(revoke["changed"]) == 6 and revoke["revoked_certificates"] == 0
    assert reg.verify_audit().ok


def test_audit_list_and_verify(any_registry):  # noqa: F811
    from hub.api.auditroutes import audit_page, verify_chain

    reg = any_registry
    queries.apply_schema(reg)
    for n in range(5):
        reg.audit("api.devices.list", "ok", NOW + n * DAY, actor="svc.a", detail="GET /api/v1/devices")
        reg.audit("device.suspended", "ok", NOW + n * DAY, actor="svc.b", device_id=f"d-{n}")
    page = audit_page(reg, {"limit": "3"})
    assert len(page["items"]) == 3 and page["next_cursor"] and page["items"][0]["action"] == "device.suspended"
    rest = audit_page(reg, {"limit": "1000", "cursor": page["next_cursor"]})
    assert len(rest["items"]) == 7 and rest["next_cursor"] is None
    assert {r["action"] for r in audit_page(reg, {"api_calls": "only"})["items"]} == {"api.devices.list"}
    assert {r["action"] for r in audit_page(reg, {"api_calls": "exclude"})["items"]} == {"device.suspended"}
    assert [r["device_id"] for r in audit_page(reg, {"actor": "svc.b", "since": "2026-12-04T00:00:00Z"})["items"]] \
        == ["d-4", "d-3"]
    assert audit_page(reg, {"device": "d-2"})["items"][0]["actor"] == "svc.b"
    assert audit_page(reg, {"since": "2030-01-01T00:00:00Z"})["items"] == []
    verdict = verify_chain(reg)
    assert verdict["ok"] and verdict["checked"] == 10 and verdict["broken_at"] is None


def _cert(cn: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(NOW).not_valid_after(NOW + 30 * DAY)
            .sign(key, hashes.SHA256()))


def test_identity_renewal_and_its_audit_rows(any_registry):  # noqa: F811
    from hub.api import identityroutes
    from hub.authz.policy import service_principal

    reg = any_registry
    name = identityroutes.LOCAL_OPERATOR
    with reg.write() as db:
        db.execute("INSERT INTO identities (name, kind, role, status, created) VALUES (?, 'service', ?, 'active', ?)",
                   [name, identityroutes.LOCAL_ROLE, _ts(NOW)])
    identityroutes._renew(reg, identityroutes.LOCAL_OPERATOR, _cert("first"), NOW)  # noqa: SLF001
    identityroutes._renew(reg, identityroutes.LOCAL_OPERATOR, _cert("second"), NOW + DAY)  # noqa: SLF001
    rows = reg.query("SELECT subject, status FROM identity_certificates WHERE identity = ? ORDER BY issued_at",
                     [name])
    assert [(r["subject"], r["status"]) for r in rows] == [("CN=first", "superseded"), ("CN=second", "active")]
    principal = service_principal(name)
    reg.audit("identity.add", "ok", NOW, actor="hub", detail=f"identity={principal}x role=admin")  # another name
    reg.audit("identity.revoke", "ok", NOW, actor="hub", detail=f"identity={principal};reason")
    reg.audit("identity.add", "ok", NOW, actor="hub", detail=f"IDENTITY={principal} role=admin")  # not the prefix
    got = identityroutes._identity_audit(reg, principal)  # noqa: SLF001
    assert [r["action"] for r in got] == ["identity.revoke", "identity.renew", "identity.renew"]


def test_watch_resolves_a_group_to_its_members(any_registry):  # noqa: F811
    from hub.cli.watch import _group_members

    reg = any_registry
    _devices(reg, 5)
    reg.set_status("dev-03", "revoked", NOW, actor="t")
    assert _group_members(reg, "odd") == ["dev-01"] and _group_members(reg, "even") == ["dev-00", "dev-02", "dev-04"]
    assert _group_members(reg, "nope") == []


_CERT = ("INSERT INTO certificates (serial, device_id, subject, not_before, not_after, fingerprint_sha256, status, "
         "issued_at, pem) VALUES (?, ?, 'CN=x', ?, ?, 'f', 'active', ?, '')")


def _certified(reg: Registry) -> list[tuple[str, str]]:
    """Certificates of odd lifetimes and fractional seconds on four devices."""
    _devices(reg, 4)
    queries.apply_schema(reg)
    expiry.apply_schema(reg)
    spans = [(NOW - timedelta(days=10, microseconds=123457), timedelta(days=7, seconds=1, microseconds=999999)),
             (NOW + timedelta(seconds=0.5), timedelta(hours=1, microseconds=1)),
             (NOW, timedelta(days=365 * 5, seconds=13)),
             (NOW - timedelta(minutes=3), timedelta(seconds=90))]
    with reg.write() as db:
        for n, (nb, life) in enumerate(spans):
            db.execute(_CERT, [f"{n + 1:x}", f"dev-{n:02d}", _ts(nb), _ts(nb + life), _ts(nb)])
    return spans


def test_renewal_point_is_sqlites_to_the_second(pg_url, tmp_path):  # noqa: F811
    from hub.registry.sql import julianday

    values = {}
    for where in ("sqlite", "postgresql"):
        reg = Registry(pg_url if where == "postgresql" else tmp_path / "registry.sqlite3", home=tmp_path)
        try:
            _certified(reg)
            values[where] = reg.query(
                f"SELECT c.device_id, {expiry.renew_jd(reg.dialect)} AS renew, {julianday(reg.dialect, 'c.not_after')}"
                f" AS na, {julianday(reg.dialect, '?')} AS now FROM certificates c ORDER BY c.device_id", [_ts(NOW)])
        finally:
            reg.close()
    assert [r["device_id"] for r in values["sqlite"]] == [r["device_id"] for r in values["postgresql"]]
    for lite, pg in zip(values["sqlite"], values["postgresql"]):
        for col in ("renew", "na", "now"):
            assert abs(lite[col] - pg[col]) * 86400 < 0.01, (col, lite, pg)  # SQLite keeps milliseconds
    assert {type(r["renew"]) for r in values["postgresql"]} == {float}


def test_report_is_the_same_on_both_dialects(pg_url, tmp_path):  # noqa: F811
    pages = {}
    for where in ("sqlite", "postgresql"):
        reg = Registry(pg_url if where == "postgresql" else tmp_path / "registry.sqlite3", home=tmp_path)
        try:
            _certified(reg)
            with reg.write() as db:
                db.execute("UPDATE devices SET status = 'active', online = 1 WHERE id IN ('dev-00', 'dev-02')")
                db.execute("UPDATE devices SET status = 'active' WHERE id IN ('dev-01', 'dev-03')")
            pages[where] = [expiry.expiring(reg, NOW + timedelta(minutes=40), days, 1, include_due=due, probe=probe)
                            for days in (0, 3, 400, 3650) for due in (False, True) for probe in (0, 20_000)]
        finally:
            reg.close()
    assert pages["sqlite"] == pages["postgresql"] and any(items for items, _ in pages["sqlite"])


def _pg_plan(reg: Registry, sql: str, params: list, off=("enable_seqscan", "enable_sort", "enable_bitmapscan")) -> str:
    """EXPLAIN with the `off` plan kinds priced out (tiny tables are otherwise scanned whatever the indexes)."""
    with reg.write() as db:
        for setting in off:
            db.execute(f"SET LOCAL {setting} = off")
        return " | ".join(r["QUERY PLAN"] for r in db.query(f"EXPLAIN {sql}", params))


@pytest.fixture
def pg_registry(pg_url, tmp_path):  # noqa: F811
    reg = Registry(pg_url, home=tmp_path)
    _certified(reg)
    yield reg
    reg.close()


@pytest.mark.parametrize("raw", [{"status": "active"}, {"group": "odd"}, {"label": "site=a"}, {"online": "true"},
                                 {"id_prefix": "dev-1"}, {"cert_expires_before": "2027-01-01T00:00:00Z"},
                                 {"last_seen_before": "2027-01-01T00:00:00Z"},
                                 {"ids": ["dev-01", "dev-02"]}])
def test_pg_filters_can_be_served_by_indexes(pg_registry, raw):
    sel = Selector.parse(raw, allow_ids=True)
    source, where, params, key = sel.sql(dialect=pg_registry.dialect)
    plan = _pg_plan(pg_registry, f"SELECT d.id FROM {source} WHERE {where} AND {key} > ? ORDER BY {key} "
                    "LIMIT 101", [*params, ""])
    assert "Seq Scan on devices" not in plan and "Sort" not in plan, plan


def test_pg_report_queries_can_walk_their_indexes(pg_registry):
    base = (f"{expiry._columns(pg_registry.dialect, '')} WHERE c.status = 'active' AND c.not_after <= ? "  # noqa: SLF001
            "AND d.status = 'active' {past} AND (c.not_after, c.device_id) > (?, ?) "
            "ORDER BY c.not_after, c.device_id LIMIT ?")
    walk = _pg_plan(pg_registry, base.format(past=""), ["x", "", "", 5])
    assert expiry.INDEX in walk and "Sort" not in walk, walk
    # the renewal point test is an index condition on RENEW_INDEX (its expression is the query's, as in the probe)
    past = expiry._past(pg_registry.dialect)  # noqa: SLF001
    probe = _pg_plan(pg_registry, f"SELECT 1 FROM certificates c WHERE c.status = 'active' AND {past} LIMIT ?",
                     [_ts(NOW), 5], off=("enable_seqscan",))
    assert f"Scan using {expiry.RENEW_INDEX}" in probe and "Index Cond: (LEAST(" in probe, probe


def test_hubs_starting_at_once_apply_the_schemas_once(pg_url, tmp_path):  # noqa: F811
    """Two hubs (registries) on one database apply the API's and the report's schemas at the same moment: both
    succeed (the write lock queues them: concurrent CREATE ... IF NOT EXISTS could otherwise collide), one backfill."""
    import threading

    seed = Registry(pg_url, home=tmp_path)
    _devices(seed, 3)
    seed.close()
    barrier, errors = threading.Barrier(2), []

    def start() -> None:  # a hub: its own registry (connections belong to the thread that opened them)
        reg = Registry(pg_url, home=tmp_path)
        try:
            barrier.wait()
            queries.apply_schema(reg)
            expiry.apply_schema(reg)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            reg.close()

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    reg = Registry(pg_url, home=tmp_path)
    try:
        _side_tables_match(reg)
        assert queries.count(reg, Selector.parse({"group": "even"})) == 2
    finally:
        reg.close()


def test_the_schemas_are_the_same_on_both_dialects(pg_url, tmp_path):  # noqa: F811
    """The API's and the report's tables, columns, indexes and trigger names, SQLite's and PostgreSQL's."""
    from hub.api.auditroutes import apply_schema as audit_schema
    from hub.registry.sql import columns

    shapes = {}
    for where in ("sqlite", "postgresql"):
        reg = Registry(pg_url if where == "postgresql" else tmp_path / "registry.sqlite3", home=tmp_path)
        try:
            for apply in (queries.apply_schema, expiry.apply_schema, audit_schema):
                apply(reg)
            db = reg._db()  # noqa: SLF001
            if where == "sqlite":
                indexes = {r["name"] for r in reg.query("SELECT name FROM sqlite_master WHERE type = 'index' "
                                                        "AND sql IS NOT NULL")}
                triggers = {r["name"] for r in reg.query("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
            else:
                indexes = {r["indexname"] for r in reg.query("SELECT indexname FROM pg_indexes WHERE schemaname = "
                                                             "current_schema() AND indexname NOT LIKE '%_pkey'")}
                triggers = {r["tgname"] for r in reg.query("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")}
            shapes[where] = ({t: columns(db, t) for t in ("device_groups", "device_labels")}, indexes, triggers)
        finally:
            reg.close()
    lite, pg = shapes["sqlite"], shapes["postgresql"]
    assert lite[0] == pg[0] and lite[0]["device_labels"] == {"key", "value", "device_id"}
    mine = {s.split(" IF NOT EXISTS ")[1].split()[0] for s in (*queries.API_SCHEMA, *expiry.REPORT_SCHEMA)
            if s.startswith("CREATE INDEX")} | {"audit_actor", "audit_action", "audit_at"}
    assert mine <= lite[1] and mine <= pg[1], (mine - lite[1], mine - pg[1])
    assert {"devices_meta_insert", "devices_meta_update", "devices_meta_delete"} <= lite[2] & pg[2]
