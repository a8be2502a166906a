"""The manufacturer side tables in the registry; `apply_schema` is idempotent (run at first use by the EST service
and the API). Plain SQL both SQLite and PostgreSQL run (hub/registry/sql.py).

  manufacturers  one row per trusted manufacturer CA: name, the CA certificate (PEM), its SHA-256, who added it
  births         the allowlist: one row per expected birth certificate, keyed by (manufacturer, serialNumber);
                 the device id it enrolls as (a device row made by the import), the birth certificate's SHA-256
                 when the batch names it, the batch, first use (used_at / used_from) and whether the operator
                 allows one more enrollment with it (`reprovision`)
"""

from __future__ import annotations

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


def apply_schema(registry: Registry) -> None:
    """Create the manufacturer tables if they are missing (idempotent; once per Registry object)."""
    if getattr(registry, "_manufacturer_schema", False):
        return
    with registry.write() as db:
        for statement in MANUFACTURER_SCHEMA:
            db.execute(statement)
    registry._manufacturer_schema = True
