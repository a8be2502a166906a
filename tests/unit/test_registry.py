"""Tests for hub.registry.store on real SQLite files, with real certificates from a small CA made here and a fake clock."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hub.ca.policy import PolicyError
from hub.registry.store import (CertRejected, DeviceExists, DeviceNotActive, InvalidDeviceId, Registry, RegistryError,
                          TokenRejected, UnknownDevice, serial_hex, token_hash)

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc)
TTL = timedelta(days=7)


class Clock:
    """A fake clock: tests move time by hand."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def advance(self, **kw: float) -> datetime:
        self.now += timedelta(**kw)
        return self.now


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class MiniCA:
    """A self-made EC P-256 CA issuing device certificates valid from `now` for `days`."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = (x509.CertificateBuilder().subject_name(_name("Test Fleet CA")).issuer_name(_name("Test Fleet CA"))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(T0 - timedelta(days=1)).not_valid_after(T0 + timedelta(days=3650))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .sign(self.key, hashes.SHA256()))

    def issue(self, device_id: str, now: datetime, days: float = 30) -> x509.Certificate:
        device_key = ec.generate_private_key(ec.SECP256R1())
        return (x509.CertificateBuilder().subject_name(_name(device_id)).issuer_name(self.cert.subject)
                .public_key(device_key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(self.key, hashes.SHA256()))

    def issuer(self, device_id: str, now: datetime, days: float = 30) -> Callable[[], x509.Certificate]:
        return lambda: self.issue(device_id, now, days)


@pytest.fixture(scope="module")
def mini_ca() -> MiniCA:
    return MiniCA()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "registry.db"


@pytest.fixture
def reg(db_path: Path):
    registry = Registry(db_path)
    yield registry
    registry.close()


def raw(path: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Read the database with a plain sqlite3 connection (not the registry's)."""
    with sqlite3.connect(path) as conn:
        return conn.execute(sql, params).fetchall()


def enrolled(reg: Registry, ca: MiniCA, clock: Clock, device_id: str = "dev-1", days: float = 30) -> x509.Certificate:
    reg.add_device(device_id, "fleet-a", clock.now)
    token = reg.create_token(device_id, clock.now, TTL)
    return reg.enroll(device_id, token, clock.now, ca.issuer(device_id, clock.now, days))


def denied(reg: Registry, action: str) -> list[dict]:
    return [r for r in reg.audit_log(device_id=None) if r["action"] == action and r["outcome"] == "denied"]


# --- devices -----------------------------------------------------------------------------------------------------

def test_add_get_list(reg: Registry, clock: Clock, mini_ca: MiniCA) -> None:
    d = reg.add_device("dev-1", "fleet-a", clock.now, labels={"site": "lab"}, groups=["sensors"])
    assert d["id"] == "dev-1" and d["fleet"] == "fleet-a" and d["status"] == "pending"
    assert d["labels"] == {"site": "lab"} and d["groups"] == ["sensors"] and d["online"] is False
    assert d["created"] == "2030-01-01T12:00:00.000000+00:00" and d["last_seen"] is None
    assert d["cert_not_after"] is None
    reg.add_device("dev-0", "fleet-a", clock.now)
    assert reg.get_device("dev-1") == d
    assert reg.get_device("nope") is None
    with pytest.raises(UnknownDevice) as ei:
        reg.require_device("nope")
    assert ei.value.code == "unknown_device"
    with pytest.raises(DeviceExists):
        reg.add_device("dev-1", "fleet-a", clock.now)
    token = reg.create_token("dev-1", clock.now, TTL)
    cert = reg.enroll("dev-1", token, clock.now, mini_ca.issuer("dev-1", clock.now, days=30))
    listed = reg.list_devices()
    assert [d["id"] for d in listed] == ["dev-0", "dev-1"]
    assert listed[0]["cert_not_after"] is None
    assert listed[1]["cert_not_after"] == cert.not_valid_after_utc.isoformat(timespec="microseconds")
    assert [r["action"] for r in reg.audit_log()][-2:] == ["device.add", "device.add"]


def test_list_devices_is_one_query(reg: Registry, clock: Clock) -> None:
    for i in range(5):
        reg.add_device(f"dev-{i}", "fleet-a", clock.now)
    statements: list[str] = []
    reg._db().conn.set_trace_callback(statements.append)
    try:
        assert len(reg.list_devices()) == 5
    finally:
        reg._db().conn.set_trace_callback(None)
    assert len([s for s in statements if s.lstrip().upper().startswith("SELECT")]) == 1, statements


