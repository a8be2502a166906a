"""The manufacturer side tables in the registry; `apply_schema` is idempotent (run at first use by the EST service
and the API), on SQLite and on PostgreSQL (PG_SCHEMA, the same tables and columns: two hubs starting at once
apply it once, in one write transaction under the registry's advisory write lock).

  manufacturers  one row per trusted manufacturer CA: name, the CA certificate (PEM), its SHA-256, who added it
  births         the allowlist: one row per expected birth certificate, keyed by (manufacturer, serialNumber);
                 the device id it enrolls as (a device row made by the import), the birth certificate's SHA-256
                 when the batch names it, the batch, first use (used_at / used_from) and whether the operator
                 allows one more enrollment with it (`reprovision`)
"""

from __future__ import annotations

from hub.registry.sql import POSTGRESQL
from hub.registry.store import Registry

MANUFACTURER_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS manufacturers (
        name TEXT PRIMARY KEY, ca_pem TEXT NOT NULL, ca_sha256 TEXT NOT NULL UNIQUE, subject TEXT NOT NULL,
        added TEXT NOT NULL, added_by TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS births (
        manufacturer TEXT NOT NULL REFERENCES manufacturers(name), serial TEXT NOT NULL,
        device_id TEXT NOT NULL UNIQUE REFERENCES devices(id), cert_sha256 TEXT, batch TEXT NOT NULL,
        imported TEXT NOT NULL, used_at TEXT, used_from TEXT,
        reprovision INTEGER NOT NULL DEFAULT 0 CHECK (reprovision IN (0, 1)),
        PRIMARY KEY (manufacturer, serial))""",
)


#: The PostgreSQL twin: the same plain DDL (TEXT, INTEGER 0/1 with its CHECK, the composite primary key and the
#: UNIQUE device_id both dialects index), every statement idempotent.
PG_SCHEMA = MANUFACTURER_SCHEMA


def apply_schema(registry: Registry) -> None:
    """Create the manufacturer tables if they are missing (idempotent; once per Registry object)."""
    if getattr(registry, "_manufacturer_schema", False):
        return
    statements = PG_SCHEMA if registry.dialect == POSTGRESQL else MANUFACTURER_SCHEMA
    with registry.write() as db:
        for statement in statements:
            db.execute(statement)
    registry._manufacturer_schema = True
