"""The registry's authorization side: schema migration, seeded roles, authz events in the same transaction,
supersession grace, and names that end up in topic rules validated like device ids."""

from __future__ import annotations

import sqlite3
from datetime import timedelta

import pytest

from hub.authz.policy import DEFAULT_ROLES
from hub.authz.schema import CREDENTIAL_QUERY
from hub.registry.store import InvalidName, Registry, serial_hex
from tests.unit.test_registry import Clock, MiniCA, TTL, enrolled, raw  # noqa: F401 (fixtures below)
from tests.unit.test_registry import clock, db_path, mini_ca, reg  # noqa: F401


def events(path) -> list[tuple]:
    return raw(path, "SELECT principal, reason FROM authz_events ORDER BY seq")


def credential(path, serial: str) -> tuple | None:
    rows = raw(path, CREDENTIAL_QUERY.replace("?1", "?").replace("?2", "?"), ("device", serial))
    return rows[0] if rows else None


def test_default_roles_are_seeded_and_edits_survive_a_reopen(reg, db_path):
    rules = {(r, a, p) for r, a, p in raw(db_path, "SELECT role, action, pattern FROM role_rules")}
    assert rules == {(r, a, p) for r, rs in DEFAULT_ROLES.items() for a, p in rs}
    with sqlite3.connect(db_path) as conn:
        conn.execute("DELETE FROM role_rules WHERE role = 'commander' AND action = 'publish'")
    Registry(db_path).close()
    assert not raw(db_path, "SELECT 1 FROM role_rules WHERE role = 'commander' AND action = 'publish'")


def test_schema_1_is_migrated(db_path, clock, mini_ca):
    reg = Registry(db_path)
    first = enrolled(reg, mini_ca, clock)
    reg.reenroll("dev-1", serial_hex(first.serial_number), clock.now, mini_ca.issuer("dev-1", clock.now))
    reg.close()
    with sqlite3.connect(db_path) as conn:  # make it look like a schema-1 file
        for table in ("authz_events", "identity_certificates", "identities", "role_rules", "roles"):
            conn.execute("DROP VIEW IF EXISTS authz_credentials")
            conn.execute(f"DROP TABLE {table}")
        conn.execute("ALTER TABLE certificates DROP COLUMN grace_until")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    Registry(db_path).close()
    assert raw(db_path, "SELECT value FROM meta WHERE key = 'schema_version'") == [("4",)]
    rows = raw(db_path, "SELECT status, grace_until IS NOT NULL FROM certificates ORDER BY issued_at")
    assert sorted(rows) == [("active", 0), ("superseded", 1)]
    assert raw(db_path, "SELECT COUNT(*) FROM roles") == [(len(DEFAULT_ROLES),)]


def test_status_changes_write_an_authz_event_in_the_same_transaction(reg, db_path, clock, mini_ca):
    enrolled(reg, mini_ca, clock)
    assert events(db_path) == []
    reg.set_status("dev-1", "suspended", clock.now, actor="t")
    reg.set_status("dev-1", "suspended", clock.now, actor="t")  # no change, no event
    reg.set_status("dev-1", "active", clock.now, actor="t")
    reg.set_status("dev-1", "revoked", clock.now, actor="t")
    assert events(db_path) == [("dev-1", "device suspended"), ("dev-1", "device active"), ("dev-1", "device revoked")]
    assert reg.authz_seq() == 3


def test_renewal_supersedes_with_grace_and_reenrollment_without(reg, db_path, clock, mini_ca):
    first = enrolled(reg, mini_ca, clock)
    second = reg.reenroll("dev-1", serial_hex(first.serial_number), clock.now, mini_ca.issuer("dev-1", clock.now),
                          grace=timedelta(seconds=90))
    row = credential(db_path, serial_hex(first.serial_number))
    assert row[3] == "superseded" and row[7] == (clock.now + timedelta(seconds=90)).isoformat(timespec="microseconds")
    assert credential(db_path, serial_hex(second.serial_number))[3] == "active"
    token = reg.create_token("dev-1", clock.now, TTL)
    reg.enroll("dev-1", token, clock.now, mini_ca.issuer("dev-1", clock.now))
    row = credential(db_path, serial_hex(second.serial_number))
    assert row[3] == "superseded" and row[7] == clock.now.isoformat(timespec="microseconds")
    assert [r for _, r in events(db_path)] == ["renewed", "re-enrolled"]


def test_credential_view_joins_device_state(reg, db_path, clock, mini_ca):
    cert = enrolled(reg, mini_ca, clock)
    reg.set_status("dev-1", "suspended", clock.now, actor="t")
    principal, kind, role, cert_status, principal_status, *_ , groups = credential(db_path, serial_hex(cert.serial_number))
    assert (principal, kind, role, cert_status, principal_status, groups) == \
        ("dev-1", "device", "device", "active", "suspended", "[]")
    assert credential(db_path, "abc") is None
    plan = " ".join(str(r) for r in raw(db_path, "EXPLAIN QUERY PLAN " + CREDENTIAL_QUERY.replace("?1", "'device'")
                                         .replace("?2", "'ab'")))
    assert "SEARCH c USING INDEX" in plan and "SCAN c" not in plan


@pytest.mark.parametrize("groups", [["z\ntopic readwrite devices"], ["#"], ["a/b"], ["+"], ["Upper"], [""],
                                    ["{id}"], ["$SYS"], ["x" * 64]])
def test_group_names_that_could_reach_a_topic_rule_are_refused(reg, db_path, clock, groups):
    with pytest.raises(InvalidName):
        reg.add_device("dev-1", "fleet-a", clock.now, groups=groups)
    assert raw(db_path, "SELECT COUNT(*) FROM devices") == [(0,)]


@pytest.mark.parametrize("labels", [{"Bad Key": "v"}, {"k": "line\nbreak"}, {"k": ""}, {"k": "\x1b[31mred"},
                                    {"k": "x" * 129}, {"a/b": "v"}])
def test_bad_labels_are_refused(reg, clock, labels):
    with pytest.raises(InvalidName):
        reg.add_device("dev-1", "fleet-a", clock.now, labels=labels)


def test_prune_keeps_the_newest_event(reg, db_path, clock, mini_ca):
    enrolled(reg, mini_ca, clock)
    reg.set_status("dev-1", "suspended", clock.now, actor="t")
    reg.set_status("dev-1", "active", clock.now, actor="t")
    assert reg.prune_authz_events(clock.now + timedelta(days=2)) == 1
    assert reg.authz_seq() == 2


def test_a_repeated_offline_writes_nothing(reg, db_path, clock, mini_ca):
    from hub.registry.store import UnknownDevice

    enrolled(reg, mini_ca, clock)
    assert reg.mark_presence("dev-1", True, clock.now) and reg.mark_presence("dev-1", True, clock.advance(seconds=1))
    assert reg.mark_presence("dev-1", False, clock.advance(seconds=1))
    seen = reg.get_device("dev-1")["last_seen"]
    assert not reg.mark_presence("dev-1", False, clock.advance(seconds=1))
    assert reg.get_device("dev-1")["last_seen"] == seen and reg.get_device("dev-1")["online"] is False
    with pytest.raises(UnknownDevice):
        reg.mark_presence("ghost", False, clock.now)