@pytest.mark.parametrize("bad", ["Dev-1", "-x", "", "a" * 64, "hub", "dev_1", "dev 1"])
def test_invalid_id_refused_nothing_written(reg: Registry, db_path: Path, clock: Clock, bad: str) -> None:
    with pytest.raises(InvalidDeviceId) as ei:
        reg.add_device(bad, "fleet-a", clock.now)
    assert isinstance(ei.value, PolicyError) and ei.value.code == "invalid_device_id"
    assert raw(db_path, "SELECT count(*) FROM devices") == [(0,)]
    assert raw(db_path, "SELECT count(*) FROM audit") == [(0,)]


def test_naive_time_refused(reg: Registry) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        reg.add_device("dev-1", "fleet-a", datetime(2030, 1, 1))
    assert reg.get_device("dev-1") is None


def test_connection_settings(reg: Registry, db_path: Path) -> None:
    assert raw(db_path, "PRAGMA journal_mode") == [("wal",)]
    conn = reg._db().conn
    assert conn.execute("PRAGMA foreign_keys").fetchone() == (1,)
    assert conn.execute("PRAGMA busy_timeout").fetchone() == (10_000,)
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        conn.execute("INSERT INTO tokens (device_id, token_hash, created, expires) VALUES ('ghost', 'x', 'a', 'b')")
    assert raw(db_path, "SELECT value FROM meta WHERE key = 'schema_version'") == [("4",)]


def test_presence(reg: Registry, clock: Clock) -> None:
    reg.add_device("dev-1", "fleet-a", clock.now)
    reg.mark_presence("dev-1", True, clock.advance(minutes=1))
    d = reg.require_device("dev-1")
    assert d["online"] is True and d["last_seen"] == "2030-01-01T12:01:00.000000+00:00"
    reg.mark_presence("dev-1", False, clock.advance(minutes=1))
    assert reg.require_device("dev-1")["online"] is False
    with pytest.raises(UnknownDevice):
        reg.mark_presence("ghost", True, clock.now)


# --- tokens and enrollment ---------------------------------------------------------------------------------------

def test_token_stored_only_hashed(db_path: Path, clock: Clock) -> None:
    reg = Registry(db_path)
    reg.add_device("dev-1", "fleet-a", clock.now)
    token = reg.create_token("dev-1", clock.now, TTL)
    assert len(token) >= 32
    stored = raw(db_path, "SELECT token_hash FROM tokens")
    assert stored == [(token_hash(token),)]
    blob = b"".join(p.read_bytes() for p in db_path.parent.iterdir() if p.name.startswith(db_path.name))
    reg.close()
    blob += b"".join(p.read_bytes() for p in db_path.parent.iterdir() if p.name.startswith(db_path.name))
    assert token_hash(token).encode() in blob  # the search does find what is there...
    assert token.encode() not in blob  # ...and the token itself is nowhere
    assert all(token not in str(r) for r in raw(db_path, "SELECT * FROM audit"))


def test_enroll_ok(reg: Registry, db_path: Path, clock: Clock, mini_ca: MiniCA) -> None:
    reg.add_device("dev-1", "fleet-a", clock.now)
    token = reg.create_token("dev-1", clock.now, TTL)
    cert = reg.enroll("dev-1", token, clock.advance(hours=1), mini_ca.issuer("dev-1", clock.now),
                      source="10.0.0.7")
    rows = raw(db_path, "SELECT serial, device_id, subject, fingerprint_sha256, status, issued_at FROM certificates")
    assert rows == [(serial_hex(cert.serial_number), "dev-1", "CN=dev-1", cert.fingerprint(hashes.SHA256()).hex(),
                     "active", "2030-01-01T13:00:00.000000+00:00")]
    assert raw(db_path, "SELECT used_at, used_from FROM tokens") == [("2030-01-01T13:00:00.000000+00:00",
                                                                      "10.0.0.7")]
    top = reg.audit_log(limit=1)[0]
    assert (top["action"], top["outcome"], top["device_id"], top["source"]) == ("enroll", "ok", "dev-1", "10.0.0.7")


