"""The certificate expiry report: active devices whose certificate expires within N days, and why each one will
lose it unless someone acts.

Who is listed: devices with status `active` whose active certificate (a device has at most one) expires within
`days` from now, already expired ones included, soonest (most expired) first; suspended, revoked and
decommissioned devices are left out (cut off on purpose). Each row says why, the `verdict` (`classify`, pure):

  expired          not_after has passed: the certificate is lost; the device needs a fresh enrollment token
  offline          past its renewal point and not connected (last seen X): it cannot renew until it reconnects
  renewal_overdue  past its renewal point by more than OVERDUE_GRACE, connected, still on this certificate: the
                   agent is failing to renew (its log, the hub's EST denials in the audit log say why)
  renewal_due      not yet at its renewal point (or just past it, connected): the agent renews it by itself

The renewal point is the agent's (agent.renewal.decide with the agent's default fraction, 2/3 of the lifetime; an
agent configured with another fraction renews at another time, which the hub cannot know).

For a fleet manager the report is a to-do list: by default it lists only the first three verdicts, the devices
that lose (or lost) their certificate without action; `include_due` lists renewal_due ones too (every device in
the window).

Indexed (`REPORT_SCHEMA`), keyset paging on (not_after, device id), never OFFSET. Two access paths:
  include_due   `certificates_expiry_report` (not_after, device_id, not_before) over active certificates: the
                window walked in expiry order, a page reads only its own rows.
  default       in a healthy fleet most of the window renews by itself, so walking it would cost O(window) per
                page; instead `certificates_renewal_point`, an index on the agent's renewal point (an expression
                of not_before and not_after), yields only the certificates past it, O(those) per page plus a
                sort. A bounded probe (`SPARSE_PROBE`) first: when that many or more are past their renewal point
                (a fleet-wide failure), the window walk is cheaper and is used, with the renewal point tested on
                the index entries (a skipped row's certificate is never loaded).
On PostgreSQL (`PG_SCHEMA`) the renewal point is the same expression over an IMMUTABLE `tessera_julianday` (an index
expression must be immutable), and the planner picks the access path (no INDEXED BY, no CROSS JOIN order).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from agent.renewal import decide

from hub.registry import sql as dbsql
from hub.registry.store import Registry, _ts

#: the verdicts, the default listing's first
VERDICTS = ("expired", "offline", "renewal_overdue", "renewal_due")
ACTIONABLE = frozenset(VERDICTS[:3])
#: an online agent checks its certificate at least hourly (agent.renewal.next_check_delay): give it that long
OVERDUE_GRACE = timedelta(hours=1)
RENEW_FRACTION = 2 / 3  # agent.config RenewalConfig.fraction's default
MAX_DAYS = 3650
INDEX = "certificates_expiry_report"
RENEW_INDEX = "certificates_renewal_point"
#: past-renewal-point certificates at which the default listing walks the window instead (see the docstring)
SPARSE_PROBE = 20_000
#: the agent's renewal point (agent.renewal.decide) in julian days: min(nb + F * L, max(na - 1 min, nb + L / 2));
#: the exact test is `classify`. The same text in the index and the queries (SQLite matches index expressions).
_RENEW_JD = ("min(julianday({c}not_before) + (julianday({c}not_after) - julianday({c}not_before)) * "
             f"{RENEW_FRACTION!r}, max(julianday({{c}}not_after) - 60.0 / 86400, "
             "(julianday({c}not_before) + julianday({c}not_after)) / 2))")
REPORT_SCHEMA = (
    f"""CREATE INDEX IF NOT EXISTS {INDEX} ON certificates(not_after, device_id, not_before)
        WHERE status = 'active'""",
    f"""CREATE INDEX IF NOT EXISTS {RENEW_INDEX} ON certificates({_RENEW_JD.format(c='')}, not_after, device_id)
        WHERE status = 'active'""",
)
_PAST = f"{_RENEW_JD.format(c='c.')} <= julianday(?)"
#: CROSS JOIN: certificates is the outer loop, always (with `LIMIT ?` SQLite may otherwise walk every active device)
_COLUMNS = ("SELECT c.device_id, c.serial, c.not_before, c.not_after, d.online, d.last_seen, d.groups "
            "FROM certificates c INDEXED BY {index} CROSS JOIN devices d ON d.id = c.device_id")
#: PostgreSQL: an index expression must be IMMUTABLE, and text -> timestamptz is only STABLE in general (it may
#: read the session's TimeZone); the stored text always carries its offset (+00:00), so this julianday
#: (hub.registry.sql.julianday: the same value as SQLite's, to the microsecond) is immutable on what it is given.
PG_JULIANDAY = ("CREATE OR REPLACE FUNCTION tessera_julianday(ts text) RETURNS float8 LANGUAGE sql IMMUTABLE STRICT "
                f"PARALLEL SAFE AS $fn$ SELECT {dbsql.julianday(dbsql.POSTGRESQL, 'ts')} $fn$")
_PG_RENEW_JD = ("LEAST(tessera_julianday({c}not_before) + (tessera_julianday({c}not_after) - "
                f"tessera_julianday({{c}}not_before)) * {RENEW_FRACTION!r}::float8, "
                "GREATEST(tessera_julianday({c}not_after) - 60.0::float8 / 86400, "
                "(tessera_julianday({c}not_before) + tessera_julianday({c}not_after)) / 2))")
PG_SCHEMA = (
    REPORT_SCHEMA[0],
    PG_JULIANDAY,
    f"""CREATE INDEX IF NOT EXISTS {RENEW_INDEX} ON certificates(({_PG_RENEW_JD.format(c='')}), not_after, device_id)
        WHERE status = 'active'""",
)
#: PostgreSQL plans the join order itself (no index hints)
_PG_COLUMNS = ("SELECT c.device_id, c.serial, c.not_before, c.not_after, d.online, d.last_seen, d.groups "
               "FROM certificates c JOIN devices d ON d.id = c.device_id")


def renew_jd(dialect: str, c: str = "c.") -> str:
    """The agent's renewal point of the certificate row `c` in julian days, as the dialect's index has it."""
    return (_PG_RENEW_JD if dialect == dbsql.POSTGRESQL else _RENEW_JD).format(c=c)


def _past(dialect: str) -> str:
    """The certificate's renewal point is at or before the time parameter."""
    return f"{renew_jd(dialect)} <= {dbsql.julianday(dialect, '?')}" if dialect == dbsql.POSTGRESQL else _PAST


