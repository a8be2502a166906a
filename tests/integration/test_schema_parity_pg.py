"""Every schema the hub applies, on both dialects: the same tables, views, columns, indexes and triggers.

The registry's own schema is compared in test_registry_pg.py; this covers the side schemas that `serve` and the
commands add to the registry (fleet API side tables, audit indexes, metrics tallies, console presence, jobs and
their lease, manufacturers, the expiry report, the RabbitMQ driver's index), each kept as a SQLite and a
PostgreSQL text side by side. A table, column, index or trigger added to one text only is caught here; applying
everything a second time must change nothing on either dialect (hubs and commands apply them at every start).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from hub.registry.store import Registry
from tests.integration.pgfixtures import pg_server, pg_url  # noqa: F401

pytestmark = pytest.mark.integration
NOW = datetime(2026, 12, 3, tzinfo=timezone.utc)


def apply_all(registry: Registry) -> None:
    from hub.api import auditroutes, metrics, queries
    from hub.api.console import data as console
    from hub.broker import rabbitmq
    from hub.jobs import schema as jobs
    from hub.manufacturer import schema as manufacturers
    from hub.reports import expiry

    for apply in (queries.apply_schema, auditroutes.apply_schema, console.apply_schema, jobs.apply_schema,
                  manufacturers.apply_schema, expiry.apply_schema, rabbitmq.apply_schema):
        apply(registry)
    metrics.apply_schema(registry, NOW)


def sqlite_catalog(registry: Registry) -> dict[str, set]:
    master = registry.query("SELECT type, name, tbl_name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
    tables = [r["name"] for r in master if r["type"] in ("table", "view")]
    return {
        "columns": {(t, c["name"]) for t in tables
                    for c in registry.query(f"SELECT name FROM pragma_table_info('{t}')")},
        "indexes": {(r["tbl_name"], r["name"]) for r in master if r["type"] == "index"},
        "triggers": {(r["tbl_name"], r["name"]) for r in master if r["type"] == "trigger"},
    }


def pg_catalog(registry: Registry) -> dict[str, set]:
    return {
        "columns": {(r["table_name"], r["column_name"]) for r in registry.query(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = current_schema()")},
        # a PRIMARY KEY or UNIQUE constraint is an index of its own on PostgreSQL, an autoindex on SQLite
        "indexes": {(r["tablename"], r["indexname"]) for r in registry.query(
            "SELECT tablename, indexname FROM pg_indexes WHERE schemaname = current_schema() AND indexname NOT IN "
            "(SELECT conname FROM pg_constraint WHERE contype IN ('p', 'u'))")},
        "triggers": {(r["event_object_table"], r["trigger_name"]) for r in registry.query(
            "SELECT DISTINCT event_object_table, trigger_name FROM information_schema.triggers "
            "WHERE trigger_schema = current_schema()")},
    }


def test_every_side_schema_is_the_same_on_both_dialects_and_applies_twice(pg_url, tmp_path: Path):  # noqa: F811
    lite, pg = Registry(tmp_path / "registry.sqlite3"), Registry(pg_url, home=tmp_path)
    try:
        apply_all(lite)
        apply_all(pg)
        first = sqlite_catalog(lite), pg_catalog(pg)
        apply_all(lite)
        apply_all(pg)
        assert (sqlite_catalog(lite), pg_catalog(pg)) == first, "applying the schemas again changed a catalog"
    finally:
        lite.close()
        pg.close()
    lite_cat, pg_cat = first
    assert len(lite_cat["columns"]) > 100, "the side schemas were not applied"
    for kind in ("columns", "indexes", "triggers"):
        only_lite, only_pg = lite_cat[kind] - pg_cat[kind], pg_cat[kind] - lite_cat[kind]
        assert not only_lite and not only_pg, \
            f"{kind}: only on SQLite {sorted(only_lite)}; only on PG {sorted(only_pg)}"
