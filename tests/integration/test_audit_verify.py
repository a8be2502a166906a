"""`tessera-hub audit verify` (GET /api/v1/audit/verify through the in-process API): an intact chain says so and
prints its head; a row changed, deleted or inserted around the hub (triggers dropped first, as an attacker with
the registry file would) is named, with exit status 1."""

from __future__ import annotations

import sqlite3

import pytest

from tests.integration.hubfixtures import init_hub

pytestmark = pytest.mark.integration


@pytest.fixture
def fleet(tmp_path):
    hub = init_hub(tmp_path)
    for n in range(3):
        hub.add_device(f"av-{n}")
    return hub


def tamper(hub, *sql: str) -> None:
    conn = sqlite3.connect(hub.registry_path)
    try:
        conn.execute("DROP TRIGGER IF EXISTS audit_no_update")
        conn.execute("DROP TRIGGER IF EXISTS audit_no_delete")
        for statement in sql:
            conn.execute(statement)
        conn.commit()
    finally:
        conn.close()


def test_an_intact_chain_verifies_and_prints_its_head(fleet):
    v = fleet.cli_json("audit", "verify")
    assert v["ok"] is True and v["broken_at"] is None and v["checked"] >= 3
    head = fleet.query("SELECT id, mac FROM audit ORDER BY id DESC LIMIT 1")[0]
    assert v["head_id"] <= head["id"] and v["head_mac"]  # the verify call's own api row may come after
    text = fleet.cli_ok("audit", "verify")
    assert text.startswith("audit chain intact: ") and "head: row " in text
    assert all(len(line) <= 80 for line in text.splitlines()[:1])


@pytest.mark.parametrize("attack", ["change", "delete", "insert"])
def test_a_row_changed_deleted_or_inserted_is_named(fleet, attack):
    rows = fleet.query("SELECT id FROM audit WHERE action = 'device.add' ORDER BY id")
    victim = rows[1]["id"]
    if attack == "change":
        tamper(fleet, f"UPDATE audit SET detail = 'fleet=other' WHERE id = {victim}")
    elif attack == "delete":
        tamper(fleet, f"DELETE FROM audit WHERE id = {victim}")
    else:  # a backdated row slotted into a gap, with a made-up mac
        tamper(fleet, f"DELETE FROM audit WHERE id = {victim}",
               f"INSERT INTO audit (id, at, actor, action, device_id, outcome, detail, source, mac) "
               f"SELECT {victim}, at, 'cli', 'device.add', 'av-x', 'ok', '', NULL, mac FROM audit WHERE id = "
               f"{rows[0]['id']}")
    proc = fleet.cli("audit", "verify")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    first_line = proc.stdout.splitlines()[0]
    expected = victim + 1 if attack == "delete" else victim
    assert first_line.startswith(f"audit chain BROKEN at row {expected}: "), first_line
    assert fleet.cli("audit", "verify", "--json").returncode == 1


def test_the_listing_still_works_beside_verify(fleet):
    rows = fleet.cli_json("audit", "--device", "av-1")
    assert [r["action"] for r in rows] == ["token.create", "device.add"]  # newest first
