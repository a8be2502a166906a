"""The registry's SQLite schema: tables, indexes, triggers, the version in `meta`, migrations 1 -> 2 -> 3, seed roles.

Side tables of other concerns (hub/authz/schema.py: principals, roles, authz events; hub/api, hub/jobs: their own
indexes and tables) are created by their modules; the `devices` rebuild of migration 2 -> 3 keeps whatever refers
to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from hub.authz.policy import DEFAULT_ROLES
from hub.authz.schema import AUTHZ_SCHEMA, MIGRATE_1_TO_2

from .errors import RegistryError

SCHEMA_VERSION = 4
#: How long a certificate superseded by a renewal keeps connecting (the device switches over in this time).
SUPERSEDE_GRACE = timedelta(minutes=5)
#: pending: registered (a token issued), never enrolled; active: enrolled; suspended: cut off, can come back;
#: revoked and decommissioned: final (decommissioned: retired, cessationOfOperation; the row and audit stay).
DEVICE_STATUSES = ("pending", "active", "suspended", "revoked", "decommissioned")
#: Statuses from which nothing changes any more.
FINAL_STATUSES = ("revoked", "decommissioned")
#: Statuses a token enrollment accepts (pending: the first one; active: a re-enrollment with a fresh token).
ENROLLABLE_STATUSES = ("pending", "active")
#: Who the audit log names for enroll / reenroll (the enrollment service acting for an unauthenticated claimant).
EST_ACTOR = "est"

DEVICES_TABLE = """CREATE TABLE IF NOT EXISTS {name} (
        id TEXT PRIMARY KEY, fleet TEXT NOT NULL,
        status TEXT NOT NULL
            CHECK (status IN ('pending', 'active', 'suspended', 'revoked', 'decommissioned')),
        labels TEXT NOT NULL DEFAULT '{{}}' CHECK (json_valid(labels)),
        groups TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(groups)),
        created TEXT NOT NULL, last_seen TEXT, online INTEGER NOT NULL DEFAULT 0 CHECK (online IN (0, 1)))"""
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
    DEVICES_TABLE.format(name="devices"),
    """CREATE TABLE IF NOT EXISTS certificates (
        serial TEXT PRIMARY KEY, device_id TEXT NOT NULL REFERENCES devices(id), subject TEXT NOT NULL,
        not_before TEXT NOT NULL, not_after TEXT NOT NULL, fingerprint_sha256 TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('active', 'superseded', 'revoked')),
        revoked_at TEXT, revocation_reason TEXT, issued_at TEXT NOT NULL, pem TEXT NOT NULL,
        grace_until TEXT)""",
    """CREATE INDEX IF NOT EXISTS certificates_device ON certificates(device_id)""",
    # The CRL's query: revoked certificates in revocation order, without a scan of every certificate.
    """CREATE INDEX IF NOT EXISTS certificates_revoked ON certificates(revoked_at, serial) WHERE status = 'revoked'""",
    # Invariant: a device has at most one active certificate.
    """CREATE UNIQUE INDEX IF NOT EXISTS certificates_one_active ON certificates(device_id)
        WHERE status = 'active'""",
    """CREATE TABLE IF NOT EXISTS tokens (
        id INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL REFERENCES devices(id),
        token_hash TEXT NOT NULL UNIQUE, created TEXT NOT NULL, expires TEXT NOT NULL,
        used_at TEXT, used_from TEXT)""",
    """CREATE INDEX IF NOT EXISTS tokens_device ON tokens(device_id)""",
    # No foreign key on device_id: denied attempts for unknown devices are logged too.
    """CREATE TABLE IF NOT EXISTS audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
        device_id TEXT, outcome TEXT NOT NULL CHECK (outcome IN ('ok', 'denied', 'error')),
        detail TEXT NOT NULL DEFAULT '', source TEXT, mac TEXT)""",
    """CREATE INDEX IF NOT EXISTS audit_device ON audit(device_id, id)""",
    """CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'audit log is append-only: rows cannot be updated'); END""",
    """CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'audit log is append-only: rows cannot be deleted'); END""",
)


def _one(db: Database, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
    return next(db.query(sql, list(params)), None)


@contextlib.contextmanager
def _immediate(db: Database) -> Iterator[Database]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        db.conn.rollback()
        raise


def open_schema(db: Database, path: Path) -> None:
    """Create or migrate the schema of the registry file `path` through `db` (its connection); RegistryError if
    the file's schema is newer than this code or a migration fails (the transaction is rolled back)."""
    db.enable_wal()
    # The 2 -> 3 migration rebuilds `devices`: foreign keys must be off for that, and the pragma is a no-op
    # inside a transaction, so it is decided before BEGIN (and the version re-read under the write lock).
    rebuild = _stored_version(db) in ("1", "2")
    if rebuild:
        db.execute("PRAGMA foreign_keys = OFF")
    try:
        with _immediate(db):
            old = _stored_version(db)
            for statement in SCHEMA:
                db.execute(statement)
            if old == "1":
                for statement in MIGRATE_1_TO_2:
                    db.execute(statement)
                old = "2"
            if old == "2":
                if not rebuild:  # another process moved the file back to 2 between the reads: impossible
                    raise RegistryError(f"{path}: schema changed while opening", code="schema_version")
                _migrate_2_to_3(db)
            if old in ("1", "2", "3"):
                _migrate_3_to_4(db)
                db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
            for statement in AUTHZ_SCHEMA:
                db.execute(statement)
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                       [str(SCHEMA_VERSION)])
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('audit_chain_from', '1')")
            _seed_roles(db)
    finally:
        if rebuild:
            db.execute("PRAGMA foreign_keys = ON")
    version = _one(db, "SELECT value FROM meta WHERE key = 'schema_version'")
    if version is None or int(version["value"]) != SCHEMA_VERSION:
        raise RegistryError(f"{path}: schema version {version and version['value']}, this code needs "
                            f"{SCHEMA_VERSION}", code="schema_version")


