"""The hub's device registry: devices, certificates, bootstrap tokens and an append-only audit log.

One SQLite file (WAL mode, foreign keys on, busy_timeout set), used through sqlite-utils; or, for several hubs
sharing one fleet, a PostgreSQL database (`postgresql+psycopg://...`, hub/registry/sql.py): the same code and
statements, each write transaction then queued on one advisory lock instead of BEGIN IMMEDIATE + the flock. Every connection is
per thread (``threading.local``): a ``Registry`` may be shared by threads, each gets its own connection; other
processes open their own ``Registry`` on the same file. Every write runs in a ``BEGIN IMMEDIATE`` transaction,
so the token check and the token use in ``enroll`` are one atomic step across threads and processes.

Time is always passed in (``now``, a timezone-aware datetime); nothing here reads the clock. Timestamps are
stored as ISO-8601 UTC text of one fixed format (so text order is time order); certificate serials as
lowercase hex text (159-bit serials do not fit an INTEGER); tokens only as their SHA-256 hex.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import itertools
import json
import os
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from sqlite_utils import Database

from hub.authz.policy import AuthzError, check_groups, check_labels
from hub.ca.policy import PolicyError, check_device_id

from . import audit as audit_chain
from . import groupcommit
from . import pgschema
from .sql import CHAIN_LOCK_KEY, POSTGRESQL, SQLITE, WRITE_LOCK_KEY, PgDb, executemany, insert, is_postgresql, pg_connect, pg_engine
from .errors import (CertRejected, DeviceExists, DeviceNotActive, InvalidDeviceId, InvalidName,  # noqa: F401
                     RegistryError, TokenRejected, UnknownDevice)
from .schema import (DEVICE_STATUSES, ENROLLABLE_STATUSES, EST_ACTOR, FINAL_STATUSES,  # noqa: F401
                     SCHEMA_VERSION, SUPERSEDE_GRACE, open_schema)

#: One factory-batch row: (device_id, labels, groups).
_Row = tuple[str, Mapping[str, str] | None, Sequence[str] | None]
_DEVICE_SELECT = """SELECT d.*, (SELECT c.not_after FROM certificates c
    WHERE c.device_id = d.id AND c.status = 'active' ORDER BY c.issued_at DESC LIMIT 1) AS cert_not_after
    FROM devices d"""


def _ts(now: datetime) -> str:
    """`now` as the one stored timestamp format (refuses naive datetimes: they would be silently local time)."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("timestamps must be timezone-aware (UTC)")
    return now.astimezone(timezone.utc).isoformat(timespec="microseconds")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def _check_id(device_id: str) -> str:
    try:
        return check_device_id(device_id)
    except PolicyError as exc:
        raise InvalidDeviceId(str(exc)) from None


def _chunks(items: Iterable[_Row], size: int) -> Iterator[list[_Row]]:
    it = iter(items)
    while part := list(itertools.islice(it, size)):
        yield part


def _device(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "labels": json.loads(row["labels"]), "groups": json.loads(row["groups"]),
            "online": bool(row["online"])}


def _json_meta(labels: Mapping[str, str] | None, groups: Sequence[str] | None) -> tuple[str, str]:
    """Labels and groups as stored JSON, validated like device ids (they end up in topic rules)."""
    if isinstance(groups, str):
        raise ValueError("groups must be a list of names, not a string")
    try:
        return (json.dumps(check_labels(dict(labels or {})), sort_keys=True),
                json.dumps(check_groups(groups or [])))
    except AuthzError as exc:
        raise InvalidName(str(exc)) from None