def test_replayed_token(reg: Registry, db_path: Path, clock: Clock, mini_ca: MiniCA) -> None:
    reg.add_device("dev-1", "fleet-a", clock.now)
    token = reg.create_token("dev-1", clock.now, TTL)
    reg.enroll("dev-1", token, clock.now, mini_ca.issuer("dev-1", clock.now))
    with pytest.raises(TokenRejected) as ei:
        reg.enroll("dev-1", token, clock.now, mini_ca.issuer("dev-1", clock.now), source="1.2.3.4")
    assert ei.value.code == "token_used"
    rows = denied(reg, "enroll")
    assert len(rows) == 1 and rows[0]["detail"].startswith("token_used") and rows[0]["source"] == "1.2.3.4"
    assert raw(db_path, "SELECT count(*) FROM certificates") == [(1,)]


def test_expired_token(reg: Registry, db_path: Path, clock: Clock, mini_ca: MiniCA) -> None:
    reg.add_device("dev-1", "fleet-a", clock.now)
    token = reg.create_token("dev-1", clock.now, timedelta(hours=1))
    clock.advance(hours=1)
    with pytest.raises(TokenRejected) as ei:
        reg.enroll("dev-1", token, clock.now, mini_ca.issuer("dev-1", clock.now))
    assert ei.value.code == "token_expired"
    assert denied(reg, "enroll")[0]["detail"].startswith("token_expired")
    assert raw(db_path, "SELECT count(*) FROM certificates") == [(0,)]
    assert raw(db_path, "SELECT used_at FROM tokens") == [(None,)]


def test_token_for_other_device(reg: Registry, clock: Clock, mini_ca: MiniCA) -> None:
    reg.add_device("dev-1", "fleet-a", clock.now)
    reg.add_device("dev-2", "fleet-a", clock.now)
    token = reg.create_token("dev-1", clock.now, TTL)
    with pytest.raises(TokenRejected) as ei:
        reg.enroll("dev-2", token, clock.now, mini_ca.issuer("dev-2", clock.now))
    assert ei.value.code == "token_device_mismatch"
    assert denied(reg, "enroll")[0]["device_id"] == "dev-2"
    reg.enroll("dev-1", token, clock.now, mini_ca.issuer("dev-1", clock.now))  # not burnt by the mismatch


def test_unknown_token(reg: Registry, clock: Clock, mini_ca: MiniCA) -> None:
    reg.add_device("dev-1", "fleet-a", clock.now)
    reg.create_token("dev-1", clock.now, TTL)
    with pytest.raises(TokenRejected) as ei:
        reg.enroll("dev-1", "not-a-token", clock.now, mini_ca.issuer("dev-1", clock.now))
    assert ei.value.code == "unknown_token"
    assert denied(reg, "enroll")[0]["detail"].startswith("unknown_token")


def test_new_token_supersedes_old(reg: Registry, clock: Clock, mini_ca: MiniCA) -> None:
    reg.add_device("dev-1", "fleet-a", clock.now)
    old = reg.create_token("dev-1", clock.now, TTL)
    new = reg.create_token("dev-1", clock.now, TTL)
    with pytest.raises(TokenRejected) as ei:
        reg.enroll("dev-1", old, clock.now, mini_ca.issuer("dev-1", clock.now))
    assert ei.value.code == "token_used" and "superseded" in str(ei.value)
    reg.enroll("dev-1", new, clock.now, mini_ca.issuer("dev-1", clock.now))
    assert "token.create" in [r["action"] for r in reg.audit_log()]


def test_suspended_device_cannot_enroll(reg: Registry, db_path: Path, clock: Clock, mini_ca: MiniCA) -> None:
    reg.add_device("dev-1", "fleet-a", clock.now)
    token = reg.create_token("dev-1", clock.now, TTL)
    reg.set_status("dev-1", "suspended", clock.now, actor="ops")
    with pytest.raises(DeviceNotActive) as ei:
        reg.enroll("dev-1", token, clock.now, mini_ca.issuer("dev-1", clock.now))
    assert ei.value.code == "device_suspended"
    assert denied(reg, "enroll")[0]["detail"].startswith("device_suspended")
    assert raw(db_path, "SELECT used_at FROM tokens") == [(None,)]
    with pytest.raises(DeviceNotActive):
        reg.create_token("dev-1", clock.now, TTL)