def _columns(dialect: str, index: str) -> str:
    return _PG_COLUMNS if dialect == dbsql.POSTGRESQL else _COLUMNS.format(index=index)


#: rows read per query while filling a page (a page whose rows are filtered out in Python asks again)
BATCH = 500


def apply_schema(registry: Registry) -> None:
    """The report's indexes (idempotent; one write transaction)."""
    with registry.write() as db:
        for statement in PG_SCHEMA if registry.dialect == dbsql.POSTGRESQL else REPORT_SCHEMA:
            db.execute(statement)


@dataclass(frozen=True)
class Verdict:
    verdict: str
    renew_at: datetime
    reason: str


def _when(at: datetime) -> str:
    return at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def classify(not_before: datetime, not_after: datetime, online: bool, last_seen: datetime | None,
             now: datetime, grace: timedelta = OVERDUE_GRACE) -> Verdict:
    """Why a device holding a certificate valid [not_before, not_after] will (or will not) lose it; pure."""
    renew_at = decide(not_before, not_after, now, fraction=RENEW_FRACTION).renew_at
    if now >= not_after:
        return Verdict("expired", renew_at, f"expired {_when(not_after)}: the device cannot renew any more; it "
                                            "needs a fresh enrollment token")
    seen = f"last seen {_when(last_seen)}" if last_seen is not None else "never seen online"
    if now >= renew_at and not online:
        return Verdict("offline", renew_at, f"offline ({seen}); renewal due since {_when(renew_at)}: it cannot "
                                            "renew until it reconnects")
    if online and now >= renew_at + grace:
        return Verdict("renewal_overdue", renew_at, f"online and still on this certificate, renewal due since "
                                                    f"{_when(renew_at)}: the agent is failing to renew")
    if online:
        return Verdict("renewal_due", renew_at, f"renews by itself at {_when(renew_at)}")
    return Verdict("renewal_due", renew_at, f"renews at {_when(renew_at)} if connected by then (now offline, {seen})")


