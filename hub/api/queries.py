"""The fleet API's registry queries: device filters as indexed SQL, keyset paging, bulk status changes.

Every filter maps onto an index (added by `API_SCHEMA`, applied when the API starts; idempotent):
status -> devices(status, id), online -> devices(online, id), last_seen_before -> devices(last_seen),
id_prefix -> the primary key range, cert_expires_before -> certificates(not_after) over active certificates,
group / label -> the side tables `device_groups` / `device_labels`, kept equal to the devices' JSON columns by
triggers (so whoever writes `devices`, the CLI or another hub process, keeps them right; on PostgreSQL `PG_SCHEMA`:
the same tables and indexes, the triggers one plpgsql function). Paging is keyset, never
OFFSET: on the device id (`id > last ORDER BY id LIMIT n`), or for another sort order (`SORTS`) on (sort key, id)
over its own index, e.g. `(COALESCE(last_seen, ''), id) < (?, ?) ORDER BY 1 DESC, 2 DESC` for `-last_seen`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator, Mapping

from hub.authz.policy import _LABEL_VALUE_RE as LABEL_VALUE_RE  # the one label value rule (check_labels)
from hub.authz.policy import AuthzError, check_name
from hub.registry import sql as dbsql
from hub.registry.store import DEVICE_STATUSES, Registry, _ts

API_SCHEMA = (
    """CREATE INDEX IF NOT EXISTS devices_status_id ON devices(status, id)""",
    """CREATE INDEX IF NOT EXISTS devices_online_id ON devices(online, id)""",
    """CREATE INDEX IF NOT EXISTS devices_last_seen ON devices(last_seen)""",
    """CREATE INDEX IF NOT EXISTS devices_last_seen_sort ON devices(COALESCE(last_seen, ''), id)""",
    """CREATE INDEX IF NOT EXISTS devices_created_sort ON devices(created, id)""",
    # status is the filter nearly every listing has: sorted pages under it walk these, not a sort of every match
    """CREATE INDEX IF NOT EXISTS devices_status_last_seen ON devices(status, COALESCE(last_seen, ''), id)""",
    """CREATE INDEX IF NOT EXISTS devices_status_created ON devices(status, created, id)""",
    """CREATE INDEX IF NOT EXISTS certificates_active_expiry ON certificates(not_after, device_id)
        WHERE status = 'active'""",
    """CREATE TABLE IF NOT EXISTS device_groups (grp TEXT NOT NULL, device_id TEXT NOT NULL,
        PRIMARY KEY (grp, device_id)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS device_labels (key TEXT NOT NULL, value TEXT NOT NULL, device_id TEXT NOT NULL,
        PRIMARY KEY (key, value, device_id)) WITHOUT ROWID""",
    """CREATE TRIGGER IF NOT EXISTS devices_meta_insert AFTER INSERT ON devices BEGIN
        INSERT OR IGNORE INTO device_groups SELECT value, NEW.id FROM json_each(NEW.groups);
        INSERT OR IGNORE INTO device_labels SELECT key, value, NEW.id FROM json_each(NEW.labels); END""",
    """CREATE TRIGGER IF NOT EXISTS devices_meta_update AFTER UPDATE OF groups, labels ON devices BEGIN
        DELETE FROM device_groups WHERE device_id = OLD.id AND grp IN (SELECT value FROM json_each(OLD.groups));
        DELETE FROM device_labels WHERE device_id = OLD.id AND key IN (SELECT key FROM json_each(OLD.labels));
        INSERT OR IGNORE INTO device_groups SELECT value, NEW.id FROM json_each(NEW.groups);
        INSERT OR IGNORE INTO device_labels SELECT key, value, NEW.id FROM json_each(NEW.labels); END""",
    """CREATE TRIGGER IF NOT EXISTS devices_meta_delete AFTER DELETE ON devices BEGIN
        DELETE FROM device_groups WHERE device_id = OLD.id AND grp IN (SELECT value FROM json_each(OLD.groups));
        DELETE FROM device_labels WHERE device_id = OLD.id AND key IN (SELECT key FROM json_each(OLD.labels));
        END""",
)
_BACKFILL = (
    "INSERT OR IGNORE INTO device_groups SELECT j.value, d.id FROM devices d, json_each(d.groups) j",
    "INSERT OR IGNORE INTO device_labels SELECT j.key, j.value, d.id FROM devices d, json_each(d.labels) j",
)
#: The same on PostgreSQL: the same indexes (expressions in parentheses), the side tables kept by one plpgsql
#: trigger function behind three triggers of the SQLite names (no `?` or `%` in these texts: hub.registry.sql.pg_sql
#: would read them as placeholders).
PG_SCHEMA = (
    *API_SCHEMA[:3],
    """CREATE INDEX IF NOT EXISTS devices_last_seen_sort ON devices((COALESCE(last_seen, '')), id)""",
    API_SCHEMA[4],
    """CREATE INDEX IF NOT EXISTS devices_status_last_seen ON devices(status, (COALESCE(last_seen, '')), id)""",
    *API_SCHEMA[6:8],
    """CREATE TABLE IF NOT EXISTS device_groups (grp TEXT NOT NULL, device_id TEXT NOT NULL,
        PRIMARY KEY (grp, device_id))""",
    """CREATE TABLE IF NOT EXISTS device_labels (key TEXT NOT NULL, value TEXT NOT NULL, device_id TEXT NOT NULL,
        PRIMARY KEY (key, value, device_id))""",
    f"""CREATE OR REPLACE FUNCTION api_devices_meta() RETURNS trigger LANGUAGE plpgsql AS $fn$
    BEGIN
        IF TG_OP IN ('UPDATE', 'DELETE') THEN
            DELETE FROM device_groups WHERE device_id = OLD.id
                AND grp IN (SELECT j.value FROM {dbsql.json_values(dbsql.POSTGRESQL, 'OLD.groups')});
            DELETE FROM device_labels WHERE device_id = OLD.id
                AND key IN (SELECT j.key FROM {dbsql.json_items(dbsql.POSTGRESQL, 'OLD.labels')});
        END IF;
        IF TG_OP IN ('INSERT', 'UPDATE') THEN
            INSERT INTO device_groups SELECT j.value, NEW.id FROM {dbsql.json_values(dbsql.POSTGRESQL, 'NEW.groups')}
                ON CONFLICT DO NOTHING;
            INSERT INTO device_labels SELECT j.key, j.value, NEW.id
                FROM {dbsql.json_items(dbsql.POSTGRESQL, 'NEW.labels')} ON CONFLICT DO NOTHING;
        END IF;
        RETURN NULL;
    END $fn$""",
    """CREATE OR REPLACE TRIGGER devices_meta_insert AFTER INSERT ON devices
        FOR EACH ROW EXECUTE FUNCTION api_devices_meta()""",
    """CREATE OR REPLACE TRIGGER devices_meta_update AFTER UPDATE OF groups, labels ON devices
        FOR EACH ROW EXECUTE FUNCTION api_devices_meta()""",
    """CREATE OR REPLACE TRIGGER devices_meta_delete AFTER DELETE ON devices
        FOR EACH ROW EXECUTE FUNCTION api_devices_meta()""",
)
_PG_BACKFILL = (
    f"INSERT INTO device_groups SELECT j.value, d.id FROM devices d, {dbsql.json_values(dbsql.POSTGRESQL, 'd.groups')} "
    "ON CONFLICT DO NOTHING",
    f"INSERT INTO device_labels SELECT j.key, j.value, d.id FROM devices d, "
    f"{dbsql.json_items(dbsql.POSTGRESQL, 'd.labels')} ON CONFLICT DO NOTHING",
)
MAX_LIMIT = 1000
MAX_IDS = 100_000
DENSE_PROBE = 20_000
FILTERS = ("status", "group", "label", "online", "id_prefix", "cert_expires_before", "last_seen_before")
DEVICE_COLUMNS = ("id", "status", "groups", "labels", "online", "last_seen", "created", "cert_not_after")
_COLUMNS = ("SELECT d.id, d.status, d.groups, d.labels, d.online, d.last_seen, d.created, "
            "(SELECT c.not_after FROM certificates c WHERE c.device_id = d.id AND c.status = 'active' "
            "ORDER BY c.issued_at DESC LIMIT 1) AS cert_not_after")
_PREFIX_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
#: a cursor: base64url (no padding) of {"after": "<device id>"} or, for another sort than id,
#: {"after": "<device id>", "sort": "<sort>", "key": "<stored timestamp or ''>"}
CURSOR_RE = re.compile(r"[A-Za-z0-9_-]+")
MAX_CURSOR = 256
#: sort orders: name -> (key expression, source override or None); '-' in front: descending. cert_expires lists only
#: devices with an active certificate (a device without one has no expiry to sort by).
SORT_KEYS = {"id": None, "created": "d.created", "last_seen": "COALESCE(d.last_seen, '')",
             "cert_expires": "c.not_after"}
SORTS = tuple(name for key in SORT_KEYS for name in (key, f"-{key}"))
_STORED_TS_RE = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00)?")


class BadRequest(ValueError):
    """Input the API refuses with 400 (`param` names the field; the message is safe to show)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class Conflict(Exception):
    """The request no longer matches the registry (409)."""


class NotFound(Exception):
    """No such device (404)."""


def apply_schema(registry: Registry) -> None:
    """The API's indexes, side tables and triggers (idempotent; the side tables are filled once), in one write
    transaction (on PostgreSQL under the write lock: hubs starting at once apply it one after the other)."""
    pg = registry.dialect == dbsql.POSTGRESQL
    with registry.write() as db:
        fresh = not dbsql.has_table(db, "device_groups")
        for statement in PG_SCHEMA if pg else API_SCHEMA:
            db.execute(statement)
        if fresh:
            for statement in _PG_BACKFILL if pg else _BACKFILL:
                db.execute(statement)


def parse_time(value: str, param: str) -> str:
    """An ISO 8601 timestamp with a zone ('Z' allowed) as the registry's stored text form."""
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except (ValueError, AttributeError, TypeError):
        raise BadRequest(f"{param} must be an ISO 8601 timestamp, e.g. 2027-01-31T00:00:00Z", param) from None
    if when.tzinfo is None:
        raise BadRequest(f"{param} needs a time zone (e.g. a trailing Z)", param)
    try:  # a time at the edge of the datetime range with an offset has no UTC form (0001-01-01T00:00:00+01:00)
        return _ts(when.astimezone(timezone.utc))
    except (OverflowError, ValueError):
        raise BadRequest(f"{param} is out of range (years 0001-9999 in UTC)", param) from None


@dataclass
class Selector:
    """A device selector: filters (all must hold) or an explicit list of ids."""

    status: str | None = None
    group: str | None = None
    label: tuple[str, str] | None = None
    online: bool | None = None
    id_prefix: str | None = None
    cert_expires_before: str | None = None
    last_seen_before: str | None = None
    ids: list[str] | None = None
    #: last_seen_before matches many devices: filter while walking the id index (else: collect the few matches
    #: from the last_seen index first). Set by `plan`.
    dense_last_seen: bool = False

    @classmethod
    def parse(cls, raw: Mapping[str, Any], allow_ids: bool = False) -> "Selector":
        """From query parameters or a JSON selector object; BadRequest on any unknown or invalid value."""
        sel = cls()
        for key, value in raw.items():
            if key == "ids" and allow_ids:
                sel.ids = _parse_ids(value)
                continue
            if key not in FILTERS:
                raise BadRequest(f"unknown filter {key!r} (filters: {', '.join(FILTERS)})", key)
            if key == "online" and isinstance(value, bool):
                sel.online = value
                continue
            if not isinstance(value, str):
                raise BadRequest(f"{key} must be a string", key)
            if key == "status":
                if value not in DEVICE_STATUSES:
                    raise BadRequest(f"status must be one of {', '.join(DEVICE_STATUSES)}", key)
                sel.status = value
            elif key == "group":
                sel.group = _name(value, "group name", key)
            elif key == "label":
                k, sep, v = value.partition("=")
                if not sep or not v:
                    raise BadRequest("label must be key=value", key)
                if not LABEL_VALUE_RE.fullmatch(v):
                    raise BadRequest("label value must be 1-128 printable ASCII characters (no edge spaces)", key)
                sel.label = (_name(k, "label key", key), v)
            elif key == "online":
                if value not in ("true", "false"):
                    raise BadRequest("online must be true or false", key)
                sel.online = value == "true"
            elif key == "id_prefix":
                if not _PREFIX_RE.fullmatch(value):
                    raise BadRequest("id_prefix must be 1-63 characters a-z, 0-9 and '-'", key)
                sel.id_prefix = value
            else:
                setattr(sel, key, parse_time(value, key))
        if sel.ids is not None and any(getattr(sel, f) is not None for f in FILTERS):
            raise BadRequest("a selector is either ids or filters, not both", "ids")
        return sel

    def empty(self) -> bool:
        return self.ids is None and all(getattr(self, f) is None for f in FILTERS)

    def sql(self, sort: str = "id", dialect: str = dbsql.SQLITE) -> tuple[str, str, list[Any], str]:
        """(FROM clause, WHERE conditions, parameters, keyset column), each condition served by an index. Sorted by
        id, a group or label filter drives the query from its side table's primary key, so paging is a key range
        there; another sort order walks its own index and checks group and label through their side tables."""
        conds, params = [], []
        source, key = "devices d", "d.id"
        if sort.lstrip("-") != "id":
            if sort.lstrip("-") == "cert_expires":
                source, key = "certificates c JOIN devices d ON d.id = c.device_id", "c.device_id"
                conds.append("c.status = 'active'")
            if self.group is not None:
                conds.append("d.id IN (SELECT device_id FROM device_groups WHERE grp = ?)")
                params.append(self.group)
            if self.label is not None:
                conds.append("d.id IN (SELECT device_id FROM device_labels WHERE key = ? AND value = ?)")
                params += list(self.label)
        elif self.group is not None:
            source, key = "device_groups g JOIN devices d ON d.id = g.device_id", "g.device_id"
            conds.append("g.grp = ?")
            params.append(self.group)
        if self.label is not None and sort.lstrip("-") == "id":
            if self.group is None:
                source, key = "device_labels l JOIN devices d ON d.id = l.device_id", "l.device_id"
                conds.append("l.key = ? AND l.value = ?")
            else:
                conds.append("d.id IN (SELECT device_id FROM device_labels WHERE key = ? AND value = ?)")
            params += list(self.label)
        if self.ids is not None:
            conds.append(f"d.id IN (SELECT j.value FROM {dbsql.json_values(dialect, '?')})")
            params.append(json.dumps(self.ids))
        if self.status is not None:
            conds.append("d.status = ?")
            params.append(self.status)
        if self.online is not None:
            conds.append("d.online = ?")
            params.append(int(self.online))
        if self.id_prefix is not None:
            conds.append(f"{key} >= ? AND {key} < ?")
            params += [self.id_prefix, self.id_prefix + "\x7f"]
        if self.cert_expires_before is not None:
            conds.append("d.id IN (SELECT device_id FROM certificates WHERE status = 'active' AND not_after < ?)")
            params.append(self.cert_expires_before)
        if self.last_seen_before is not None:
            conds.append("d.last_seen < ?" if self.dense_last_seen else
                         "d.id IN (SELECT id FROM devices WHERE last_seen < ?)")
            params.append(self.last_seen_before)
        return source, (" AND ".join(conds) or "1 = 1"), params, key


def _name(value: str, what: str, param: str) -> str:
    try:
        return check_name(value, what)
    except AuthzError as exc:
        raise BadRequest(str(exc), param) from None


def _parse_ids(value: Any) -> list[str]:
    if not isinstance(value, list) or not value or len(value) > MAX_IDS:
        raise BadRequest(f"ids must be a list of 1-{MAX_IDS} device ids", "ids")
    for item in value:
        if not isinstance(item, str) or len(item) > 64:
            raise BadRequest("ids must be device id strings", "ids")
    return list(dict.fromkeys(value))


def encode_cursor(last_id: str, sort: str = "id", key: str | None = None) -> str:
    data: dict[str, str] = {"after": last_id}
    if sort != "id":
        data.update(sort=sort, key=key or "")
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


#: Where a page starts: after this device id (sort by id) or after this (sort key, device id).
Position = str | tuple[str, str]


def decode_cursor(cursor: str, sort: str = "id") -> Position:
    """The position a cursor (`encode_cursor`) holds, for the same `sort`: strictly {"after": <a valid device id>}
    (sort by id) or that plus the sort's name and a stored timestamp (or '': never seen), base64url without padding,
    at most MAX_CURSOR characters; BadRequest("invalid cursor ...") for anything else."""
    if isinstance(cursor, str) and len(cursor) <= MAX_CURSOR and CURSOR_RE.fullmatch(cursor):
        try:
            data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii"))
        except (binascii.Error, ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError)
            data = None
        fields = {"after"} if sort == "id" else {"after", "sort", "key"}
        if isinstance(data, dict) and set(data) == fields and (sort == "id" or (
                data["sort"] == sort and isinstance(data["key"], str) and _STORED_TS_RE.fullmatch(data["key"]))):
            try:
                after = check_name(data["after"], "device id")
                return after if sort.lstrip("-") == "id" else (data["key"], after)
            except AuthzError:
                pass
    raise BadRequest("invalid cursor: use the next_cursor of a previous page (with the same sort)", "cursor")


def parse_sort(value: str | None) -> str:
    if value is None:
        return "id"
    if value not in SORTS:
        raise BadRequest(f"sort must be one of {', '.join(SORTS)}", "sort")
    return value


def device_row(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "status": row["status"], "groups": json.loads(row["groups"]),
            "labels": json.loads(row["labels"]), "online": bool(row["online"]), "last_seen": row["last_seen"],
            "created": row["created"], "cert_not_after": row["cert_not_after"]}


def dialect_of(reader: Any) -> str:
    """The dialect of a Registry, or of a reader over an open transaction's connection (`.db`)."""
    return getattr(reader, "dialect", None) or dbsql.dialect(getattr(reader, "db", None))


def plan(registry: Registry, sel: Selector) -> None:
    """Pick how to serve last_seen_before: a bounded probe of its index says whether matches are dense (then a
    page is found fast walking ids) or sparse (then at most DENSE_PROBE matches are collected and sorted)."""
    if sel.last_seen_before is not None:
        n = registry.query("SELECT COUNT(*) AS n FROM (SELECT 1 FROM devices WHERE last_seen < ? LIMIT ?) AS p",
                           [sel.last_seen_before, DENSE_PROBE])[0]["n"]
        sel.dense_last_seen = n >= DENSE_PROBE


def list_devices(registry: Registry, sel: Selector, limit: int, after: Position | None,
                 sort: str = "id") -> tuple[list[dict], str | None]:
    """One page of devices in `sort` order after `after`; the cursor for the next page (None on the last one)."""
    plan(registry, sel)
    source, where, params, key = sel.sql(sort, dialect_of(registry))
    name, desc = sort.lstrip("-"), sort.startswith("-")
    expr = SORT_KEYS[name]
    op, order = ("<", "DESC") if desc else (">", "ASC")
    if expr is None:
        if after is not None:
            where += f" AND {key} {op} ?"
            params.append(after)
        order_by, select = f"{key} {order}", _COLUMNS
    else:
        if after is not None:
            where += f" AND ({expr}, {key}) {op} (?, ?)"
            params += list(after)
        order_by, select = f"{expr} {order}, {key} {order}", f"{_COLUMNS}, {expr} AS sort_key"
    rows = registry.query(f"{select} FROM {source} WHERE {where} ORDER BY {order_by} LIMIT ?", [*params, limit + 1])
    page = [device_row(r) for r in rows[:limit]]
    if len(rows) <= limit:
        return page, None
    last = rows[limit - 1]
    return page, encode_cursor(last["id"], sort, last["sort_key"] if expr is not None else None)


def iter_devices(registry: Registry, sel: Selector, after: Position | None = None, page: int = 1000,
                 sort: str = "id") -> Iterator[dict]:
    """Every matching device in `sort` order, fetched a keyset page at a time (for streamed exports)."""
    while True:
        items, cursor = list_devices(registry, sel, page, after, sort)
        yield from items
        if cursor is None:
            return
        after = decode_cursor(cursor, sort)


def count(registry: Registry, sel: Selector) -> int:
    source, where, params, _ = sel.sql(dialect=dialect_of(registry))
    return int(registry.query(f"SELECT COUNT(*) AS n FROM {source} WHERE {where}", params)[0]["n"])


def get_device(registry: Registry, device_id: str) -> dict | None:
    rows = registry.query(f"{_COLUMNS} FROM devices d WHERE d.id = ?", [device_id])
    return device_row(rows[0]) if rows else None