def test_issue_failure_rolls_back(reg: Registry, db_path: Path, clock: Clock, mini_ca: MiniCA) -> None:
    reg.add_device("dev-1", "fleet-a", clock.now)
    token = reg.create_token("dev-1", clock.now, TTL)

    def broken() -> x509.Certificate:
        raise RuntimeError("signer offline")

    with pytest.raises(RuntimeError, match="signer offline"):
        reg.enroll("dev-1", token, clock.now, broken)
    assert raw(db_path, "SELECT count(*) FROM certificates") == [(0,)]
    assert raw(db_path, "SELECT used_at FROM tokens") == [(None,)]
    assert reg.audit_log(limit=1)[0]["outcome"] == "error"
    reg.enroll("dev-1", token, clock.now, mini_ca.issuer("dev-1", clock.now))  # the token is still usable
    assert raw(db_path, "SELECT count(*) FROM certificates") == [(1,)]


def test_threads_race_one_token(reg: Registry, db_path: Path, clock: Clock, mini_ca: MiniCA) -> None:
    reg.add_device("dev-1", "fleet-a", clock.now)
    token = reg.create_token("dev-1", clock.now, TTL)
    n = 8
    barrier = threading.Barrier(n)
    results: list[str] = []
    lock = threading.Lock()

    def run() -> None:
        barrier.wait()
        try:
            reg.enroll("dev-1", token, clock.now, mini_ca.issuer("dev-1", clock.now))
            outcome = "cert"
        except TokenRejected as exc:
            outcome = exc.code
        except Exception as exc:  # noqa: BLE001  (reported by the assertion below)
            outcome = repr(exc)
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == ["cert"] + ["token_used"] * (n - 1)
    assert raw(db_path, "SELECT count(*) FROM certificates") == [(1,)]
    assert len(denied(reg, "enroll")) == n - 1


def _race_child(path: str, token: str, now: str, barrier, queue) -> None:
    """Runs in a spawned process: its own Registry on the same file, one enroll attempt."""
    reg = Registry(path)
    when = datetime.fromisoformat(now)
    key = ec.generate_private_key(ec.SECP256R1())

    def issue() -> x509.Certificate:
        return (x509.CertificateBuilder().subject_name(_name("dev-1")).issuer_name(_name("dev-1"))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(when).not_valid_after(when + timedelta(days=1)).sign(key, hashes.SHA256()))

    barrier.wait()
    try:
        reg.enroll("dev-1", token, when, issue)
        queue.put("cert")
    except TokenRejected as exc:
        queue.put(exc.code)
    except Exception as exc:  # noqa: BLE001
        queue.put(repr(exc))
    finally:
        reg.close()


def test_processes_race_one_token(reg: Registry, db_path: Path, clock: Clock) -> None:
    reg.add_device("dev-1", "fleet-a", clock.now)
    token = reg.create_token("dev-1", clock.now, TTL)
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race_child, args=(str(db_path), token, clock.now.isoformat(), barrier, queue))
             for _ in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert results == ["cert", "token_used"]
    assert raw(db_path, "SELECT count(*) FROM certificates") == [(1,)]


# --- audit -------------------------------------------------------------------------------------------------------

def test_audit_append_only(reg: Registry, db_path: Path, clock: Clock) -> None:
    reg.audit("custom.thing", "ok", clock.now, actor="ops", detail="hello", source="cli")
    reg.add_device("dev-1", "fleet-a", clock.now)
    log = reg.audit_log()
    assert [r["action"] for r in log] == ["device.add", "custom.thing"]  # newest first
    assert [r["action"] for r in reg.audit_log(device_id="dev-1")] == ["device.add"]
    assert len(reg.audit_log(limit=1)) == 1
    with sqlite3.connect(db_path) as conn:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("UPDATE audit SET detail = 'forged'")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("DELETE FROM audit")
    assert raw(db_path, "SELECT count(*) FROM audit WHERE detail = 'forged'") == [(0,)]
    assert raw(db_path, "SELECT count(*) FROM audit") == [(2,)]
    with pytest.raises(sqlite3.IntegrityError):
        reg.audit("x", "maybe", clock.now)


# --- status changes ----------------------------------------------------------------------------------------------

def test_suspend_resume(reg: Registry, clock: Clock, mini_ca: MiniCA) -> None:
    enrolled(reg, mini_ca, clock)
    out = reg.set_status("dev-1", "suspended", clock.now, actor="ops", reason="maintenance")
    assert out["device"]["status"] == "suspended" and out["revoked_serials"] == []
    assert reg.revoked_certificates() == []
    out = reg.set_status("dev-1", "active", clock.now, actor="ops")
    assert out["device"]["status"] == "active"
    actions = [r["action"] for r in reg.audit_log(device_id="dev-1")]
    assert actions[:2] == ["device.active", "device.suspended"]
    with pytest.raises(ValueError):
        reg.set_status("dev-1", "deleted", clock.now, actor="ops")
    with pytest.raises(UnknownDevice):
        reg.set_status("ghost", "suspended", clock.now, actor="ops")