def encode_cursor(not_after: str, device_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([not_after, device_id]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str] | None:
    """(not_after, device id) of a cursor from `encode_cursor`, None if it is not one."""
    if not isinstance(cursor, str) or not 0 < len(cursor) <= 200:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii"))
    except (binascii.Error, ValueError, RecursionError):
        return None
    if (isinstance(data, list) and len(data) == 2 and all(isinstance(x, str) and 0 < len(x) <= 64 for x in data)
            and encode_cursor(*data) == cursor):
        try:
            datetime.fromisoformat(data[0])
        except ValueError:
            return None
        return data[0], data[1]
    return None


def _row(r: dict[str, Any], now: datetime, include_due: bool) -> dict[str, Any] | None:
    not_after = datetime.fromisoformat(r["not_after"])
    last_seen = datetime.fromisoformat(r["last_seen"]) if r["last_seen"] else None
    v = classify(datetime.fromisoformat(r["not_before"]), not_after, bool(r["online"]), last_seen, now)
    if not include_due and v.verdict not in ACTIONABLE:
        return None
    return {"device": r["device_id"], "serial": r["serial"], "not_after": r["not_after"],
            "days_left": round((not_after - now).total_seconds() / 86400, 2), "online": bool(r["online"]),
            "last_seen": r["last_seen"], "groups": json.loads(r["groups"]), "verdict": v.verdict,
            "renew_at": _ts(v.renew_at), "reason": v.reason}


def past_renewal_sparse(registry: Registry, now: datetime, probe: int = SPARSE_PROBE) -> bool:
    """Fewer than `probe` active certificates are past their renewal point (a bounded index range count)."""
    hint = "" if registry.dialect == dbsql.POSTGRESQL else f" INDEXED BY {RENEW_INDEX}"
    n = registry.query(f"SELECT COUNT(*) AS n FROM (SELECT 1 FROM certificates c{hint} "
                       f"WHERE c.status = 'active' AND {_past(registry.dialect)} LIMIT ?) AS p",
                       [_ts(now), probe])[0]["n"]
    return n < probe


def expiring(registry: Registry, now: datetime, days: int, limit: int, after: tuple[str, str] | None = None,
             include_due: bool = False, batch: int = BATCH,
             probe: int = SPARSE_PROBE) -> tuple[list[dict[str, Any]], str | None]:
    """One page of the report (at most `limit` rows, expiry order) after the keyset position `after`; the cursor
    of the next page (None on the last one). Rows are read `batch` at a time until the page is full."""
    until = _ts(now + timedelta(days=days))
    conds = ["c.status = 'active'", "c.not_after <= ?", "d.status = 'active'"]
    params: list[Any] = [until]
    index = INDEX
    if not include_due:  # past the (earliest possible) renewal point; `classify` decides exactly
        conds.append(_past(registry.dialect))
        params.append(_ts(now))
        if past_renewal_sparse(registry, now, probe):
            index = RENEW_INDEX
    page: list[dict[str, Any]] = []
    position = after
    while True:
        where = " AND ".join(conds + (["(c.not_after, c.device_id) > (?, ?)"] if position else []))
        rows = registry.query(f"{_columns(registry.dialect, index)} WHERE {where} ORDER BY c.not_after, c.device_id "
                              "LIMIT ?",
                              [*params, *(position or ()), batch])
        for r in rows:
            item = _row(r, now, include_due)
            if item is None:
                continue
            if len(page) == limit:  # one more exists: the page is full
                last = page[-1]
                return page, encode_cursor(last["not_after"], last["device"])
            page.append(item)
        if len(rows) < batch:
            return page, None
        position = (rows[-1]["not_after"], rows[-1]["device_id"])
