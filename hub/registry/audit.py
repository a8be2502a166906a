"""The audit log's integrity: every row goes in through `append`, escaped and linked into an HMAC chain.

Each row's `mac` is HMAC-SHA256(key, previous row's mac + the row's own fields, id included), so changing a row,
deleting one or inserting one in the middle breaks every later link, and `verify` names the first broken row. The
key lives next to the registry in `audit.key` (0600, made on first use): someone who can write the registry file but
not read the key cannot forge a consistent chain. Cutting rows off the END leaves a shorter valid chain: `verify`
prints the head (last id and mac) so an operator, or a monitor, can compare it with an earlier one.

Text fields (actor, action, detail, source) are stored escaped: control and format characters (terminal escape
sequences, bidi overrides, zero-width characters, NUL) become \\xNN / \\uNNNN, so no reader can be fooled by a row.
Rows written before the chain existed (schema 3) have no mac; `verify` counts them and starts after them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from .errors import RegistryError
from .sql import POSTGRESQL, dialect, executemany

KEY_NAME = "audit.key"
#: (at, actor, action, device_id, outcome, detail, source)
Row = Sequence[Any]
_FIELDS = ("at", "actor", "action", "device_id", "outcome", "detail", "source")


def escape(text: str | None) -> str | None:
    """`text` with every control / format / unassigned / surrogate character as a visible escape."""
    if text is None:
        return None
    if text.isprintable():  # the common case: nothing to do
        return text
    out = []
    for ch in text:
        if unicodedata.category(ch)[0] == "C" or ch in "\u2028\u2029":
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


def load_key(registry_path: Path) -> bytes:
    """The chain key for the registry at `registry_path` (created once, 0600; refused if others can read it)."""
    path = Path(registry_path).with_name(KEY_NAME)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise RegistryError(f"{path} is mode {mode:04o}: the audit key must be readable by the hub's user only "
                            f"(chmod 600 {path})", code="audit_key_mode")
    try:
        return bytes.fromhex(path.read_text().strip())
    except ValueError:
        raise RegistryError(f"{path} is not an audit key (64 hex characters)", code="audit_key") from None


def _mac(key: bytes, prev: str, row_id: int, fields: Sequence[Any]) -> str:
    message = prev.encode() + b"\n" + json.dumps([row_id, *fields], separators=(",", ":")).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def append(db: Database, key: bytes, rows: Iterable[Row]) -> int:
    """Insert audit rows (in the caller's write transaction) escaped and chained; returns how many."""
    head = next(db.query("SELECT id, mac FROM audit ORDER BY id DESC LIMIT 1"), None)
    seq = None if dialect(db) == POSTGRESQL else next(  # PostgreSQL: ids only ever come from here
        db.query("SELECT seq FROM sqlite_sequence WHERE name = 'audit'"), None)
    next_id = max(seq["seq"] if seq else 0, head["id"] if head else 0) + 1
    prev = (head or {}).get("mac") or ""
    batch = []
    for at, actor, action, device_id, outcome, detail, source in rows:
        fields = (at, escape(actor), escape(action), device_id, outcome, escape(detail or ""), escape(source))
        prev = _mac(key, prev, next_id, fields)
        batch.append((next_id, *fields, prev))
        next_id += 1
    executemany(db, "INSERT INTO audit (id, at, actor, action, device_id, outcome, detail, source, mac) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", batch)
    return len(batch)


@dataclass
class Verdict:
    checked: int  # chained rows whose mac was recomputed
    before_chain: int  # rows from before the chain existed (no mac, before the first chained row)
    head_id: int | None
    head_mac: str | None
    broken_at: int | None = None  # the first row that does not verify
    why: str = ""

    @property
    def ok(self) -> bool:
        return self.broken_at is None


def verify(db: Database, key: bytes, page: int = 10_000) -> Verdict:
    """Recompute the chain over every row, in id order (a keyset walk: constant memory at any size)."""
    v = Verdict(0, 0, None, None)
    prev: str | None = None  # None: the chain has not started yet
    last = 0
    meta = next(db.query("SELECT value FROM meta WHERE key = 'audit_chain_from'"), None)
    chain_from = int(meta["value"]) if meta else 1
    while True:
        rows = list(db.query(f"SELECT id, {', '.join(_FIELDS)}, mac FROM audit WHERE id > ? ORDER BY id LIMIT ?",
                             [last, page]))
        if not rows:
            return v
        for r in rows:
            last = r["id"]
            if r["mac"] is None:
                if prev is None and r["id"] < chain_from:
                    v.before_chain += 1
                    continue
                v.broken_at, v.why = r["id"], "row has no mac: written around the hub (or its mac was removed)"
                return v
            expected = _mac(key, prev or "", r["id"], [r[f] for f in _FIELDS])
            if not hmac.compare_digest(expected, r["mac"]):
                v.broken_at = r["id"]
                v.why = ("row changed, or a row before it was removed or inserted" if prev is not None or
                         v.checked else "the first chained row does not verify (changed, or the key is not this "
                                        "registry's)")
                return v
            prev = r["mac"]
            v.checked += 1
            v.head_id, v.head_mac = r["id"], r["mac"]
