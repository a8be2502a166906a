"""The expiry report's classification (pure, fake clock) and its query over a real registry file: who is listed,
in which order, with which verdict, keyset pages, cursors."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from hub.reports import expiry
from hub.api.queries import apply_schema
from hub.registry.store import Registry, _ts
from hub.reports.expiry import OVERDUE_GRACE, classify
from tests.integration.pgfixtures import pg_server  # noqa: F401

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
DAY = timedelta(days=1)
LIFE = 30 * DAY  # renewal point: T0 + 20 days for a certificate issued at T0


def verdict(now: datetime, online: bool, last_seen: datetime | None = None, nb: datetime = T0,
            life: timedelta = LIFE) -> str:
    return classify(nb, nb + life, online, last_seen, now).verdict


@pytest.mark.parametrize("now, online, expected", [
    (T0 + 5 * DAY, True, "renewal_due"),                            # long before the renewal point
    (T0 + 5 * DAY, False, "renewal_due"),                           # offline, but not due yet
    (T0 + 20 * DAY - timedelta(seconds=1), False, "renewal_due"),   # a second before the point
    (T0 + 20 * DAY, False, "offline"),                              # at the point, offline: cannot renew
    (T0 + 20 * DAY, True, "renewal_due"),                           # at the point, online: renewing now
    (T0 + 20 * DAY + OVERDUE_GRACE - timedelta(seconds=1), True, "renewal_due"),
    (T0 + 20 * DAY + OVERDUE_GRACE, True, "renewal_overdue"),       # online, past the grace: failing to renew
    (T0 + 30 * DAY - timedelta(seconds=1), True, "renewal_overdue"),
    (T0 + 30 * DAY, True, "expired"),                               # not_after reached: lost
    (T0 + 90 * DAY, False, "expired"),
])
def test_verdicts_over_a_certificates_life(now, online, expected):
    assert verdict(now, online, last_seen=T0 + DAY) == expected


def test_the_renewal_point_is_the_agents():
    from agent.renewal import decide

    v = classify(T0, T0 + LIFE, True, None, T0)
    assert v.renew_at == decide(T0, T0 + LIFE, T0).renew_at == T0 + 20 * DAY
    short = classify(T0, T0 + timedelta(minutes=2), True, None, T0)  # the agent's margins for tiny lifetimes
    assert short.renew_at == decide(T0, T0 + timedelta(minutes=2), T0).renew_at == T0 + timedelta(minutes=1)


def test_reasons_say_why():
    seen = T0 + 3 * DAY
    off = classify(T0, T0 + LIFE, False, seen, T0 + 25 * DAY)
    assert off.verdict == "offline" and "2026-12-04 12:00 UTC" in off.reason and "reconnects" in off.reason
    assert "never seen" in classify(T0, T0 + LIFE, False, None, T0 + 25 * DAY).reason
    assert "failing to renew" in classify(T0, T0 + LIFE, True, seen, T0 + 25 * DAY).reason
    assert "enrollment token" in classify(T0, T0 + LIFE, True, seen, T0 + 31 * DAY).reason


def test_naive_times_are_refused():
    with pytest.raises(ValueError):
        classify(T0.replace(tzinfo=None), T0 + LIFE, True, None, T0)


@pytest.mark.parametrize("cursor", ["", "x", "W10", "WyJhIiwgImIiXQ", "!!!!", "a" * 300])
def test_bad_cursors_are_none(cursor):
    assert expiry.decode_cursor(cursor) is None


def test_cursor_round_trip():
    c = expiry.encode_cursor("2027-01-01T00:00:00.000000+00:00", "dev-1")
    assert expiry.decode_cursor(c) == ("2027-01-01T00:00:00.000000+00:00", "dev-1")


# --- the query, over a real registry file ---------------------------------------------------------------------------

NOW = T0 + 25 * DAY  # 5 days before a T0 certificate expires


def _fleet(r: Registry) -> Registry:
    apply_schema(r)
    expiry.apply_schema(r)
    # (device, issued, lifetime, online, status)
    fleet = [
        ("a-expired", T0 - 10 * DAY, LIFE, False, "active"),       # expired 5 days ago
        ("b-offline", T0, LIFE, False, "active"),                  # past renewal, offline
        ("c-failing", T0 + DAY, LIFE, True, "active"),             # past renewal + grace, online
        ("d-healthy", T0 + 8 * DAY, LIFE, True, "active"),         # renews on day 28, expires in 13 days
        ("e-later", T0 + 20 * DAY, LIFE, True, "active"),          # expires in 25 days: outside 14 days
        ("f-suspended", T0, LIFE, False, "suspended"),             # cut off on purpose: never listed
        ("g-offline2", T0, LIFE, False, "active"),                 # same expiry as b: ordered by id
    ]
    r.create_devices_with_tokens([(d, None, ["g1"]) for d, *_ in fleet], "acme", T0 - 20 * DAY, DAY)
    with r.write() as db:
        for n, (device, issued, life, online, status) in enumerate(fleet):
            db.execute("INSERT INTO certificates (serial, device_id, subject, not_before, not_after, "
                       "fingerprint_sha256, status, issued_at, pem) VALUES (?, ?, ?, ?, ?, 'f', 'active', ?, 'pem')",
                       [f"{n + 1:x}", device, f"CN={device}", _ts(issued), _ts(issued + life), _ts(issued)])
            db.execute("UPDATE devices SET status = ?, online = ?, last_seen = ? WHERE id = ?",
                       [status, int(online), _ts(T0 + DAY), device])
    return r


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def reg(request, tmp_path_factory):
    """One registry per dialect for the module (every test here only reads)."""
    home = tmp_path_factory.mktemp("expiry")
    if request.param == "sqlite":
        r = Registry(home / "registry.sqlite3")
    else:
        server = request.getfixturevalue("pg_server")
        name = server.create_database()
        request.addfinalizer(lambda: server.drop_database(name))
        r = Registry(server.url(name), home=home)
    yield _fleet(r)
    r.close()


@pytest.fixture
def sqlite_reg(tmp_path):
    """SQLite only: its query plans."""
    r = _fleet(Registry(tmp_path / "registry.sqlite3"))
    yield r
    r.close()


def test_default_lists_who_loses_the_certificate_soonest_first(reg):
    items, cursor = expiry.expiring(reg, NOW, 14, 100)
    assert [(i["device"], i["verdict"]) for i in items] == [
        ("a-expired", "expired"), ("b-offline", "offline"), ("g-offline2", "offline"),
        ("c-failing", "renewal_overdue")]
    assert cursor is None
    a = items[0]
    assert a["days_left"] == -5.0 and a["serial"] == "1" and a["groups"] == ["g1"] and a["online"] is False
    assert a["last_seen"].startswith("2026-12-02T12:00")


def test_include_due_lists_the_whole_window(reg):
    items, _ = expiry.expiring(reg, NOW, 14, 100, include_due=True)
    assert [i["device"] for i in items] == ["a-expired", "b-offline", "g-offline2", "c-failing", "d-healthy"]
    assert items[-1]["verdict"] == "renewal_due"
    assert [i["device"] for i in expiry.expiring(reg, NOW, 30, 100, include_due=True)[0]][-1] == "e-later"
    assert [i["device"] for i in expiry.expiring(reg, NOW, 0, 100)[0]] == ["a-expired"]


def test_keyset_pages_cover_the_list_once(reg):
    seen, cursor = [], None
    while True:
        after = expiry.decode_cursor(cursor) if cursor else None
        items, cursor = expiry.expiring(reg, NOW, 14, 1, after, include_due=True)
        seen += [i["device"] for i in items]
        if cursor is None:
            break
    assert seen == ["a-expired", "b-offline", "g-offline2", "c-failing", "d-healthy"]


def test_pages_skip_filtered_rows_beyond_one_batch(reg):
    items, cursor = expiry.expiring(reg, NOW, 14, 2, batch=1)  # one row a query: the page fills across queries
    assert [i["device"] for i in items] == ["a-expired", "b-offline"] and cursor
    items, cursor = expiry.expiring(reg, NOW, 14, 5, expiry.decode_cursor(cursor), batch=1)
    assert [i["device"] for i in items] == ["g-offline2", "c-failing"] and cursor is None


def _plan(reg, index: str, past: bool) -> str:
    """The query plan of a report query as `expiring` sends it (LIMIT a parameter: SQLite plans it differently)."""
    plan = " ".join(r["detail"] for r in reg.query(
        f"EXPLAIN QUERY PLAN {expiry._COLUMNS.format(index=index)} WHERE c.status = 'active' AND c.not_after <= ? "
        f"AND d.status = 'active' {'AND ' + expiry._PAST if past else ''} AND (c.not_after, c.device_id) > (?, ?) "
        "ORDER BY c.not_after, c.device_id LIMIT ?", ["x", *(["y"] if past else []), "y", "z", 5]))
    assert plan.startswith(f"SEARCH c USING INDEX {index} "), plan  # certificates first, never every device
    return plan


def test_the_window_walk_needs_no_sort(sqlite_reg):
    plan = _plan(sqlite_reg, expiry.INDEX, past=False)
    assert f"SEARCH c USING INDEX {expiry.INDEX} ((not_after,device_id)>(?,?)" in plan and "TEMP B-TREE" not in plan


def test_the_default_listing_searches_the_renewal_point_index(sqlite_reg):
    assert f"SEARCH c USING INDEX {expiry.RENEW_INDEX} (<expr><?)" in _plan(sqlite_reg, expiry.RENEW_INDEX, past=True)


@pytest.mark.parametrize("days", [0, 14, 30])
def test_both_access_paths_list_the_same(reg, days):
    assert expiry.past_renewal_sparse(reg, NOW) and not expiry.past_renewal_sparse(reg, NOW, probe=4)
    walk = expiry.expiring(reg, NOW, days, 2, probe=0)  # probe 0: never sparse, the window walk
    indexed = expiry.expiring(reg, NOW, days, 2)
    assert walk == indexed
    if walk[1]:
        assert expiry.expiring(reg, NOW, days, 5, expiry.decode_cursor(walk[1]), probe=0) == \
            expiry.expiring(reg, NOW, days, 5, expiry.decode_cursor(walk[1]))