class Registry:
    """The device registry in one SQLite file. Thread-safe (a connection per thread); see the module docstring."""

    def __init__(self, path: Path | str, busy_timeout_ms: int = 10_000, home: Path | str | None = None) -> None:
        """`path`: the SQLite file, or a PostgreSQL URL (then `home`, the hub directory, holds the audit key that
        every hub on that database must share; the SQLite registry keeps it next to the file)."""
        self.url = str(path) if is_postgresql(path) else None
        #: "sqlite" or "postgresql" (hub/registry/sql.py): modules with dialect-specific SQL branch on it
        self.dialect = POSTGRESQL if self.url is not None else SQLITE
        self._engine = None
        if self.url is not None:
            if home is None:
                raise ValueError("a PostgreSQL registry needs `home` (the directory of its audit key)")
            self.path = Path(home) / "registry.sqlite3"  # where audit.py looks for audit.key: the same directory
            self._engine = pg_engine(self.url)
        else:
            self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        # Writers queue here instead of in SQLite's busy handler, which sleeps in 1-100 ms steps (the cause of
        # long latency tails under concurrent enrollments, and with several EST worker processes of a throughput
        # below one process's): threads of this process on this lock, then processes on an flock of
        # `<registry>.writelock`, which wakes the next writer as soon as the last one committed. A writer that
        # does not take the flock (the sqlite3 shell) still meets BEGIN IMMEDIATE + busy_timeout.
        self._write_lock = threading.RLock()
        self._flock_fd: int | None = None
        self._write_depth = 0
        self._closed = False
        self._audit_key: bytes | None = None
        if self.url is not None:
            pgschema.open_schema(self._db(), self.url)
        else:
            open_schema(self._db(), self.path)

    @staticmethod
    def authz_event(db: Database, principal: str | None, reason: str, now: datetime) -> None:
        """Tell the brokers (in the caller's transaction) that `principal`'s live sessions must be re-checked."""
        db.execute("INSERT INTO authz_events (at, principal, reason) VALUES (?, ?, ?)", [_ts(now), principal, reason])

    def authz_seq(self) -> int:
        """The newest authz event number (0 when there is none)."""
        row = self._one(self._db(), "SELECT COALESCE(MAX(seq), 0) AS seq FROM authz_events")
        return int(row["seq"]) if row else 0

    def prune_authz_events(self, before: datetime) -> int:
        with self._write() as db:
            return db.execute("DELETE FROM authz_events WHERE at < ? AND seq < (SELECT MAX(seq) FROM authz_events)",
                              [_ts(before)]).rowcount

    # --- connections and transactions ----------------------------------------------------------------------------

    def _db(self) -> Database:
        """This thread's connection (sqlite3 objects and sqlite-utils Databases are not shared between threads)."""
        if self._closed:
            raise RegistryError("registry is closed", code="closed")
        db: Database | None = getattr(self._local, "db", None)
        if db is None and self._engine is not None:
            db = self._local.db = PgDb(pg_connect(self._engine, self.url))
        elif db is None:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000, isolation_level=None)
            db = Database(conn, execute_plugins=False)
            db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            db.execute("PRAGMA foreign_keys = ON")
            self._local.db = db
        return db

    def write(self) -> contextlib.AbstractContextManager[Database]:
        """One BEGIN IMMEDIATE write transaction (for modules that keep their own tables in this registry)."""
        return self._write()

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return list(self._db().query(sql, list(params)))

    @contextlib.contextmanager
    def _write(self, db: Database | None = None, late_lock: bool = False) -> Iterator[Database]:
        """One write transaction, BEGIN IMMEDIATE (takes the write lock up front: no read-then-upgrade races).

        On PostgreSQL the write lock is the advisory lock WRITE_LOCK_KEY, taken exclusively right after BEGIN (before
        any row lock). `late_lock` transactions (enroll, reenroll: every row change guarded by its own WHERE and
        checked for one row, no row changed after the first audit row) take it shared instead, so hubs run them
        at once, and CHAIN_LOCK_KEY only when they first append to the audit log. No deadlock: an exclusive
        writer waits holding nothing; a shared one waits for the chain holding rows, but the chain's holder changes
        no rows any more, and nobody holds the chain while an exclusive writer runs."""
        db = db or self._db()
        if isinstance(db, PgDb):  # each thread has its own connection: the server's locks are the only ones
            db.execute("BEGIN")
            db.chain_locked = False
            try:
                if late_lock:
                    db.execute("SELECT pg_advisory_xact_lock_shared(?)", [WRITE_LOCK_KEY])
                else:
                    db.execute("SELECT pg_advisory_xact_lock(?)", [WRITE_LOCK_KEY])
                    db.chain_locked = True  # no shared writer runs, so nobody holds the chain
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return
        with self._write_lock, self._process_lock():
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.rollback()
                raise

    @contextlib.contextmanager
    def _process_lock(self) -> Iterator[None]:
        """The flock that queues writers of all processes (the caller holds _write_lock; re-entrant)."""
        if self._write_depth == 0:
            if self._flock_fd is None:
                try:
                    self._flock_fd = os.open(f"{self.path}.writelock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                except OSError:  # a read-only directory: the busy timeout alone then
                    self._flock_fd = -1
            if self._flock_fd >= 0:
                fcntl.flock(self._flock_fd, fcntl.LOCK_EX)
        self._write_depth += 1
        try:
            yield
        finally:
            self._write_depth -= 1
            if self._write_depth == 0 and self._flock_fd is not None and self._flock_fd >= 0:
                fcntl.flock(self._flock_fd, fcntl.LOCK_UN)

    @staticmethod
    def _one(db: Database, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        return next(db.query(sql, list(params)), None)

    def close(self) -> None:
        """Close this thread's connection; the registry refuses further use. Other threads' connections close when
        their thread ends (sqlite3 forbids closing them from here)."""
        db = getattr(self._local, "db", None)
        self._closed = True
        if db is not None:
            db.close()
            self._local.db = None
        if self._engine is not None:
            self._engine.dispose()
        with self._write_lock:
            if self._flock_fd is not None and self._flock_fd >= 0 and self._write_depth == 0:
                os.close(self._flock_fd)
                self._flock_fd = None

    # --- audit ----------------------------------------------------------------------------------------------------

    def _audit_row(self, db: Database, action: str, outcome: str, now: datetime, actor: str, device_id: str | None,
                   detail: str = "", source: str | None = None) -> None:
        self.append_audit(db, [(_ts(now), actor, action, device_id, outcome, detail, source)])

    def append_audit(self, db: Database, rows: Iterable[audit_chain.Row]) -> int:
        """Audit rows (at, actor, action, device_id, outcome, detail, source) in the caller's write transaction:
        escaped and chained (hub/registry/audit.py). The only way rows enter the audit log."""
        if isinstance(db, PgDb) and not db.chain_locked:  # the chain's head is read and extended under its lock
            db.execute("SELECT pg_advisory_xact_lock(?)", [CHAIN_LOCK_KEY])
            db.chain_locked = True
        if self._audit_key is None:
            self._audit_key = audit_chain.load_key(self.path)
        return audit_chain.append(db, self._audit_key, rows)

    def verify_audit(self) -> audit_chain.Verdict:
        """Recompute the audit log's chain (see hub/registry/audit.py)."""
        if self._audit_key is None:
            self._audit_key = audit_chain.load_key(self.path)
        return audit_chain.verify(self._db(), self._audit_key)

    def audit(self, action: str, outcome: str, now: datetime, actor: str = "hub", device_id: str | None = None,
              detail: str = "", source: str | None = None) -> None:
        """Append one audit row in its own committed transaction."""
        with self._write() as db:
            self._audit_row(db, action, outcome, now, actor, device_id, detail, source)

    def audit_log(self, limit: int = 100, device_id: str | None = None) -> list[dict[str, Any]]:
        """Audit rows, newest first."""
        where, params = ("WHERE device_id = ?", [device_id]) if device_id is not None else ("", [])
        return list(self._db().query(f"SELECT * FROM audit {where} ORDER BY id DESC LIMIT ?", [*params, limit]))

    # --- devices --------------------------------------------------------------------------------------------------

    def add_device(self, device_id: str, fleet: str, now: datetime, labels: Mapping[str, str] | None = None,
                   groups: Sequence[str] | None = None, actor: str = "cli") -> dict[str, Any]:
        """Register a device, 'pending' until it enrolls (no certificate yet). Raises InvalidDeviceId, DeviceExists."""
        _check_id(device_id)
        labels_json, groups_json = _json_meta(labels, groups)
        with self._write() as db:
            if self._one(db, "SELECT 1 FROM devices WHERE id = ?", [device_id]):
                raise DeviceExists(f"device {device_id!r} already exists")
            insert(db, "devices", {"id": device_id, "fleet": fleet, "status": "pending", "labels": labels_json,
                                   "groups": groups_json, "created": _ts(now), "last_seen": None, "online": 0})
            self._audit_row(db, "device.add", "ok", now, actor, device_id, f"fleet={fleet}")
        return self.require_device(device_id)

    def get_device(self, device_id: str) -> dict[str, Any] | None:
        """The device row (labels dict, groups list, online bool, cert_not_after of its active cert), or None."""
        row = self._one(self._db(), f"{_DEVICE_SELECT} WHERE d.id = ?", [device_id])
        return _device(row) if row else None

    def require_device(self, device_id: str) -> dict[str, Any]:
        device = self.get_device(device_id)
        if device is None:
            raise UnknownDevice(f"no device {device_id!r}")
        return device

    def list_devices(self) -> list[dict[str, Any]]:
        """All devices by id, each with `cert_not_after` of its newest active certificate (one query)."""
        return [_device(row) for row in self._db().query(f"{_DEVICE_SELECT} ORDER BY d.id")]

    def set_status(self, device_id: str, status: str, now: datetime, actor: str,
                   reason: str = "") -> dict[str, Any]:
        """Suspend / resume ('active') / revoke / decommission. Revoked and decommissioned are final
        (DeviceNotActive 'device_revoked' / 'device_decommissioned' on any change after; a revoked device can still
        be decommissioned). Revoking also revokes the device's unexpired active and superseded certificates.
        Resuming a device that never enrolled (no certificate) brings it back to 'pending', not 'active'; a pending
        device can be suspended and revoked like an active one. 'decommissioned' is `decommission()`.
        Returns {'device': device dict, 'revoked_serials': [hex, ...]}; setting the current status is a no-op."""
        if status == "decommissioned":
            return self.decommission(device_id, now, actor, reason)
        if status not in ("active", "suspended", "revoked"):
            raise ValueError(f"status must be one of active, suspended, revoked, decommissioned, not {status!r}")
        at = _ts(now)
        revoked: list[str] = []
        with self._write() as db:
            old = self._status(db, device_id)
            new = status
            if status == "active" and not self._one(db, "SELECT 1 FROM certificates WHERE device_id = ? LIMIT 1",
                                                   [device_id]):
                new = "pending"  # never enrolled: the truth is 'pending'
            if old != new:
                if old in FINAL_STATUSES:
                    what = "revocation" if old == "revoked" else "decommissioning"
                    raise DeviceNotActive(f"device {device_id!r} is {old}; {what} is final", f"device_{old}")
                db.execute("UPDATE devices SET status = ? WHERE id = ?", [new, device_id])
                if status == "revoked":
                    revoked = [r["serial"] for r in db.query(
                        "UPDATE certificates SET status = 'revoked', revoked_at = ?, revocation_reason = ? "
                        "WHERE device_id = ? AND status IN ('active', 'superseded') AND not_after > ? "
                        "RETURNING serial", [at, reason or "device revoked", device_id, at])]
                detail = f"{old} -> {new}" + (f"; reason: {reason}" if reason else "")
                if revoked:
                    detail += f"; revoked certificates: {', '.join(sorted(revoked))}"
                self._audit_row(db, f"device.{status}", "ok", now, actor, device_id, detail)
                self.authz_event(db, device_id, f"device {new}", now)
        return {"device": self.require_device(device_id), "revoked_serials": sorted(revoked)}

    def decommission(self, device_id: str, now: datetime, actor: str, reason: str = "") -> dict[str, Any]:
        """Retire a device for good, in ONE transaction: status 'decommissioned', its unexpired active and
        superseded certificates revoked (reason cessationOfOperation), its unused tokens invalidated
        (used_from='decommissioned'), offline, an audit row and an authz event. The row, its certificates and its
        audit trail are kept (the id stays taken). Final: DeviceNotActive 'device_decommissioned' on any change
        after; decommissioning a decommissioned device is a no-op. Same return value as set_status()."""
        at = _ts(now)
        revoked: list[str] = []
        with self._write() as db:
            old = self._status(db, device_id)
            if old != "decommissioned":
                db.execute("UPDATE devices SET status = 'decommissioned', online = 0 WHERE id = ?", [device_id])
                revoked = [r["serial"] for r in db.query(
                    "UPDATE certificates SET status = 'revoked', revoked_at = ?, "
                    "revocation_reason = 'cessationOfOperation' "
                    "WHERE device_id = ? AND status IN ('active', 'superseded') AND not_after > ? "
                    "RETURNING serial", [at, device_id, at])]
                tokens = db.execute("UPDATE tokens SET used_at = ?, used_from = 'decommissioned' "
                                    "WHERE device_id = ? AND used_at IS NULL", [at, device_id]).rowcount
                detail = f"{old} -> decommissioned" + (f"; reason: {reason}" if reason else "")
                if revoked:
                    detail += f"; revoked certificates: {', '.join(sorted(revoked))}"
                if tokens:
                    detail += f"; {tokens} unused token(s) invalidated"
                self._audit_row(db, "device.decommissioned", "ok", now, actor, device_id, detail)
                self.authz_event(db, device_id, "device decommissioned", now)
        return {"device": self.require_device(device_id), "revoked_serials": sorted(revoked)}

    def mark_presence(self, device_id: str, online: bool, now: datetime) -> bool:
        """Record presence; an 'offline' for a device already offline writes nothing (a clean stop is announced
        twice: by the agent and by the broker). Returns whether anything was written."""
        cur = self._db().execute("UPDATE devices SET online = ?, last_seen = ? WHERE id = ? AND (online != ? OR ? = 1)",
                                 [int(online), _ts(now), device_id, int(online), int(online)])
        if cur.rowcount == 0 and self._one(self._db(), "SELECT 1 FROM devices WHERE id = ?", [device_id]) is None:
            raise UnknownDevice(f"no device {device_id!r}")
        return cur.rowcount > 0

    # --- tokens ---------------------------------------------------------------------------------------------------

    def create_token(self, device_id: str, now: datetime, ttl: timedelta, actor: str = "cli") -> str:
        """A new single-use enrollment token (returned once, stored only as its SHA-256). Invalidates the device's
        unused older tokens (used_from='superseded'). Only for a pending or active device.
        Raises UnknownDevice, DeviceNotActive."""
        if ttl <= timedelta(0):
            raise ValueError("token ttl must be positive")
        with self._write() as db:
            self._require_status(db, device_id, ENROLLABLE_STATUSES)
            db.execute("UPDATE tokens SET used_at = ?, used_from = 'superseded' "
                       "WHERE device_id = ? AND used_at IS NULL", [_ts(now), device_id])
            token = secrets.token_urlsafe(24)
            insert(db, "tokens", {"device_id": device_id, "token_hash": token_hash(token), "created": _ts(now),
                                  "expires": _ts(now + ttl)})
            self._audit_row(db, "token.create", "ok", now, actor, device_id, f"expires {_ts(now + ttl)}")
        return token

    def create_devices_with_tokens(self, rows: Iterable[_Row], fleet: str, now: datetime, ttl: timedelta,
                                   actor: str = "cli", progress: Callable[[int], None] | None = None,
                                   chunk: int = 500) -> list[tuple[str, str]]:
        """Factory batch: add every (device_id, labels, groups) and a token for each, all in ONE transaction.

        Returns [(device_id, token), ...] only after the commit (no token is ever shown for a batch that rolled
        back). `progress(done)` is called after every `chunk` devices. An invalid id, an existing one or a duplicate
        in the batch raises InvalidDeviceId / DeviceExists, and nothing at all is written."""
        if ttl <= timedelta(0):
            raise ValueError("token ttl must be positive")
        created, expires = _ts(now), _ts(now + ttl)
        out: list[tuple[str, str]] = []
        seen: set[str] = set()
        with self._write() as db:
            for part in _chunks(rows, chunk):
                ids = [_check_id(device_id) for device_id, _, _ in part]
                if len(seen.union(ids)) != len(seen) + len(ids):
                    dup = next(i for n, i in enumerate(ids) if i in seen or i in ids[:n])
                    raise DeviceExists(f"device {dup!r} appears twice in the batch")
                seen.update(ids)
                taken = self._one(db, f"SELECT id FROM devices WHERE id IN ({','.join('?' * len(ids))}) LIMIT 1", ids)
                if taken:
                    raise DeviceExists(f"device {taken['id']!r} already exists")
                devices, tokens, audits = [], [], []
                for device_id, labels, groups in part:
                    token = secrets.token_urlsafe(24)
                    out.append((device_id, token))
                    devices.append((device_id, fleet, *_json_meta(labels, groups), created))
                    tokens.append((device_id, token_hash(token), created, expires))
                    audits += [(created, actor, "device.add", device_id, "ok", f"fleet={fleet}; batch", None),
                               (created, actor, "token.create", device_id, "ok", f"expires {expires}; batch", None)]
                executemany(db, "INSERT INTO devices (id, fleet, status, labels, groups, created, online) "
                                "VALUES (?, ?, 'pending', ?, ?, ?, 0)", devices)
                executemany(db, "INSERT INTO tokens (device_id, token_hash, created, expires) VALUES (?, ?, ?, ?)",
                            tokens)
                self.append_audit(db, audits)
                if progress:
                    progress(len(out))
        return out

    # --- enrollment -----------------------------------------------------------------------------------------------

    def _status(self, db: Database, device_id: str) -> str:
        """The device's status; UnknownDevice if there is no such device."""
        row = self._one(db, "SELECT status FROM devices WHERE id = ?", [device_id])
        if row is None:
            raise UnknownDevice(f"no device {device_id!r}")
        return row["status"]

    def _require_status(self, db: Database, device_id: str, allowed: Sequence[str] = ("active",)) -> str:
        """The device's status if it is one of `allowed`; else DeviceNotActive 'device_<status>' (UnknownDevice)."""
        status = self._status(db, device_id)
        if status not in allowed:
            raise DeviceNotActive(f"device {device_id!r} is {status}", f"device_{status}")
        return status

    def _insert_cert(self, db: Database, device_id: str, cert: x509.Certificate, now: datetime) -> str:
        serial = serial_hex(cert.serial_number)
        insert(db, "certificates", {
            "serial": serial, "device_id": device_id, "subject": cert.subject.rfc4514_string(),
            "not_before": _ts(cert.not_valid_before_utc), "not_after": _ts(cert.not_valid_after_utc),
            "fingerprint_sha256": cert.fingerprint(hashes.SHA256()).hex(), "status": "active",
            "revoked_at": None, "revocation_reason": None, "issued_at": _ts(now),
            "pem": cert.public_bytes(serialization.Encoding.PEM).decode()})
        return serial

    def _issuing(self, action: str, device_id: str, now: datetime, source: str | None,
                 check: Callable[[Database], Any], issue: Callable[[], x509.Certificate],
                 body: Callable[[Database, x509.Certificate], x509.Certificate],
                 audit_denied: bool = True) -> x509.Certificate:
        """Issue a certificate: `check` on a plain read (refusals never cost a signature), then `issue()` outside
        any lock, then `body(db, cert)` in one BEGIN IMMEDIATE transaction, which checks everything again and
        records the certificate (a request that lost a race to the same token is refused there, and its
        certificate, never recorded nor returned, is dropped); concurrent bodies share that transaction and its
        fsync, each in its own savepoint (hub/registry/groupcommit.py). Signing outside the write lock keeps the one
        writer's turn short: with the signature inside it, every EST worker process queued behind it.
        A RegistryError (rolled back) is audited 'denied' in its own committed transaction unless `audit_denied`
        is False (the EST service aggregates its denials: hub/est/denials.py); any other exception (issue()
        failing) is audited 'error'."""
        try:
            check(self._db())
            cert = issue()
            return groupcommit.run(self, body, cert)  # one transaction and fsync with concurrent issuings
        except RegistryError as exc:
            if audit_denied and exc.code != "closed":
                self.audit(action, "denied", now, EST_ACTOR, device_id, f"{exc.code}: {exc}", source)
            raise
        except Exception as exc:
            self.audit(action, "error", now, EST_ACTOR, device_id, f"{type(exc).__name__}: {exc}", source)
            raise

    def enroll(self, device_id: str, token: str, now: datetime, issue: Callable[[], x509.Certificate],
               source: str | None = None, audit_denied: bool = True) -> x509.Certificate:
        """Use a bootstrap token and record the certificate `issue()` builds, atomically.

        The CSR is checked by the caller before this; so if issue() raises, that is an internal error: nothing is
        written but an 'error' audit row, the token stays unused and the exception propagates. issue() runs
        after a read-only check of the token and before the transaction that checks it again and spends it
        (`_issuing`). Raises TokenRejected, UnknownDevice, DeviceNotActive (each also audited 'denied')."""
        now_s = _ts(now)
        presented = token_hash(token)

        def check(db: Database) -> dict[str, Any]:
            row = self._one(db, "SELECT * FROM tokens WHERE token_hash = ?", [presented])
            if row is None or not hmac.compare_digest(row["token_hash"], presented):
                raise TokenRejected("unknown enrollment token", "unknown_token")
            if row["device_id"] != device_id:
                raise TokenRejected(f"token is not for device {device_id!r}", "token_device_mismatch")
            if row["used_at"] is not None:
                how = "superseded by a newer token" if row["used_from"] == "superseded" else "already used"
                raise TokenRejected(f"token {how} ({row['used_at']})", "token_used")
            if row["expires"] <= now_s:
                raise TokenRejected(f"token expired at {row['expires']}", "token_expired")
            self._require_status(db, device_id, ENROLLABLE_STATUSES)
            return row

        def body(db: Database, cert: x509.Certificate) -> x509.Certificate:
            row = check(db)
            # exactly once: the row is spent only if still unused, whoever else (thread, process, hub) races for it
            if db.execute("UPDATE tokens SET used_at = ?, used_from = ? WHERE id = ? AND used_at IS NULL",
                          [now_s, source, row["id"]]).rowcount != 1:
                raise TokenRejected("token already used", "token_used")
            # the first enrollment makes a pending device active (no authz event: a pending device has no
            # certificate, so no live session to re-check)
            db.execute("UPDATE devices SET status = 'active' WHERE id = ? AND status = 'pending'", [device_id])
            # a token re-enrollment replaces the old credential at once (no grace: it may be why we re-enroll)
            if db.execute("UPDATE certificates SET status = 'superseded', grace_until = ? "
                          "WHERE device_id = ? AND status = 'active'", [now_s, device_id]).rowcount:
                self.authz_event(db, device_id, "re-enrolled", now)
            serial = self._insert_cert(db, device_id, cert, now)
            self._audit_row(db, "enroll", "ok", now, EST_ACTOR, device_id, f"serial {serial}", source)
            return cert

        return self._issuing("enroll", device_id, now, source, check, issue, body, audit_denied)

    def _check_cert(self, db: Database, serial: str, device_id: str, now: datetime) -> dict[str, Any]:
        try:
            serial = serial_hex(int(serial, 16))
        except (TypeError, ValueError):
            raise CertRejected(f"not a certificate serial: {serial!r}", "unknown_cert") from None
        row = self._one(db, "SELECT * FROM certificates WHERE serial = ?", [serial])
        if row is None:
            raise CertRejected(f"unknown certificate {serial}", "unknown_cert")
        if row["device_id"] != device_id:
            raise CertRejected(f"certificate {serial} is not device {device_id!r}'s", "cert_device_mismatch")
        if row["status"] == "revoked":
            raise CertRejected(f"certificate {serial} was revoked at {row['revoked_at']}", "cert_revoked")
        if row["status"] == "superseded":
            raise CertRejected(f"certificate {serial} was superseded by a newer one", "cert_superseded")
        now_s = _ts(now)
        if row["not_after"] <= now_s or row["not_before"] > now_s:
            raise CertRejected(f"certificate {serial} is outside its validity "
                               f"({row['not_before']} .. {row['not_after']})", "cert_expired")
        self._require_status(db, device_id)
        return row

    def check_client_cert(self, serial_hex: str, device_id: str, now: datetime) -> dict[str, Any]:
        """The certificate row if `serial_hex` is device_id's active, valid certificate and the device is active.
        Read-only (nothing audited). Raises CertRejected (cert checks come first), UnknownDevice, DeviceNotActive."""
        return self._check_cert(self._db(), serial_hex, device_id, now)

    def reenroll(self, device_id: str, presented_serial_hex: str, now: datetime,
                 issue: Callable[[], x509.Certificate], source: str | None = None,
                 grace: timedelta = SUPERSEDE_GRACE, audit_denied: bool = True) -> x509.Certificate:
        """Renew: record the new certificate as active; the presented one becomes 'superseded', NOT revoked: the
        broker still admits it for `grace` (so the device can switch over) or until the device has connected with
        the new one, whichever comes first; it can never reenroll again.
        issue() runs and failing is handled as in enroll(). Raises CertRejected, UnknownDevice, DeviceNotActive
        (audited)."""

        def check(db: Database) -> dict[str, Any]:
            return self._check_cert(db, presented_serial_hex, device_id, now)

        def body(db: Database, cert: x509.Certificate) -> x509.Certificate:
            old = check(db)
            if db.execute("UPDATE certificates SET status = 'superseded', grace_until = ? "
                          "WHERE serial = ? AND status = 'active'",
                          [_ts(now + max(grace, timedelta(0))), old["serial"]]).rowcount != 1:
                raise CertRejected(f"certificate {old['serial']} was superseded by a newer one", "cert_superseded")
            serial = self._insert_cert(db, device_id, cert, now)
            self.authz_event(db, device_id, "renewed", now)
            self._audit_row(db, "reenroll", "ok", now, EST_ACTOR, device_id,
                            f"serial {serial} supersedes {old['serial']}", source)
            return cert

        return self._issuing("reenroll", device_id, now, source, check, issue, body, audit_denied)

    def revoked_certificates(self, now: datetime | None = None) -> list[dict[str, Any]]:
        """Revoked certificates, for the CRL: [{'serial': hex, 'revoked_at': iso, 'reason': str}], in revocation
        order (index `certificates_revoked`). With `now`, those already expired are left out: RFC 5280 lets a CRL
        drop an entry once the certificate has expired, and nothing accepts it any more anyway."""
        where, params = ("AND not_after > ?", [_ts(now)]) if now is not None else ("", [])
        return list(self._db().query("SELECT serial, revoked_at, revocation_reason AS reason FROM certificates "
                                     f"WHERE status = 'revoked' {where} ORDER BY revoked_at, serial", params))

    def certificates_of(self, device_id: str) -> list[dict[str, Any]]:
        """A device's certificates, newest first (without the PEM)."""
        return list(self._db().query(
            "SELECT serial, subject, not_before, not_after, fingerprint_sha256, status, revoked_at, "
            "revocation_reason, issued_at FROM certificates WHERE device_id = ? ORDER BY issued_at DESC",
            [device_id]))

    def held_certificates(self, now: datetime) -> list[dict[str, Any]]:
        """Unexpired active/superseded certificates of suspended devices, for the CRL as certificateHold.

        `held_at` is when the device was last suspended (from the audit log), so CRL entries stay stable.
        """
        return list(self._db().query(
            "SELECT c.serial, COALESCE((SELECT MAX(a.at) FROM audit a WHERE a.device_id = d.id "
            "AND a.action = 'device.suspended'), c.issued_at) AS held_at "
            "FROM certificates c JOIN devices d ON d.id = c.device_id "
            "WHERE d.status = 'suspended' AND c.status IN ('active', 'superseded') AND c.not_after > ? "
            "ORDER BY c.serial", [_ts(now)]))