def _stored_version(db: Database) -> str | None:
    if not _one(db, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"):
        return None
    row = _one(db, "SELECT value FROM meta WHERE key = 'schema_version'")
    return row and row["value"]


def _migrate_2_to_3(db: Database) -> None:
    """Schema 2 -> 3: the device lifecycle (pending, decommissioned). SQLite cannot change a CHECK constraint,
    so `devices` is rebuilt (https://sqlite.org/lang_altertable.html#otheralter): every index, trigger and view
    that refers to it (the registry's, hub/authz's view, hub/api's triggers and indexes, or anyone's) is saved,
    dropped, and recreated from its own SQL after the rename; foreign keys are off (the caller), and
    `foreign_key_check` must be clean before the commit. Devices that never enrolled (no certificate, no used
    token) and are 'active' become 'pending'; every other device keeps its status."""
    dependents = list(db.query(
        "SELECT type, name, sql FROM sqlite_master WHERE type IN ('index', 'trigger', 'view') "
        "AND sql IS NOT NULL AND (tbl_name = 'devices' OR sql LIKE '%devices%') ORDER BY rowid"))
    for obj in dependents:
        if obj["type"] in ("view", "trigger"):  # indexes go with the table
            db.execute(f'DROP {obj["type"].upper()} IF EXISTS "{obj["name"]}"')
    db.execute("DROP TABLE IF EXISTS devices_v3")
    db.execute(DEVICES_TABLE.format(name="devices_v3"))
    db.execute("INSERT INTO devices_v3 (id, fleet, status, labels, groups, created, last_seen, online) "
               "SELECT id, fleet, CASE WHEN status = 'active' "
               "AND NOT EXISTS (SELECT 1 FROM certificates c WHERE c.device_id = devices.id) "
               "AND NOT EXISTS (SELECT 1 FROM tokens t WHERE t.device_id = devices.id AND t.used_at IS NOT NULL "
               "AND COALESCE(t.used_from, '') != 'superseded') THEN 'pending' ELSE status END, "
               "labels, groups, created, last_seen, online FROM devices")
    db.execute("DROP TABLE devices")
    db.execute("ALTER TABLE devices_v3 RENAME TO devices")
    for obj in dependents:
        db.execute(obj["sql"])
    problems = list(db.query("PRAGMA foreign_key_check"))
    if problems:
        raise RegistryError(f"schema 2 -> 3 migration: foreign key check failed: {problems[:5]}",
                            code="schema_migration")


def _migrate_3_to_4(db: Database) -> None:
    """Schema 3 -> 4: the audit log's HMAC chain (hub/registry/audit.py). Rows already there stay as they are,
    without a mac; `audit_chain_from` in meta says where the chain begins."""
    if not any(c["name"] == "mac" for c in db.query("PRAGMA table_info(audit)")):
        db.execute("ALTER TABLE audit ADD COLUMN mac TEXT")
    start = _one(db, "SELECT COALESCE(MAX(id), 0) + 1 AS n FROM audit")["n"]
    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('audit_chain_from', ?)", [str(start)])


def _seed_roles(db: Database) -> None:
    """Built-in roles that are missing get their default rules (an edited role is left as it is)."""
    for name, rules in DEFAULT_ROLES.items():
        if db.execute("INSERT OR IGNORE INTO roles (name, description) VALUES (?, 'built-in')", [name]).rowcount:
            db.conn.executemany("INSERT OR IGNORE INTO role_rules (role, action, pattern) VALUES (?, ?, ?)",
                                [(name, a, p) for a, p in rules])

