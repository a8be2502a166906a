"""Store-and-forward spool for outgoing MQTT messages: a bounded, crash-safe queue in one SQLite file.

Every `put` is committed with ``synchronous=FULL`` in WAL mode before it returns, so a message the producer
was told is spooled survives kill -9 and power loss until it is `ack`ed (deleted) after its PUBACK.
The file is held with an exclusive lock for as long as the `Spool` is open: one owner process at a time.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

DropPolicy = Literal["oldest", "newest"]
Item = tuple[str, bytes] | tuple[str, bytes, int] | tuple[str, bytes, int, bool]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, so ids stay valid cursors
    topic   TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    qos     INTEGER NOT NULL,
    retain  INTEGER NOT NULL,
    created REAL    NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('dropped', 0);
"""


class SpoolError(Exception):
    """The spool cannot be opened or used (bad directory, file in use by another process, closed, I/O error)."""


@dataclass(frozen=True)
class Message:
    """One spooled message; `created` is the producer's clock reading at `put` time."""

    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created: float


def _check_message(topic: str, payload: bytes, qos: int, retain: bool) -> bytes:
    if not isinstance(topic, str) or not topic:
        raise ValueError("topic must be a non-empty string")
    if "+" in topic or "#" in topic or "\x00" in topic:
        raise ValueError(f"topic {topic!r} contains a wildcard or NUL: not a publish topic")
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
    if qos not in (0, 1, 2) or isinstance(qos, bool):
        raise ValueError(f"qos must be 0, 1 or 2, not {qos!r}")
    if not isinstance(retain, bool):
        raise TypeError("retain must be a bool")
    return bytes(payload)


def _prepare_file(path: Path) -> None:
    """Create the parent directory 0700 if missing, refuse one open to group/other, create the file 0600."""
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = parent.stat().st_mode
    if stat.S_IMODE(mode) & 0o077:
        raise SpoolError(f"spool directory {parent} has mode {stat.S_IMODE(mode):04o}; expected 0700 "
                         f"(run: chmod 700 {parent})")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SpoolError(f"spool path {path} is not a regular file")
        if stat.S_IMODE(st.st_mode) != 0o600:
            os.fchmod(fd, 0o600)  # the -wal file SQLite creates copies this mode
    finally:
        os.close(fd)