def test_revoke_is_terminal_and_revokes_certs(reg: Registry, clock: Clock, mini_ca: MiniCA) -> None:
    first = enrolled(reg, mini_ca, clock)
    second = reg.reenroll("dev-1", serial_hex(first.serial_number), clock.now, mini_ca.issuer("dev-1", clock.now))
    reg.add_device("dev-2", "fleet-a", clock.now)
    t2 = reg.create_token("dev-2", clock.now, TTL)
    other = reg.enroll("dev-2", t2, clock.now, mini_ca.issuer("dev-2", clock.now))
    out = reg.set_status("dev-1", "revoked", clock.advance(hours=1), actor="ops", reason="stolen")
    serials = sorted(serial_hex(c.serial_number) for c in (first, second))
    assert out["device"]["status"] == "revoked" and out["revoked_serials"] == serials
    crl = reg.revoked_certificates()
    assert sorted(r["serial"] for r in crl) == serials and serial_hex(other.serial_number) not in str(crl)
    assert {r["reason"] for r in crl} == {"stolen"}
    assert {r["revoked_at"] for r in crl} == {"2030-01-01T13:00:00.000000+00:00"}
    for status in ("active", "suspended"):
        with pytest.raises(DeviceNotActive) as ei:
            reg.set_status("dev-1", status, clock.now, actor="ops")
        assert ei.value.code == "device_revoked"
    assert reg.require_device("dev-1")["status"] == "revoked"
    assert reg.require_device("dev-1")["cert_not_after"] is None
    with pytest.raises(DeviceNotActive):
        reg.create_token("dev-1", clock.now, TTL)
    assert "stolen" in reg.audit_log(device_id="dev-1", limit=1)[0]["detail"]


def test_crl_entries_leave_once_the_certificate_expired(reg: Registry, clock: Clock, mini_ca: MiniCA) -> None:
    short = enrolled(reg, mini_ca, clock, "dev-1", days=1)
    enrolled(reg, mini_ca, clock, "dev-2", days=30)
    for device in ("dev-1", "dev-2"):
        reg.set_status(device, "revoked", clock.now, actor="ops", reason="keyCompromise")
    assert len(reg.revoked_certificates(clock.now)) == 2
    later = clock.advance(days=2)
    listed = reg.revoked_certificates(later)
    assert len(listed) == 1 and listed[0]["serial"] != serial_hex(short.serial_number)
    assert len(reg.revoked_certificates()) == 2  # the record stays; only the CRL leaves it out
    plan = " ".join(r[3] for r in raw(reg.path, "EXPLAIN QUERY PLAN SELECT serial FROM certificates "
                                               "WHERE status = 'revoked' AND not_after > ? ORDER BY revoked_at, serial",
                                      ("x",)))
    assert "certificates_revoked" in plan and "TEMP B-TREE" not in plan, plan


def test_revoke_skips_expired_certs(reg: Registry, clock: Clock, mini_ca: MiniCA) -> None:
    enrolled(reg, mini_ca, clock, days=1)
    out = reg.set_status("dev-1", "revoked", clock.advance(days=2), actor="ops")
    assert out["revoked_serials"] == [] and reg.revoked_certificates() == []


# --- reenrollment ------------------------------------------------------------------------------------------------

def test_reenroll_supersedes(reg: Registry, db_path: Path, clock: Clock, mini_ca: MiniCA) -> None:
    old = enrolled(reg, mini_ca, clock)
    old_serial = serial_hex(old.serial_number)
    assert reg.check_client_cert(old_serial.upper(), "dev-1", clock.now)["serial"] == old_serial
    new = reg.reenroll("dev-1", old_serial, clock.advance(days=20), mini_ca.issuer("dev-1", clock.now))
    status = dict(raw(db_path, "SELECT serial, status FROM certificates"))
    assert status == {old_serial: "superseded", serial_hex(new.serial_number): "active"}
    assert reg.revoked_certificates() == []  # superseded is not revoked
    assert reg.audit_log(limit=1)[0]["action"] == "reenroll"
    assert reg.require_device("dev-1")["cert_not_after"] == new.not_valid_after_utc.isoformat(timespec="microseconds")


