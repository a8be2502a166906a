"""The registry core on both dialects: the same tests on a SQLite file and on a real PostgreSQL (pgfixtures), plus
what only PostgreSQL has (several processes as several hubs on one database, its migrations and refusals).

Every read goes through the registry's own SQL (`Registry.query`), so each assertion holds on either dialect.
Cost: one PostgreSQL server per session (~1 s), a fresh database per test (~0.1 s).
"""

from __future__ import annotations

import multiprocessing
import threading
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from hub.registry import pgschema
from hub.registry.errors import RegistryError
from hub.registry.sql import pg_sql
from hub.registry.store import DeviceExists, DeviceNotActive, InvalidDeviceId, Registry, TokenRejected
from tests.integration.pgfixtures import PgServer, pg_server, pg_url  # noqa: F401  (fixtures)
from tests.unit.test_registry import TTL, Clock, MiniCA, clock, mini_ca  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path: Path) -> tuple[str, Path]:
    """(what Registry() is given, the hub directory): a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "registry.sqlite3"), tmp_path
    return request.getfixturevalue("pg_url"), tmp_path


def open_registry(target: tuple[str, Path]) -> Registry:
    where, home = target
    return Registry(where, home=home) if where.startswith("postgresql") else Registry(Path(where))


@pytest.fixture
def reg(target):
    registry = open_registry(target)
    yield registry
    registry.close()


def count(reg: Registry, table: str, where: str = "TRUE") -> int:
    return int(reg.query(f"SELECT COUNT(*) AS n FROM {table} WHERE {where}")[0]["n"])


def enrolled(reg: Registry, ca: MiniCA, clock: Clock, device_id: str = "dev-1"):
    reg.add_device(device_id, "fleet-a", clock.now)
    token = reg.create_token(device_id, clock.now, TTL)
    return reg.enroll(device_id, token, clock.now, ca.issuer(device_id, clock.now))


def test_both_dialects_have_the_same_tables_and_columns(pg_url, tmp_path: Path) -> None:
    """The PostgreSQL migrations (pgschema) and the SQLite schema (schema.py, hub/authz/schema.py) are two copies
    of one design: a table, view or column added to one only is caught here."""
    lite = Registry(tmp_path / "registry.sqlite3")
    pg = Registry(pg_url, home=tmp_path)
    try:
        lite_cols = {(t["name"], c["name"])
                     for t in lite.query("SELECT name FROM sqlite_master WHERE type IN ('table', 'view') "
                                         "AND name NOT LIKE 'sqlite_%'")
                     for c in lite.query(f"SELECT name FROM pragma_table_info('{t['name']}')")}
        pg_cols = {(r["table_name"], r["column_name"])
                   for r in pg.query("SELECT table_name, column_name FROM information_schema.columns "
                                     "WHERE table_schema = current_schema()")}
    finally:
        lite.close()
        pg.close()
    assert lite_cols, "no SQLite tables read"
    assert lite_cols == pg_cols, (sorted(lite_cols - pg_cols), sorted(pg_cols - lite_cols))


# --- the same behaviour on both -----------------------------------------------------------------------------------

def test_devices(reg: Registry, clock: Clock) -> None:
    reg.add_device("dev-2", "fleet-a", clock.now, labels={"site": "b"}, groups=["g1"])
    reg.add_device("dev-1", "fleet-a", clock.now)
    with pytest.raises(DeviceExists):
        reg.add_device("dev-1", "fleet-a", clock.now)
    with pytest.raises(InvalidDeviceId):
        reg.add_device("Bad!", "fleet-a", clock.now)
    assert [d["id"] for d in reg.list_devices()] == ["dev-1", "dev-2"]
    device = reg.require_device("dev-2")
    assert (device["status"], device["labels"], device["groups"], device["online"]) == ("pending", {"site": "b"},
                                                                                        ["g1"], False)
    assert reg.mark_presence("dev-2", True, clock.advance(seconds=1))
    assert reg.mark_presence("dev-2", False, clock.advance(seconds=1))
    assert not reg.mark_presence("dev-2", False, clock.now)  # offline twice: nothing written
    assert reg.require_device("dev-2")["online"] is False


def test_token_lifecycle(reg: Registry, clock: Clock, mini_ca: MiniCA) -> None:
    reg.add_device("dev-1", "fleet-a", clock.now)
    old = reg.create_token("dev-1", clock.now, TTL)
    token = reg.create_token("dev-1", clock.now, TTL)
    with pytest.raises(TokenRejected, match="superseded"):
        reg.enroll("dev-1", old, clock.now, mini_ca.issuer("dev-1", clock.now))
    with pytest.raises(TokenRejected) as unknown:
        reg.enroll("dev-1", "nope", clock.now, mini_ca.issuer("dev-1", clock.now))
    assert unknown.value.code == "unknown_token"
    cert = reg.enroll("dev-1", token, clock.now, mini_ca.issuer("dev-1", clock.now))
    with pytest.raises(TokenRejected) as replay:
        reg.enroll("dev-1", token, clock.now, mini_ca.issuer("dev-1", clock.now))
    assert replay.value.code == "token_used"
    assert reg.require_device("dev-1")["status"] == "active"
    assert reg.check_client_cert(format(cert.serial_number, "x"), "dev-1", clock.now)["status"] == "active"
    late = reg.create_token("dev-1", clock.now, TTL)
    with pytest.raises(TokenRejected) as expired:
        reg.enroll("dev-1", late, clock.now + TTL, mini_ca.issuer("dev-1", clock.now))
    assert expired.value.code == "token_expired"
    assert count(reg, "certificates") == 1
    assert count(reg, "audit", "action = 'enroll' AND outcome = 'denied'") == 4


def test_reenroll_revoke_decommission(reg: Registry, clock: Clock, mini_ca: MiniCA) -> None:
    first = enrolled(reg, mini_ca, clock)
    seq = reg.authz_seq()
    second = reg.reenroll("dev-1", format(first.serial_number, "x"), clock.advance(minutes=1),
                          mini_ca.issuer("dev-1", clock.now))
    assert reg.authz_seq() == seq + 1
    assert [c["status"] for c in reg.certificates_of("dev-1")] == ["active", "superseded"]
    reg.set_status("dev-1", "suspended", clock.advance(minutes=1), "ops")
    assert [h["serial"] for h in reg.held_certificates(clock.now)] == sorted(
        format(c.serial_number, "x") for c in (first, second))
    reg.set_status("dev-1", "active", clock.advance(minutes=1), "ops")
    out = reg.set_status("dev-1", "revoked", clock.advance(minutes=1), "ops", reason="keyCompromise")
    assert len(out["revoked_serials"]) == 2
    assert [r["serial"] for r in reg.revoked_certificates(clock.now)] == sorted(out["revoked_serials"])
    with pytest.raises(DeviceNotActive):
        reg.set_status("dev-1", "active", clock.now, "ops")
    reg.add_device("dev-2", "fleet-a", clock.now)
    reg.create_token("dev-2", clock.now, TTL)
    assert "1 unused token(s) invalidated" in reg.decommission("dev-2", clock.now, "ops")["device"]["id"] + \
        reg.audit_log(1)[0]["detail"]
    assert reg.prune_authz_events(clock.now + timedelta(days=1)) >= 1 and reg.authz_seq() > 0


def test_lifecycle_edges(reg: Registry, clock: Clock, mini_ca: MiniCA) -> None:
    reg.add_device("dev-p", "fleet-a", clock.now)
    reg.set_status("dev-p", "suspended", clock.now, "ops")
    assert reg.set_status("dev-p", "active", clock.now, "ops")["device"]["status"] == "pending"  # never enrolled
    audits = count(reg, "audit")
    assert reg.set_status("dev-p", "active", clock.now, "ops")["revoked_serials"] == []
    assert count(reg, "audit") == audits  # the current status again: a no-op
    enrolled(reg, mini_ca, clock, "dev-a")
    reg.set_status("dev-a", "revoked", clock.now, "ops")
    assert reg.decommission("dev-a", clock.now, "ops")["device"]["status"] == "decommissioned"  # after revoked
    with pytest.raises(DeviceNotActive) as final:
        reg.create_token("dev-a", clock.now, TTL)
    assert final.value.code == "device_decommissioned"


def test_batch_atomic(reg: Registry, clock: Clock, mini_ca: MiniCA) -> None:
    out = reg.create_devices_with_tokens(((f"dev-{i:04d}", {"b": "1"}, ["g"]) for i in range(1200)), "fleet-a",
                                         clock.now, TTL, chunk=500)
    assert len(out) == 1200 and count(reg, "tokens", "used_at IS NULL") == 1200
    with pytest.raises(DeviceExists):
        reg.create_devices_with_tokens([("new-1", None, None), ("dev-0005", None, None)], "fleet-a", clock.now, TTL)
    assert count(reg, "devices") == 1200
    device_id, token = out[777]
    reg.enroll(device_id, token, clock.now, mini_ca.issuer(device_id, clock.now))


def test_audit_chain_and_append_only(reg: Registry, clock: Clock, mini_ca: MiniCA) -> None:
    enrolled(reg, mini_ca, clock)
    reg.audit("custom.thing", "ok", clock.now, actor="ops", detail="bell \x07 here", source="cli")
    verdict = reg.verify_audit()
    assert verdict.ok and verdict.checked == count(reg, "audit") == 4
    assert reg.audit_log(1)[0]["detail"] == "bell \\x07 here"
    with pytest.raises(Exception, match="append-only"):
        with reg.write() as db:
            db.execute("UPDATE audit SET detail = 'forged'")
    with pytest.raises(Exception, match="append-only"):
        with reg.write() as db:
            db.execute("DELETE FROM audit")
    assert count(reg, "audit") == 4 and reg.verify_audit().ok


def test_threads_race_one_token(reg: Registry, clock: Clock, mini_ca: MiniCA) -> None:
    reg.add_device("dev-1", "fleet-a", clock.now)
    token = reg.create_token("dev-1", clock.now, TTL)
    barrier, results, lock = threading.Barrier(6), [], threading.Lock()

    def run() -> None:
        barrier.wait()
        try:
            reg.enroll("dev-1", token, clock.now, mini_ca.issuer("dev-1", clock.now))
            outcome = "cert"
        except TokenRejected as exc:
            outcome = exc.code
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == ["cert"] + ["token_used"] * 5
    assert count(reg, "certificates") == 1 and reg.verify_audit().ok


def test_reopen_keeps_schema(target, clock: Clock) -> None:
    first = open_registry(target)
    first.add_device("dev-1", "fleet-a", clock.now)
    first.close()
    again = open_registry(target)
    assert [d["id"] for d in again.list_devices()] == ["dev-1"]
    assert again.query("SELECT value FROM meta WHERE key = 'schema_version'")[0]["value"] == "4"
    assert count(again, "roles") >= 1
    again.close()


# --- several hubs on one PostgreSQL -------------------------------------------------------------------------------

def test_enrollments_race_other_writers_on_the_same_devices(pg_url: str, tmp_path: Path, clock: Clock,  # noqa: F811
                                                            mini_ca: MiniCA) -> None:
    """Enrollments (which take the write lock shared, and the chain's at their audit row) against writers that
    take it exclusively (a new token, suspend/resume) on the same 30 devices at once, each thread its own
    connection: every outcome is a registry answer (no deadlock, no constraint error), the chain stays whole."""
    reg = Registry(pg_url, home=tmp_path)
    rows = reg.create_devices_with_tokens(((f"dev-{i:03d}", None, None) for i in range(30)), "fleet-a", clock.now, TTL)
    barrier, errors = threading.Barrier(3), []

    def guarded(fn) -> None:
        barrier.wait()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001  (reported by the assertion)
            errors.append(repr(exc))

    def enroll_all() -> None:
        for device_id, token in rows:
            try:
                reg.enroll(device_id, token, clock.now, mini_ca.issuer(device_id, clock.now))
            except (TokenRejected, DeviceNotActive):
                pass

    def new_tokens() -> None:
        for device_id, _ in rows:
            try:
                reg.create_token(device_id, clock.now, TTL)
            except DeviceNotActive:  # suspended at that moment
                pass

    def suspend_resume() -> None:
        for device_id, _ in rows:
            reg.set_status(device_id, "suspended", clock.now, "ops")
            reg.set_status(device_id, "active", clock.now, "ops")

    threads = [threading.Thread(target=guarded, args=(f,)) for f in (enroll_all, new_tokens, suspend_resume)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert reg.query("SELECT COUNT(*) AS n FROM (SELECT device_id FROM certificates WHERE status = 'active' "
                     "GROUP BY device_id HAVING COUNT(*) > 1) x")[0]["n"] == 0
    assert reg.query("SELECT COUNT(*) AS n FROM (SELECT device_id FROM tokens WHERE used_at IS NULL "
                     "GROUP BY device_id HAVING COUNT(*) > 1) x")[0]["n"] == 0  # one live token a device at most
    assert count(reg, "devices", "status = 'active'") == 30 - count(reg, "devices", "status = 'pending'")
    assert reg.verify_audit().ok
    reg.close()


def _hub_child(url: str, home: str, tokens: list[tuple[str, str]], now: str, barrier, queue) -> None:
    """One 'hub' (a spawned process with its own Registry on the database): tries every token once."""
    reg = Registry(url, home=Path(home))
    ca, when = MiniCA(), datetime.fromisoformat(now)
    outcomes: dict[str, int] = {}
    barrier.wait()
    for device_id, token in tokens:
        try:
            reg.enroll(device_id, token, when, ca.issuer(device_id, when))
            outcome = "cert"
        except TokenRejected as exc:
            outcome = exc.code
        except Exception as exc:  # noqa: BLE001  (reported by the assertion)
            outcome = repr(exc)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    reg.close()
    queue.put(outcomes)


def test_hubs_race_every_token(pg_url: str, tmp_path: Path, clock: Clock) -> None:  # noqa: F811
    """Three processes on one PostgreSQL registry all try the same 40 tokens (each in its own order): every token
    is used exactly once, every device has one certificate, the audit chain is one unbroken order."""
    reg = Registry(pg_url, home=tmp_path)
    rows = reg.create_devices_with_tokens(((f"dev-{i:03d}", None, None) for i in range(40)), "fleet-a", clock.now, TTL)
    ctx = multiprocessing.get_context("spawn")
    n = 3
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    orders = [rows, rows[::-1], rows[20:] + rows[:20]]
    procs = [ctx.Process(target=_hub_child, args=(pg_url, str(tmp_path), orders[i], clock.now.isoformat(), barrier,
                                                  queue)) for i in range(n)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert sum(r.get("cert", 0) for r in results) == 40, results
    assert sum(r.get("token_used", 0) for r in results) == 40 * (n - 1), results
    assert count(reg, "tokens", "used_at IS NULL") == 0
    assert reg.query("SELECT COUNT(DISTINCT device_id) AS d, COUNT(*) AS n FROM certificates")[0] == {"d": 40, "n": 40}
    verdict = reg.verify_audit()
    assert verdict.ok and verdict.checked == count(reg, "audit")
    reg.close()


# --- PostgreSQL's migrations and refusals -------------------------------------------------------------------------

def test_pg_migrations_once_and_newer_refused(pg_url: str, tmp_path: Path) -> None:  # noqa: F811
    regs = []
    threads = [threading.Thread(target=lambda: regs.append(Registry(pg_url, home=tmp_path))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(regs) == 4  # four opens at once: one created the schema, the others found it
    assert regs[0].query("SELECT value FROM meta WHERE key = 'schema_version'")[0]["value"] == str(
        pgschema.SCHEMA_VERSION)
    with regs[0].write() as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    for r in regs:
        r.close()
    with pytest.raises(RegistryError, match="schema version 99, this code needs 4") as exc:
        Registry(pg_url, home=tmp_path)
    assert "passfile" in str(exc.value) and "@" in str(exc.value)  # the URL named; it holds no password


def test_pg_collation_refused(pg_server: PgServer, tmp_path: Path) -> None:  # noqa: F811
    """Text order must be byte order: a database with an ICU (or any non-C) collation is refused, naming the fix."""
    name = pg_server.create_database("icu_" + tmp_path.name[-8:].replace("-", "_"))
    pg_server.drop_database(name)
    pg_server._admin(f"CREATE DATABASE \"{name}\" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'")
    try:
        with pytest.raises(RegistryError, match="needs byte order .*LC_COLLATE 'C'"):
            Registry(pg_server.url(name), home=tmp_path)
    finally:
        pg_server.drop_database(name)


def test_pg_unreachable_is_one_line(pg_server: PgServer, tmp_path: Path) -> None:  # noqa: F811
    closed = pg_server.url("postgres").replace(f":{pg_server.port}/", ":1/")
    with pytest.raises(RegistryError, match=r"^registry postgresql\+psycopg://tessera@127\.0\.0\.1:1/postgres"
                                            r"\?passfile=.*: cannot connect: .*refused") as exc:
        Registry(closed, home=tmp_path)
    assert "\n" not in str(exc.value) and exc.value.code == "unavailable"


def test_pg_sql_translation() -> None:
    assert pg_sql("SELECT 1 FROM t WHERE a = ? AND b LIKE '%?%' AND c = ?") == \
        "SELECT 1 FROM t WHERE a = %s AND b LIKE '%%?%%' AND c = %s"
    assert pg_sql('SELECT "odd?name" FROM t WHERE x = ?') == 'SELECT "odd?name" FROM t WHERE x = %s'