class Spool:
    """A bounded FIFO of messages on disk; thread-safe (one connection behind a lock).

    When `max_messages` are queued, `drop_policy="oldest"` deletes the oldest to make room and
    `"newest"` refuses the new message; either way the loss is counted in the persisted `dropped` counter.
    """

    def __init__(self, path: str | os.PathLike[str], max_messages: int = 100_000,
                 drop_policy: DropPolicy = "oldest") -> None:
        if isinstance(max_messages, bool) or not isinstance(max_messages, int) or max_messages < 1:
            raise ValueError(f"max_messages must be a positive integer, not {max_messages!r}")
        if drop_policy not in ("oldest", "newest"):
            raise ValueError(f"drop_policy must be 'oldest' or 'newest', not {drop_policy!r}")
        self.path = Path(path)
        self.max_messages = max_messages
        self.drop_policy: DropPolicy = drop_policy
        self._lock = threading.Lock()
        self._delta = 0
        try:
            _prepare_file(self.path)
        except OSError as exc:
            raise SpoolError(f"cannot create spool file {self.path}: {exc.strerror or exc}") from exc
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=0.2, check_same_thread=False)
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot open spool {self.path}: {exc}") from exc
        try:
            # Exclusive locking before WAL: no shared-memory index, and a second owner gets "database is locked".
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript("BEGIN EXCLUSIVE;" + _SCHEMA + "COMMIT;")
            self._depth: int = conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        except sqlite3.Error as exc:
            conn.close()
            if "locked" in str(exc):
                raise SpoolError(f"spool {self.path} is in use by another process") from exc
            raise SpoolError(f"cannot open spool {self.path}: {exc}") from exc
        self._conn: sqlite3.Connection | None = conn

    # -- internals ---------------------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """Lock, BEGIN IMMEDIATE, COMMIT (or ROLLBACK), then apply `self._delta` to the cached depth."""
        with self._lock:
            conn = self._conn
            if conn is None:
                raise SpoolError("spool is closed")
            self._delta = 0
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                if isinstance(exc, sqlite3.Error):
                    raise SpoolError(f"spool {self.path}: {exc}") from exc
                raise
            self._depth += self._delta

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._conn is None:
                raise SpoolError("spool is closed")
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise SpoolError(f"spool {self.path}: {exc}") from exc

    def _drop_oldest(self, conn: sqlite3.Connection, n: int) -> int:
        if n <= 0:
            return 0
        cur = conn.execute("DELETE FROM messages WHERE id IN (SELECT id FROM messages ORDER BY id LIMIT ?)", (n,))
        return cur.rowcount

    # -- API -----------------------------------------------------------------------------------------------

    def put(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, *, now: float) -> int | None:
        """Spool one message durably; its id, or None when refused by the "newest" drop policy."""
        return self.put_many([(topic, payload, qos, retain)], now=now)[0]

    def put_many(self, items: Iterable[Item], *, now: float) -> list[int | None]:
        """Spool a batch in one transaction (one fsync); ids in input order, None for each message dropped.

        Items are ``(topic, payload)``, ``(topic, payload, qos)`` or ``(topic, payload, qos, retain)``.
        With "oldest", a batch larger than the bound loses its own first messages (counted as dropped).
        """
        rows: list[tuple[str, bytes, int, int]] = []
        for item in items:
            if not 2 <= len(item) <= 4:
                raise ValueError(f"a spool item is (topic, payload[, qos[, retain]]), not {len(item)} values")
            fields: tuple[Any, ...] = tuple(item)
            topic: str = fields[0]
            payload: bytes = fields[1]
            qos: int = fields[2] if len(fields) > 2 else 1
            retain: bool = fields[3] if len(fields) > 3 else False
            rows.append((topic, _check_message(topic, payload, qos, retain), qos, int(retain)))
        ids: list[int | None] = [None] * len(rows)
        if not rows:
            return ids
        with self._tx() as conn:
            room = self.max_messages - self._depth
            if self.drop_policy == "newest":
                start, stop = 0, max(0, min(len(rows), room))
                evicted = 0
            else:
                start, stop = max(0, len(rows) - self.max_messages), len(rows)
                evicted = self._drop_oldest(conn, (stop - start) - room)
            for i in range(start, stop):
                ids[i] = conn.execute("INSERT INTO messages (topic, payload, qos, retain, created) "
                                      "VALUES (?, ?, ?, ?, ?)", (*rows[i], float(now))).lastrowid
            dropped = evicted + len(rows) - (stop - start)
            if dropped:
                conn.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped'", (dropped,))
            self._delta = (stop - start) - evicted
        return ids

    def pending(self, limit: int, after_id: int = 0) -> list[Message]:
        """Up to `limit` queued messages with id > `after_id`, in id (FIFO) order."""
        if limit < 0:
            raise ValueError("limit must be >= 0")
        with self._read() as conn:
            rows = conn.execute("SELECT id, topic, payload, qos, retain, created FROM messages "
                                "WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)).fetchall()
        return [Message(i, t, bytes(p), q, bool(r), c) for i, t, p, q, r, c in rows]

    def ack(self, id: int) -> bool:
        """Delete message `id` (its PUBACK came, or QoS 0 was sent); False if it was not queued."""
        return self.ack_many([id]) == 1

    def ack_many(self, ids: Sequence[int]) -> int:
        """Delete these messages in one transaction; how many were queued."""
        if not ids:
            return 0
        n = 0
        with self._tx() as conn:
            for chunk in range(0, len(ids), 500):
                part = list(ids[chunk:chunk + 500])
                n += conn.execute(f"DELETE FROM messages WHERE id IN ({','.join('?' * len(part))})",
                                  part).rowcount
            self._delta = -n
        return n

    def depth(self) -> int:
        """Messages queued now."""
        with self._read():
            return self._depth

    def stats(self, now: float) -> dict[str, int | float | None]:
        """``{"depth": int, "dropped": int, "oldest_age_s": float | None}`` (age of the lowest id; None if empty)."""
        with self._read() as conn:
            dropped = conn.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()[0]
            row = conn.execute("SELECT created FROM messages ORDER BY id LIMIT 1").fetchone()
            depth = self._depth
        return {"depth": depth, "dropped": dropped, "oldest_age_s": None if row is None else max(0.0, now - row[0])}

    def close(self) -> None:
        """Checkpoint and close; idempotent. Later calls raise SpoolError."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
