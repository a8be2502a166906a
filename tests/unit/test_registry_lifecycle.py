"""The device lifecycle (registry schema 3): pending -> active -> suspended / revoked / decommissioned, and the
migration of a real schema-2 file (built here by running the schema-2 statements, frozen below) to schema 3."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest

from hub.api import actions, queries
from hub.api.queries import Selector
from hub.authz.schema import CREDENTIAL_QUERY
from hub.est.service import credential_status
from hub.registry.store import (DEVICE_STATUSES, SCHEMA_VERSION, CertRejected, DeviceExists, DeviceNotActive, Registry,
                          TokenRejected, serial_hex, token_hash)
from tests.unit.test_registry import T0, TTL, Clock, MiniCA, enrolled, raw  # noqa: F401 (fixtures below)
from tests.unit.test_registry import clock, db_path, mini_ca, reg  # noqa: F401

#: sqlite_master of a schema-2 registry as the code before schema 3 wrote it (Registry() + hub.api's
#: apply_schema), in creation order: devices with the old CHECK, hub/authz's view, hub/api's indexes, side tables
#: and triggers. Frozen: it must not follow the code.
SCHEMA_2 = (
    'CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)',
    "CREATE TABLE devices (\n        id TEXT PRIMARY KEY, fleet TEXT NOT NULL,\n        status TEXT NOT NULL CHECK (status IN ('active', 'suspended', 'revoked')),\n        labels TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(labels)),\n        groups TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(groups)),\n        created TEXT NOT NULL, last_seen TEXT, online INTEGER NOT NULL DEFAULT 0 CHECK (online IN (0, 1)))",
    "CREATE TABLE certificates (\n        serial TEXT PRIMARY KEY, device_id TEXT NOT NULL REFERENCES devices(id), subject TEXT NOT NULL,\n        not_before TEXT NOT NULL, not_after TEXT NOT NULL, fingerprint_sha256 TEXT NOT NULL,\n        status TEXT NOT NULL CHECK (status IN ('active', 'superseded', 'revoked')),\n        revoked_at TEXT, revocation_reason TEXT, issued_at TEXT NOT NULL, pem TEXT NOT NULL,\n        grace_until TEXT)",
    'CREATE INDEX certificates_device ON certificates(device_id)',
    "CREATE UNIQUE INDEX certificates_one_active ON certificates(device_id)\n        WHERE status = 'active'",
    'CREATE TABLE tokens (\n        id INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL REFERENCES devices(id),\n        token_hash TEXT NOT NULL UNIQUE, created TEXT NOT NULL, expires TEXT NOT NULL,\n        used_at TEXT, used_from TEXT)',
    'CREATE INDEX tokens_device ON tokens(device_id)',
    "CREATE TABLE audit (\n        id INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,\n        device_id TEXT, outcome TEXT NOT NULL CHECK (outcome IN ('ok', 'denied', 'error')),\n        detail TEXT NOT NULL DEFAULT '', source TEXT)",
    'CREATE INDEX audit_device ON audit(device_id, id)',
    "CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit\n        BEGIN SELECT RAISE(ABORT, 'audit log is append-only: rows cannot be updated'); END",
    "CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit\n        BEGIN SELECT RAISE(ABORT, 'audit log is append-only: rows cannot be deleted'); END",
    "CREATE TABLE roles (name TEXT PRIMARY KEY, description TEXT NOT NULL DEFAULT '')",
    "CREATE TABLE role_rules (\n        role TEXT NOT NULL REFERENCES roles(name) ON DELETE CASCADE,\n        action TEXT NOT NULL CHECK (action IN ('publish', 'retain', 'subscribe', 'receive')),\n        pattern TEXT NOT NULL, PRIMARY KEY (role, action, pattern)) WITHOUT ROWID",
    "CREATE TABLE identities (\n        name TEXT PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('service', 'hub')),\n        role TEXT NOT NULL REFERENCES roles(name),\n        status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),\n        created TEXT NOT NULL, revoked_at TEXT, description TEXT NOT NULL DEFAULT '')",
    "CREATE TABLE identity_certificates (\n        serial TEXT PRIMARY KEY, identity TEXT NOT NULL REFERENCES identities(name), subject TEXT NOT NULL,\n        not_before TEXT NOT NULL, not_after TEXT NOT NULL, fingerprint_sha256 TEXT NOT NULL,\n        status TEXT NOT NULL CHECK (status IN ('active', 'superseded', 'revoked')),\n        grace_until TEXT, revoked_at TEXT, revocation_reason TEXT, issued_at TEXT NOT NULL, pem TEXT NOT NULL)",
    'CREATE INDEX identity_certificates_identity ON identity_certificates(identity)',
    'CREATE TABLE authz_events (\n        seq INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, principal TEXT, reason TEXT NOT NULL)',
    "CREATE INDEX certificates_revoked ON certificates(status, revoked_at) WHERE status = 'revoked'",
    "CREATE VIEW authz_credentials AS\n        SELECT 'device' AS issuer, c.serial AS serial, c.device_id AS principal, 'device' AS kind, 'device' AS role,\n               c.status AS cert_status, d.status AS principal_status, c.not_before AS not_before,\n               c.not_after AS not_after, c.grace_until AS grace_until, d.groups AS groups\n        FROM certificates c JOIN devices d ON d.id = c.device_id\n        UNION ALL\n        SELECT 'service', ic.serial, CASE i.kind WHEN 'hub' THEN i.name ELSE 'svc.' || i.name END, i.kind, i.role,\n               ic.status, i.status, ic.not_before, ic.not_after, ic.grace_until, '[]'\n        FROM identity_certificates ic JOIN identities i ON i.name = ic.identity",
    'CREATE INDEX devices_status_id ON devices(status, id)',
    'CREATE INDEX devices_online_id ON devices(online, id)',
    'CREATE INDEX devices_last_seen ON devices(last_seen)',
    "CREATE INDEX certificates_active_expiry ON certificates(not_after, device_id)\n        WHERE status = 'active'",
    'CREATE TABLE device_groups (grp TEXT NOT NULL, device_id TEXT NOT NULL,\n        PRIMARY KEY (grp, device_id)) WITHOUT ROWID',
    'CREATE TABLE device_labels (key TEXT NOT NULL, value TEXT NOT NULL, device_id TEXT NOT NULL,\n        PRIMARY KEY (key, value, device_id)) WITHOUT ROWID',
    'CREATE TRIGGER devices_meta_insert AFTER INSERT ON devices BEGIN\n        INSERT OR IGNORE INTO device_groups SELECT value, NEW.id FROM json_each(NEW.groups);\n        INSERT OR IGNORE INTO device_labels SELECT key, value, NEW.id FROM json_each(NEW.labels); END',
    'CREATE TRIGGER devices_meta_update AFTER UPDATE OF groups, labels ON devices BEGIN\n        DELETE FROM device_groups WHERE device_id = OLD.id AND grp IN (SELECT value FROM json_each(OLD.groups));\n        DELETE FROM device_labels WHERE device_id = OLD.id AND key IN (SELECT key FROM json_each(OLD.labels));\n        INSERT OR IGNORE INTO device_groups SELECT value, NEW.id FROM json_each(NEW.groups);\n        INSERT OR IGNORE INTO device_labels SELECT key, value, NEW.id FROM json_each(NEW.labels); END',
    'CREATE TRIGGER devices_meta_delete AFTER DELETE ON devices BEGIN\n        DELETE FROM device_groups WHERE device_id = OLD.id AND grp IN (SELECT value FROM json_each(OLD.groups));\n        DELETE FROM device_labels WHERE device_id = OLD.id AND key IN (SELECT key FROM json_each(OLD.labels));\n        END',
)
#: the same without hub/api's objects (a registry the API never opened)
SCHEMA_2_NO_API = tuple(s for s in SCHEMA_2 if "device_groups" not in s and "device_labels" not in s
                        and "certificates_active_expiry" not in s and not s.startswith("CREATE INDEX devices_"))
PEM = "-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n"


def make_schema_2(path: Path, statements=SCHEMA_2) -> None:
    """A schema-2 registry file with devices in every situation the migration must tell apart."""
    ts = "2030-01-01T12:00:00.000000+00:00"
    later = "2031-01-01T12:00:00.000000+00:00"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA foreign_keys = ON")
        for statement in statements:
            conn.execute(statement)
        conn.execute("INSERT INTO meta VALUES ('schema_version', '2')")
        conn.execute("INSERT INTO roles VALUES ('device', 'built-in')")
        devices = [("never", "active", '["sensors"]', '{"site": "lab"}'),   # token issued, unused
                   ("resent", "active", "[]", "{}"),                        # older token superseded, newer unused
                   ("enrolled", "active", '["sensors"]', "{}"),             # certificate, token used
                   ("held", "suspended", "[]", "{}"),                       # suspended before it ever enrolled
                   ("gone", "revoked", "[]", "{}"),                         # revoked, certificate revoked
                   ("bare", "active", "[]", "{}")]                          # no token, no certificate
        conn.executemany("INSERT INTO devices (id, fleet, status, groups, labels, created) VALUES (?, 'f', ?, ?, ?, ?)",
                         [(*d, ts) for d in devices])
        tokens = [("never", "t1", None, None), ("resent", "t2", ts, "superseded"), ("resent", "t3", None, None),
                  ("enrolled", "t4", ts, "10.0.0.1"), ("held", "t5", None, None), ("gone", "t6", ts, "10.0.0.2")]
        conn.executemany("INSERT INTO tokens (device_id, token_hash, created, expires, used_at, used_from) "
                         "VALUES (?, ?, ?, ?, ?, ?)", [(d, token_hash(t), ts, later, u, f) for d, t, u, f in tokens])
        certs = [("a1", "enrolled", "active", None), ("b2", "gone", "revoked", ts)]
        conn.executemany("INSERT INTO certificates (serial, device_id, subject, not_before, not_after, "
                         "fingerprint_sha256, status, revoked_at, issued_at, pem) VALUES (?, ?, 'CN=x', ?, ?, 'ff', "
                         "?, ?, ?, ?)", [(s, d, ts, later, st, r, ts, PEM) for s, d, st, r in certs])
        conn.execute("INSERT INTO audit (at, actor, action, device_id, outcome) VALUES (?, 'cli', 'device.add', "
                     "'enrolled', 'ok')", [ts])
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []


def names(path: Path, kind: str) -> set[str]:
    return {r[0] for r in raw(path, "SELECT name FROM sqlite_master WHERE type = ? AND sql IS NOT NULL", (kind,))}


# --- migration 2 -> 3 ----------------------------------------------------------------------------------------------

def test_schema_2_file_is_migrated_and_everything_around_devices_still_works(tmp_path, clock, mini_ca):
    path = tmp_path / "v2.sqlite3"
    make_schema_2(path)
    before = {k: names(path, k) for k in ("index", "trigger", "view")}
    assert "CHECK (status IN ('active', 'suspended', 'revoked'))" in raw(
        path, "SELECT sql FROM sqlite_master WHERE name = 'devices'")[0][0]
    reg = Registry(path)
    try:
        assert raw(path, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)] == [("4",)]
        assert dict(raw(path, "SELECT id, status FROM devices")) == {
            "never": "pending", "resent": "pending", "enrolled": "active", "held": "suspended", "gone": "revoked",
            "bare": "pending"}
        # the rebuilt table has the new CHECK; every index, trigger and view that referred to it is back
        assert "'pending'" in raw(path, "SELECT sql FROM sqlite_master WHERE name = 'devices'")[0][0]
        for kind in ("index", "trigger", "view"):
            assert before[kind] <= names(path, kind), kind
        assert not names(path, "table") & {"devices_v3"}
        assert raw(path, "PRAGMA foreign_key_check") == [] and raw(path, "PRAGMA integrity_check") == [("ok",)]
        conn = reg._db().conn
        assert conn.execute("PRAGMA foreign_keys").fetchone() == (1,)  # back on after the rebuild
        with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
            conn.execute("INSERT INTO tokens (device_id, token_hash, created, expires) VALUES ('ghost', 'x', 'a', 'b')")
        # hub/authz's view reads the new table
        row = raw(path, CREDENTIAL_QUERY.replace("?1", "?").replace("?2", "?"), ("device", "a1"))[0]
        assert row[:5] == ("enrolled", "device", "device", "active", "active")
        # hub/api's triggers keep the side tables right on the new table (old rows kept; new writes followed)
        assert ("sensors", "never") in raw(path, "SELECT grp, device_id FROM device_groups")
        reg.add_device("fresh", "f", clock.now, groups=["late"])
        assert ("late", "fresh") in raw(path, "SELECT grp, device_id FROM device_groups")
        assert reg.require_device("fresh")["status"] == "pending"
        # plans still use the indexes
        plan = str(raw(path, "EXPLAIN QUERY PLAN SELECT id FROM devices WHERE status = 'pending' ORDER BY id"))
        assert "devices_status_id" in plan
        # the audit trail and certificates are untouched; tokens still point at their devices
        assert [r["action"] for r in reg.audit_log(device_id="enrolled")] == ["device.add"]
        assert reg.certificates_of("enrolled")[0]["serial"] == "a1"
        assert raw(path, "SELECT COUNT(*) FROM tokens t JOIN devices d ON d.id = t.device_id") == [(6,)]
        # a migrated pending device enrolls with its unused token and becomes active
        reg.enroll("never", "t1", clock.now, mini_ca.issuer("never", clock.now))
        assert reg.require_device("never")["status"] == "active"
    finally:
        reg.close()
    Registry(path).close()  # a second open changes nothing
    assert raw(path, "SELECT value FROM meta WHERE key = 'schema_version'") == [("4",)]


def test_schema_2_file_without_the_api_objects_is_migrated(tmp_path):
    path = tmp_path / "v2.sqlite3"
    make_schema_2(path, SCHEMA_2_NO_API)
    Registry(path).close()
    assert raw(path, "SELECT value FROM meta WHERE key = 'schema_version'") == [("4",)]
    assert raw(path, "SELECT status FROM devices WHERE id = 'never'") == [("pending",)]
    assert "authz_credentials" in names(path, "view") and raw(path, "PRAGMA foreign_key_check") == []
    reg = Registry(path)
    try:
        queries.apply_schema(reg)  # the API starts later on the migrated file
        assert queries.count(reg, Selector.parse({"status": "pending"})) == 3
    finally:
        reg.close()


def test_a_failed_migration_leaves_the_schema_2_file_as_it_was(tmp_path):
    path = tmp_path / "v2.sqlite3"
    make_schema_2(path)
    with sqlite3.connect(path) as conn:  # a dangling token: foreign_key_check after the rebuild finds it
        conn.execute("INSERT INTO tokens (device_id, token_hash, created, expires) VALUES ('ghost', 'g', 'a', 'b')")
    with pytest.raises(Exception, match="foreign key"):
        Registry(path)
    assert raw(path, "SELECT value FROM meta WHERE key = 'schema_version'") == [("2",)]
    assert "'pending'" not in raw(path, "SELECT sql FROM sqlite_master WHERE name = 'devices'")[0][0]
    assert "authz_credentials" in names(path, "view") and "devices_meta_insert" in names(path, "trigger")


# --- transitions ---------------------------------------------------------------------------------------------------

def test_statuses():
    assert DEVICE_STATUSES == ("pending", "active", "suspended", "revoked", "decommissioned")


def test_pending_until_the_first_enrollment_then_active(reg, clock, mini_ca):
    assert reg.add_device("dev-1", "f", clock.now)["status"] == "pending"
    token = reg.create_token("dev-1", clock.now, TTL)
    reg.enroll("dev-1", token, clock.now, mini_ca.issuer("dev-1", clock.now))
    assert reg.require_device("dev-1")["status"] == "active"
    again = reg.create_token("dev-1", clock.now, TTL)  # token re-enrollment of an active device
    reg.enroll("dev-1", again, clock.now, mini_ca.issuer("dev-1", clock.now))
    assert reg.require_device("dev-1")["status"] == "active"
    created = reg.create_devices_with_tokens([("dev-2", None, None), ("dev-3", {"a": "b"}, ["g"])], "f",
                                             clock.now, TTL)
    assert {reg.require_device(d)["status"] for d, _ in created} == {"pending"}


def test_a_pending_device_can_be_suspended_resumed_and_revoked(reg, db_path, clock, mini_ca):
    reg.add_device("dev-1", "f", clock.now)
    token = reg.create_token("dev-1", clock.now, TTL)
    assert reg.set_status("dev-1", "suspended", clock.now, actor="ops")["device"]["status"] == "suspended"
    with pytest.raises(DeviceNotActive) as ei:
        reg.enroll("dev-1", token, clock.now, mini_ca.issuer("dev-1", clock.now))
    assert ei.value.code == "device_suspended"
    out = reg.set_status("dev-1", "active", clock.now, actor="ops")  # resume: it never enrolled
    assert out["device"]["status"] == "pending"
    assert "suspended -> pending" in reg.audit_log(device_id="dev-1", limit=1)[0]["detail"]
    assert reg.set_status("dev-1", "active", clock.now, actor="ops")["device"]["status"] == "pending"  # no-op
    reg.enroll("dev-1", token, clock.now, mini_ca.issuer("dev-1", clock.now))  # the token survived
    assert reg.require_device("dev-1")["status"] == "active"
    reg.add_device("dev-2", "f", clock.now)
    assert reg.set_status("dev-2", "revoked", clock.now, actor="ops")["device"]["status"] == "revoked"
    with pytest.raises(DeviceNotActive):
        reg.create_token("dev-2", clock.now, TTL)
    with pytest.raises(ValueError):
        reg.set_status("dev-2", "pending", clock.now, actor="ops")


def test_decommission_is_final_and_keeps_the_row_and_audit_trail(reg, db_path, clock, mini_ca):
    first = enrolled(reg, mini_ca, clock)
    second = reg.reenroll("dev-1", serial_hex(first.serial_number), clock.now, mini_ca.issuer("dev-1", clock.now))
    unused = reg.create_token("dev-1", clock.now, TTL)
    reg.mark_presence("dev-1", True, clock.now)
    seq = reg.authz_seq()
    out = reg.decommission("dev-1", clock.advance(minutes=1), actor="ops", reason="end of life")
    assert out["device"]["status"] == "decommissioned" and out["device"]["online"] is False
    assert out["revoked_serials"] == sorted(serial_hex(c.serial_number) for c in (first, second))
    assert {r["reason"] for r in reg.revoked_certificates()} == {"cessationOfOperation"}
    assert reg.authz_seq() == seq + 1
    assert raw(db_path, "SELECT principal, reason FROM authz_events ORDER BY seq DESC LIMIT 1") == [
        ("dev-1", "device decommissioned")]
    last = reg.audit_log(device_id="dev-1", limit=1)[0]
    assert last["action"] == "device.decommissioned" and last["actor"] == "ops"
    assert "active -> decommissioned" in last["detail"] and "end of life" in last["detail"]
    assert "1 unused token(s) invalidated" in last["detail"]
    assert [r["action"] for r in reg.audit_log(device_id="dev-1")][-1] == "device.add"  # the trail is kept
    with pytest.raises(TokenRejected) as ei:
        reg.enroll("dev-1", unused, clock.now, mini_ca.issuer("dev-1", clock.now))
    assert ei.value.code == "token_used"
    with pytest.raises(CertRejected):
        reg.check_client_cert(serial_hex(second.serial_number), "dev-1", clock.now)
    for status in ("active", "suspended", "revoked"):
        with pytest.raises(DeviceNotActive) as ei:
            reg.set_status("dev-1", status, clock.now, actor="ops")
        assert ei.value.code == "device_decommissioned"
    with pytest.raises(DeviceNotActive):
        reg.create_token("dev-1", clock.now, TTL)
    with pytest.raises(DeviceExists):  # the id stays taken
        reg.add_device("dev-1", "f", clock.now)
    assert reg.decommission("dev-1", clock.now, actor="ops")["revoked_serials"] == []  # again: a no-op
    assert reg.authz_seq() == seq + 1
    assert reg.require_device("dev-1")["status"] == "decommissioned"


def test_decommission_pending_revoked_and_through_set_status(reg, clock, mini_ca):
    reg.add_device("dev-1", "f", clock.now)
    reg.create_token("dev-1", clock.now, TTL)
    out = reg.set_status("dev-1", "decommissioned", clock.now, actor="ops")
    assert out["device"]["status"] == "decommissioned" and out["revoked_serials"] == []
    enrolled(reg, mini_ca, clock, "dev-2")
    reg.set_status("dev-2", "revoked", clock.now, actor="ops", reason="keyCompromise")
    assert reg.decommission("dev-2", clock.now, actor="ops")["device"]["status"] == "decommissioned"
    assert {r["reason"] for r in reg.revoked_certificates()} == {"keyCompromise"}  # revoked once, reason kept


def test_credential_status_of_a_decommissioned_device_is_revoked():
    row = {"id": "d", "device_status": "decommissioned", "cert_status": "revoked",
           "not_before": T0.isoformat(), "not_after": (T0 + timedelta(days=1)).isoformat()}
    assert credential_status(row, "d", T0) == "revoked"
    assert credential_status({**row, "device_status": "pending", "cert_status": "active"}, "d", T0) == "unknown"


def test_bulk_actions_follow_the_lifecycle(reg, clock, mini_ca):
    reg.create_devices_with_tokens([(f"p-{n}", None, ["g"]) for n in range(3)], "f", clock.now, TTL)
    queries.apply_schema(reg)
    enrolled(reg, mini_ca, clock, "p-3")
    reg.decommission("p-0", clock.now, actor="ops")
    sel = Selector.parse({"id_prefix": "p-"})
    out = actions.bulk_status(reg, "suspend", sel, 4, "", clock.now, "svc.ops")
    assert out["changed"] == ["p-1", "p-2", "p-3"] and out["skipped"] == 1
    out = actions.bulk_status(reg, "resume", sel, 4, "", clock.now, "svc.ops", "10.0.0.9")
    assert out["changed"] == ["p-1", "p-2", "p-3"]
    assert {d: reg.require_device(d)["status"] for d in ("p-0", "p-1", "p-2", "p-3")} == {
        "p-0": "decommissioned", "p-1": "pending", "p-2": "pending", "p-3": "active"}
    row = reg.query("SELECT detail, source FROM audit WHERE device_id = 'p-1' ORDER BY id DESC LIMIT 1")[0]
    assert row["detail"].startswith("suspended -> pending") and row["source"] == "10.0.0.9"
    out = actions.bulk_status(reg, "revoke", sel, 4, "x", clock.now, "svc.ops")
    assert out["changed"] == ["p-1", "p-2", "p-3"] and out["revoked_certificates"] == 1
    assert queries.count(reg, Selector.parse({"status": "decommissioned"})) == 1