def test_reenroll_rejections(reg: Registry, db_path: Path, clock: Clock, mini_ca: MiniCA) -> None:
    old = enrolled(reg, mini_ca, clock, "dev-1")
    reg.reenroll("dev-1", serial_hex(old.serial_number), clock.now, mini_ca.issuer("dev-1", clock.now))
    foreign = enrolled(reg, mini_ca, clock, "dev-2")
    short = enrolled(reg, mini_ca, clock, "dev-3", days=1)
    doomed = enrolled(reg, mini_ca, clock, "dev-4")
    reg.set_status("dev-4", "revoked", clock.now, actor="ops")
    cases = [("dev-1", serial_hex(old.serial_number), "cert_superseded"),
             ("dev-1", serial_hex(foreign.serial_number), "cert_device_mismatch"),
             ("dev-4", serial_hex(doomed.serial_number), "cert_revoked"),
             ("dev-1", "abc123", "unknown_cert"),
             ("dev-1", "not-hex", "unknown_cert")]
    clock.advance(days=2)
    cases.append(("dev-3", serial_hex(short.serial_number), "cert_expired"))
    before = raw(db_path, "SELECT count(*) FROM certificates")
    for device_id, serial, code in cases:
        with pytest.raises(CertRejected) as ei:
            reg.check_client_cert(serial, device_id, clock.now)
        assert ei.value.code == code
        with pytest.raises(CertRejected) as ei:
            reg.reenroll(device_id, serial, clock.now, mini_ca.issuer(device_id, clock.now))
        assert ei.value.code == code, (device_id, serial)
        assert reg.audit_log(limit=1)[0]["detail"].startswith(code)
    assert raw(db_path, "SELECT count(*) FROM certificates") == before
    assert len(denied(reg, "reenroll")) == len(cases)
    reg.set_status("dev-2", "suspended", clock.now, actor="ops")
    with pytest.raises(DeviceNotActive):
        reg.reenroll("dev-2", serial_hex(foreign.serial_number), clock.now, mini_ca.issuer("dev-2", clock.now))


# --- factory batches ---------------------------------------------------------------------------------------------

def test_batch_10k_one_transaction(reg: Registry, db_path: Path, clock: Clock, mini_ca: MiniCA) -> None:
    n = 10_000
    seen: list[int] = []
    start = time.perf_counter()
    out = reg.create_devices_with_tokens(((f"dev-{i:05d}", {"batch": "b1"}, ["g"]) for i in range(n)),
                                         "fleet-a", clock.now, TTL, actor="factory", progress=seen.append)
    elapsed = time.perf_counter() - start
    print(f"\n10k devices + tokens in one transaction: {elapsed:.2f} s")
    assert elapsed < 30  # sanity bound only
    assert len(out) == n and len({t for _, t in out}) == n
    assert seen[-1] == n and seen == sorted(seen)
    assert raw(db_path, "SELECT count(*) FROM devices") == [(n,)]
    assert raw(db_path, "SELECT count(*) FROM tokens") == [(n,)]
    assert reg.require_device("dev-04242")["labels"] == {"batch": "b1"}
    device_id, token = out[4242]
    reg.enroll(device_id, token, clock.now, mini_ca.issuer(device_id, clock.now))


def test_batch_is_atomic(reg: Registry, db_path: Path, clock: Clock) -> None:
    reg.add_device("dev-00900", "fleet-a", clock.now)
    rows = [(f"dev-{i:05d}", None, None) for i in range(1000)]
    with pytest.raises(DeviceExists):
        reg.create_devices_with_tokens(rows, "fleet-a", clock.now, TTL, chunk=100)
    with pytest.raises(DeviceExists):
        reg.create_devices_with_tokens([("a", None, None), ("b", None, None), ("a", None, None)], "fleet-a",
                                       clock.now, TTL)
    with pytest.raises(InvalidDeviceId):
        reg.create_devices_with_tokens([("ok-1", None, None), ("Bad!", None, None)], "fleet-a", clock.now, TTL)
    assert raw(db_path, "SELECT count(*) FROM devices") == [(1,)]
    assert raw(db_path, "SELECT count(*) FROM tokens") == [(0,)]


def test_errors_are_registry_errors() -> None:
    for cls in (DeviceExists, UnknownDevice, TokenRejected, DeviceNotActive, CertRejected, InvalidDeviceId):
        assert issubclass(cls, RegistryError)
    assert TokenRejected("x", "token_used").code == "token_used"
