"""The audit log's HMAC chain and escaping (hub/registry/audit.py) on a real registry file."""

from __future__ import annotations

import os
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest

from hub.registry import audit as chain
from hub.registry.errors import RegistryError
from hub.registry.store import Registry

NOW = datetime(2027, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def reg(tmp_path):
    r = Registry(tmp_path / "registry.sqlite3")
    for i in range(30):
        r.audit("test.row", "ok", NOW + timedelta(seconds=i), actor="ops", detail=f"row {i}")
    r.create_devices_with_tokens([(f"d-{i}", None, None) for i in range(5)], "acme", NOW, timedelta(days=1))
    yield r
    r.close()


def _sql(path, sql, params=()):
    conn = sqlite3.connect(path)
    try:
        conn.execute("DROP TRIGGER IF EXISTS audit_no_update")  # what an attacker with the file can do
        conn.execute("DROP TRIGGER IF EXISTS audit_no_delete")
        conn.execute(sql, params)
        conn.commit()
    finally:
        conn.close()


def test_an_untouched_log_verifies_and_names_its_head(reg):
    v = reg.verify_audit()
    assert v.ok and v.checked == 40 and v.before_chain == 0 and v.head_id == 40 and len(v.head_mac) == 64
    assert (reg.path.parent / "audit.key").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("tamper, row", [
    ("UPDATE audit SET detail = 'nothing happened' WHERE id = 7", 7),
    ("UPDATE audit SET at = '2020-01-01T00:00:00.000000+00:00' WHERE id = 12", 12),
    ("DELETE FROM audit WHERE id = 20", 21),
    ("UPDATE audit SET mac = NULL WHERE id = 3", 3),
    ("INSERT INTO audit (id, at, actor, action, outcome, detail) VALUES (100, '2027', 'ops', 'x', 'ok', 'forged')", 100),
])
def test_tampering_is_found_at_the_first_broken_row(reg, tamper, row):
    _sql(reg.path, tamper)
    v = reg.verify_audit()
    assert not v.ok and v.broken_at == row and v.why


def test_a_consistent_forgery_needs_the_key(reg, tmp_path):
    (tmp_path / "other").mkdir()
    other = Registry(tmp_path / "other" / "registry.sqlite3")
    try:
        assert other.verify_audit().ok  # a different key ...
        rows = [tuple(r[f] for f in ("at", "actor", "action", "device_id", "outcome", "detail", "source"))
                for r in reg.query("SELECT * FROM audit ORDER BY id")]
        _sql(reg.path, "DELETE FROM audit")
        with other.write() as db:  # ... rebuilds the whole chain in the victim's file: it does not verify
            chain.append(db, chain.load_key(other.path), rows)
        conn = sqlite3.connect(reg.path)
        conn.execute("ATTACH ? AS o", [str(other.path)])
        conn.execute("INSERT INTO audit SELECT * FROM o.audit")
        conn.commit()
        conn.close()
        v = reg.verify_audit()
        assert not v.ok and v.broken_at == 1 and "key" in v.why
    finally:
        other.close()


def test_text_is_stored_escaped(reg):
    reg.audit("enroll", "denied", NOW, actor="cert:\x1b]0;pwned\x07", detail="a\x1b[2Jb\u202ecd\x00\n",
              source="10.0.0.1")
    row = reg.audit_log(limit=1)[0]
    assert row["actor"] == "cert:\\x1b]0;pwned\\x07"
    assert row["detail"] == "a\\x1b[2Jb\\u202ecd\\x00\\x0a" and row["detail"].isprintable()
    assert reg.verify_audit().ok
    assert chain.escape("plain text, ünïcode") == "plain text, ünïcode"


def test_the_key_file_must_be_private(reg):
    key = reg.path.parent / "audit.key"
    os.chmod(key, 0o644)
    fresh = Registry(reg.path)
    try:
        with pytest.raises(RegistryError, match="chmod 600"):
            fresh.audit("x", "ok", NOW)
    finally:
        fresh.close()


def test_rows_from_before_the_chain_are_counted_not_failed(tmp_path):
    path = tmp_path / "registry.sqlite3"
    Registry(path).close()
    conn = sqlite3.connect(path)  # a schema 3 file: no mac column yet, two old rows
    conn.executescript("""DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;
        CREATE TABLE audit2 AS SELECT id, at, actor, action, device_id, outcome, detail, source FROM audit;
        DROP TABLE audit; ALTER TABLE audit2 RENAME TO audit;
        INSERT INTO audit (id, at, actor, action, outcome, detail) VALUES (1, 'a', 'x', 'old', 'ok', ''),
                                                                        (2, 'b', 'x', 'old', 'ok', '');
        UPDATE meta SET value = '3' WHERE key = 'schema_version'; DELETE FROM meta WHERE key = 'audit_chain_from';""")
    conn.commit()
    conn.close()
    reg = Registry(path)
    try:
        reg.audit("new", "ok", NOW)
        v = reg.verify_audit()
        assert v.ok and v.before_chain == 2 and v.checked == 1 and v.head_id == 3
    finally:
        reg.close()
