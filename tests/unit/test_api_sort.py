"""Device list sort orders: every order pages through all matches exactly once, in order, on its own index."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from hub.api import queries
from hub.api.queries import BadRequest, Selector
from hub.registry.store import Registry, _ts
from tests.integration.pgfixtures import pg_server  # noqa: F401

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def _fleet(r: Registry) -> Registry:
    rows = [(f"dev-{n:04d}", {"site": "a" if n % 3 else "b"}, ["even"] if n % 2 == 0 else ["odd"]) for n in range(90)]
    r.create_devices_with_tokens(rows, "acme", NOW, timedelta(days=1))
    queries.apply_schema(r)
    with r.write() as db:
        for n in range(90):  # last_seen: a third never seen, the rest in a scrambled order with ties
            seen = None if n % 3 == 0 else _ts(NOW - timedelta(minutes=(n * 37) % 11))
            created = _ts(NOW - timedelta(seconds=(n * 53) % 17))
            db.execute("UPDATE devices SET last_seen = ?, created = ? WHERE id = ?", [seen, created, f"dev-{n:04d}"])
        for n in range(0, 90, 5):  # an active certificate for a fifth of them (expiry with ties)
            db.execute("INSERT INTO certificates (serial, device_id, subject, not_before, not_after, "
                       "fingerprint_sha256, status, issued_at, pem) VALUES (?, ?, 'CN=x', ?, ?, 'f', 'active', ?, '')",
                       [f"{n:x}", f"dev-{n:04d}", _ts(NOW), _ts(NOW + timedelta(days=(n * 7) % 5)), _ts(NOW)])
    return r


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def reg(request, tmp_path_factory):
    """One registry per dialect for the module (every test here only reads)."""
    home = tmp_path_factory.mktemp("sort")
    if request.param == "sqlite":
        r = Registry(home / "registry.sqlite3")
    else:
        server = request.getfixturevalue("pg_server")
        name = server.create_database()
        request.addfinalizer(lambda: server.drop_database(name))
        r = Registry(server.url(name), home=home)
    yield _fleet(r)
    r.close()


def _plan(reg: Registry, sql: str, params: list) -> str:
    """The query plan, on PostgreSQL with sequential scans and sorts priced out (a 90-row table is otherwise
    scanned whatever the indexes): the plan then says whether an index can serve the order."""
    if reg.dialect == "sqlite":
        return " | ".join(r["detail"] for r in reg.query(f"EXPLAIN QUERY PLAN {sql}", params))
    with reg.write() as db:
        db.execute("SET LOCAL enable_seqscan = off")
        db.execute("SET LOCAL enable_sort = off")
        db.execute("SET LOCAL enable_bitmapscan = off")
        return " | ".join(r["QUERY PLAN"] for r in db.query(f"EXPLAIN {sql}", params))


def _sorted(reg: Registry, plan: str) -> bool:
    return ("TEMP B-TREE" in plan) if reg.dialect == "sqlite" else ("Sort" in plan)


def _walk(reg, sel, sort, limit=7):
    seen, after = [], None
    while True:
        page, cursor = queries.list_devices(reg, sel, limit, after, sort)
        seen += page
        if cursor is None:
            return seen
        after = queries.decode_cursor(cursor, sort)


def _key(d, name):
    return {"id": "", "created": d["created"], "last_seen": d["last_seen"] or "",
            "cert_expires": d["cert_not_after"]}[name]


@pytest.mark.parametrize("sort", queries.SORTS)
@pytest.mark.parametrize("raw", [{}, {"group": "odd"}, {"label": "site=b"}, {"status": "pending", "group": "even"}])
def test_every_sort_pages_each_match_once_in_order(reg, sort, raw):
    sel = Selector.parse(raw)
    got = _walk(reg, sel, sort)
    name, desc = sort.lstrip("-"), sort.startswith("-")
    everyone = _walk(reg, sel, "id", limit=1000)
    if name == "cert_expires":
        everyone = [d for d in everyone if d["cert_not_after"] is not None]
    expected = sorted(everyone, key=lambda d: (_key(d, name), d["id"]), reverse=desc)
    assert [d["id"] for d in got] == [d["id"] for d in expected] and len(got) > 0


def test_cursor_belongs_to_its_sort(reg):
    _, cursor = queries.list_devices(reg, Selector(), 5, None, "-last_seen")
    key, after = queries.decode_cursor(cursor, "-last_seen")
    assert after.startswith("dev-") and key.endswith("+00:00")
    for other in ("id", "last_seen", "created"):
        with pytest.raises(BadRequest, match="same sort"):
            queries.decode_cursor(cursor, other)
    _, id_cursor = queries.list_devices(reg, Selector(), 5, None, "id")
    with pytest.raises(BadRequest):
        queries.decode_cursor(id_cursor, "created")
    with pytest.raises(BadRequest, match="sort must be one of"):
        queries.parse_sort("colour")


@pytest.mark.parametrize("sort, index", [("-last_seen", "devices_last_seen_sort"), ("created", "devices_created_sort"),
                                         ("cert_expires", "certificates_active_expiry")])
def test_sorted_pages_walk_an_index_without_a_sort_step(reg, sort, index):
    source, where, params, key = Selector().sql(sort)
    expr = queries.SORT_KEYS[sort.lstrip("-")]
    order = "DESC" if sort.startswith("-") else "ASC"
    plan = _plan(reg, f"SELECT {key} FROM {source} WHERE {where} AND ({expr}, {key}) > (?, ?) "
                 f"ORDER BY {expr} {order}, {key} {order} LIMIT 10", [*params, "", ""])
    assert index in plan and not _sorted(reg, plan), plan


@pytest.mark.parametrize("sort, index", [("-last_seen", "devices_status_last_seen"),
                                         ("created", "devices_status_created")])
def test_sorted_pages_under_a_status_filter_walk_the_composite_index(reg, sort, index):
    source, where, params, key = Selector.parse({"status": "active"}).sql(sort)
    expr = queries.SORT_KEYS[sort.lstrip("-")]
    order = "DESC" if sort.startswith("-") else "ASC"
    plan = _plan(reg, f"SELECT {key} FROM {source} WHERE {where} "
                 f"ORDER BY {expr} {order}, {key} {order} LIMIT 10", params)
    assert index in plan and not _sorted(reg, plan), plan
