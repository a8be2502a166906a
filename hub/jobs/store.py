"""Jobs persistence in the registry: create a job from a selector, device transitions, progress, listing.

One SQL text for SQLite and PostgreSQL (hub/registry/sql.py: `?` placeholders, `RETURNING`, no sqlite-only
functions; the selector's SQL is built for the registry's dialect). A job is created in ONE write transaction
(`BEGIN IMMEDIATE`; on PostgreSQL under the registry's advisory write lock): the selector's match count is
re-checked (it must still be the confirmed count), the job row is written, and one `job_devices` row per matching
device (`queued`) is inserted by a single INSERT ... SELECT over the selector's indexed query (no rows through
Python). Every later transition updates the device rows and the job's per-state counters in the same transaction,
and every job state change writes an audit row naming who made it (the operator, or 'hub' for completion and
aborts).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Iterable, Sequence

from hub.api.queries import Conflict, NotFound, Selector, count
from hub.registry import sql as dbsql
from hub.registry.store import Registry

from .engine import DEVICE_STATES, FINISHED_JOB_STATES, Counts, Spec

_JOB_COLUMNS = ("id", "name", "command", "args", "selector", "rate_per_minute", "timeout_s", "abort_percent",
                "min_finished", "offline", "deadline", "max_in_flight", "retries", "state", "total", "created_by",
                "created", "started", "finished", "reason")
#: operator action -> (job states it applies to, the state it sets)
ACTIONS = {"pause": (("running",), "paused"), "resume": (("paused",), "running"),
           "cancel": (("running", "paused"), "cancelled")}


def ts(now: datetime) -> str:
    """The registry's stored timestamp form (ISO 8601 UTC, microseconds: text order is time order)."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("timestamps must be timezone-aware (UTC)")
    return now.astimezone(timezone.utc).isoformat(timespec="microseconds")


def parse_ts(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def _num(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def job_dict(row: dict[str, Any]) -> dict[str, Any]:
    """A jobs row as the API shows it."""
    job = {k: row[k] for k in _JOB_COLUMNS}
    job["args"], job["selector"] = json.loads(row["args"]), json.loads(row["selector"])
    for k in ("rate_per_minute", "timeout_s", "abort_percent"):
        job[k] = _num(row[k])
    job["ramp"] = None if row["ramp_start"] is None else {
        "start_per_minute": _num(row["ramp_start"]), "factor": _num(row["ramp_factor"]),
        "every_acked": row["ramp_every"]}
    job["counts"] = {s: row[f"n_{s}"] for s in DEVICE_STATES}
    return job


def spec_of(row: dict[str, Any]) -> Spec:
    return Spec(rate_per_minute=row["rate_per_minute"], timeout_s=row["timeout_s"],
                abort_percent=row["abort_percent"], offline=row["offline"], min_finished=row["min_finished"],
                deadline=parse_ts(row["deadline"]), ramp_start=row["ramp_start"],
                ramp_factor=row["ramp_factor"] or 2.0, ramp_every=row["ramp_every"] or 10,
                max_in_flight=row["max_in_flight"], retries=row["retries"] or 0)


def counts_of(row: dict[str, Any]) -> Counts:
    return Counts(**{s: row[f"n_{s}"] for s in DEVICE_STATES})


class _Reader:
    """Lets `queries.count` run inside an open transaction (same connection)."""

    def __init__(self, db):
        self.db = db

    def query(self, sql: str, params=()) -> list[dict]:
        return list(self.db.query(sql, list(params)))


def create_job(registry: Registry, spec: dict[str, Any], sel: Selector, confirm_count: int, actor: str,
               now: datetime, source: str | None = None) -> dict[str, Any]:
    """Create a running job over every device `sel` matches if that is still `confirm_count` devices (Conflict
    otherwise, nothing written). `spec`: name, command, args, rate_per_minute, timeout_s, abort_percent, offline,
    min_finished (or None), deadline (datetime or None), optionally ramp ({start_per_minute, factor,
    every_acked}), max_in_flight, retries; `selector` is stored as given (`spec['selector']`)."""
    ramp = spec.get("ramp") or {}
    at = ts(now)
    frm, where, params, _ = sel.sql(dialect=registry.dialect)
    with registry.write() as db:
        matched = count(_Reader(db), sel)
        if matched != confirm_count:
            raise Conflict(f"the selector matches {matched} devices now, not {confirm_count}: no job was created; "
                           "check the selector (dry run) and confirm the new count")
        job_id = list(db.query(
            "INSERT INTO jobs (name, command, args, selector, rate_per_minute, timeout_s, abort_percent, "
            "min_finished, offline, deadline, ramp_start, ramp_factor, ramp_every, max_in_flight, retries, state, "
            "created_by, created, started) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'running', ?, ?, ?) "
            "RETURNING id",
            [spec["name"], spec["command"], json.dumps(spec["args"], sort_keys=True),
             json.dumps(spec["selector"], sort_keys=True), spec["rate_per_minute"], spec["timeout_s"],
             spec["abort_percent"], spec.get("min_finished"), spec["offline"],
             ts(spec["deadline"]) if spec.get("deadline") else None, ramp.get("start_per_minute"),
             ramp.get("factor"), ramp.get("every_acked"), spec.get("max_in_flight"), spec.get("retries") or 0,
             actor, at, at]))[0]["id"]
        total = db.execute(f"INSERT INTO job_devices (job_id, device_id, state) SELECT ?, d.id, 'queued' "
                           f"FROM {frm} WHERE {where}", [job_id, *params]).rowcount
        db.execute("UPDATE jobs SET total = ?, n_queued = ? WHERE id = ?", [total, total, job_id])
        registry.append_audit(db, [(at, actor, "job.create", None, "ok",
                            f"job {job_id} {spec['name']!r}: {spec['command']} to {total} devices; "
                            f"{_num(spec['rate_per_minute'])}/min, timeout {_num(spec['timeout_s'])} s, "
                            f"abort > {_num(spec['abort_percent'])}%, offline {spec['offline']}", source)])
    return get_job(registry, job_id)


def get_job(registry: Registry, job_id: int) -> dict[str, Any]:
    rows = registry.query("SELECT * FROM jobs WHERE id = ?", [job_id])
    if not rows:
        raise NotFound(f"no job {job_id}")
    return job_dict(rows[0])


def list_jobs(registry: Registry, limit: int, before: int | None = None,
              state: str | None = None) -> tuple[list[dict], int | None]:
    """Newest first; keyset on the job id. Returns (page, the id to continue before, or None)."""
    conds, params = [], []
    if before is not None:
        conds.append("id < ?")
        params.append(before)
    if state is not None:
        conds.append("state = ?")
        params.append(state)
    where = f"WHERE {' AND '.join(conds)}" if conds else ""
    rows = registry.query(f"SELECT * FROM jobs {where} ORDER BY id DESC LIMIT ?", [*params, limit + 1])
    page = [job_dict(r) for r in rows[:limit]]
    return page, (page[-1]["id"] if len(rows) > limit else None)


def list_job_devices(registry: Registry, job_id: int, limit: int, after: str | None = None,
                     state: str | None = None) -> tuple[list[dict], str | None]:
    """A job's devices by id after `after` (optionally one state); NotFound for an unknown job."""
    get_job(registry, job_id)
    conds, params = ["job_id = ?"], [job_id]
    if state is not None:
        conds.append("state = ?")
        params.append(state)
    if after is not None:
        conds.append("device_id > ?")
        params.append(after)
    rows = registry.query(f"SELECT device_id, state, command_id, attempts, sent_at, finished_at, detail "
                          f"FROM job_devices WHERE {' AND '.join(conds)} ORDER BY device_id LIMIT ?",
                          [*params, limit + 1])
    page = rows[:limit]
    return page, (page[-1]["device_id"] if len(rows) > limit else None)


def operator_action(registry: Registry, job_id: int, action: str, actor: str, now: datetime,
                    source: str | None = None) -> dict[str, Any]:
    """pause / resume / cancel. Conflict for a finished job; pausing a paused job (resuming a running one) is a
    no-op answered with the job as it is."""
    allowed, new = ACTIONS[action]
    at = ts(now)
    with registry.write() as db:
        rows = list(db.query("SELECT state, name FROM jobs WHERE id = ?", [job_id]))
        if not rows:
            raise NotFound(f"no job {job_id}")
        old = rows[0]["state"]
        if old in FINISHED_JOB_STATES:
            raise Conflict(f"job {job_id} is {old}; a finished job cannot be changed")
        if old in allowed:
            db.execute("UPDATE jobs SET state = ?, finished = CASE WHEN ? = 'cancelled' THEN ? ELSE finished END, "
                       "reason = CASE WHEN ? = 'cancelled' THEN ? ELSE reason END WHERE id = ?",
                       [new, new, at, new, f"cancelled by {actor}", job_id])
            registry.append_audit(db, [(at, actor, f"job.{action}", None, "ok",
                                f"job {job_id} {rows[0]['name']!r}: {old} -> {new}", source)])
    return get_job(registry, job_id)


# --- the runner's transitions -------------------------------------------------------------------------------------

def active_jobs(registry: Registry) -> list[dict[str, Any]]:
    """Running and paused jobs (raw rows), oldest first."""
    return registry.query("SELECT * FROM jobs WHERE state IN ('running', 'paused') ORDER BY id")


def next_queued(registry: Registry, job_id: int, after: str, limit: int) -> list[dict[str, Any]]:
    """Up to `limit` queued devices of a job after device id `after`, each with its presence (online, last_seen)."""
    return registry.query(
        "SELECT jd.device_id, COALESCE(d.online, 0) AS online, d.last_seen FROM job_devices jd "
        "LEFT JOIN devices d ON d.id = jd.device_id "
        "WHERE jd.job_id = ? AND jd.state = 'queued' AND jd.device_id > ? ORDER BY jd.device_id LIMIT ?",
        [job_id, after, limit])


def _move(db, job_id: int, old: str, new: str, n: int) -> None:
    if n:
        db.execute(f"UPDATE jobs SET n_{old} = n_{old} - ?, n_{new} = n_{new} + ? WHERE id = ?", [n, n, job_id])


def record_sent(registry: Registry, job_id: int, sent: Sequence[tuple[str, str]], now: datetime) -> int:
    """(device_id, command_id) pairs published: queued -> sent."""
    at = ts(now)
    with registry.write() as db:
        n = 0
        for device_id, cid in sent:
            n += db.execute("UPDATE job_devices SET state = 'sent', command_id = ?, sent_at = ?, "
                            "attempts = attempts + 1, detail = NULL WHERE job_id = ? AND device_id = ? "
                            "AND state = 'queued'", [cid, at, job_id, device_id]).rowcount
        _move(db, job_id, "queued", "sent", n)
    return n


def mark_offline(registry: Registry, job_id: int, device_ids: Iterable[str], now: datetime, detail: str) -> int:
    """queued -> offline (not online when its turn came, under the `fail` policy)."""
    at = ts(now)
    with registry.write() as db:
        n = 0
        for device_id in device_ids:
            n += db.execute("UPDATE job_devices SET state = 'offline', finished_at = ?, detail = ? "
                            "WHERE job_id = ? AND device_id = ? AND state = 'queued'",
                            [at, detail, job_id, device_id]).rowcount
        _move(db, job_id, "queued", "offline", n)
    return n


def expire_queued(registry: Registry, job_id: int, now: datetime, detail: str, limit: int = 10_000) -> int:
    """Up to `limit` queued devices -> offline (the `wait` deadline passed); returns how many."""
    at = ts(now)
    with registry.write() as db:
        n = db.execute("UPDATE job_devices SET state = 'offline', finished_at = ?, detail = ? "
                       "WHERE job_id = ? AND state = 'queued' AND device_id IN (SELECT device_id FROM job_devices "
                       "WHERE job_id = ? AND state = 'queued' ORDER BY device_id LIMIT ?)",
                       [at, detail, job_id, job_id, limit]).rowcount
        _move(db, job_id, "queued", "offline", n)
    return n


def time_out(registry: Registry, job_id: int, before: datetime, now: datetime, limit: int = 10_000,
             retries: int = 0) -> int:
    """Up to `limit` devices sent before `before` and not acked -> timed_out, or back to queued while they have
    had at most `retries` + 1 attempts (engine.retry); returns how many changed."""
    at = ts(now)
    with registry.write() as db:
        states = [r["state"] for r in db.query(
            "UPDATE job_devices SET state = CASE WHEN attempts <= ? THEN 'queued' ELSE 'timed_out' END, "
            "finished_at = CASE WHEN attempts <= ? THEN NULL ELSE ? END, "
            "detail = CASE WHEN attempts <= ? THEN 'no ack in time (attempt ' || attempts || '), sent again' "
            "ELSE 'no ack in time' END "
            "WHERE job_id = ? AND state = 'sent' AND device_id IN (SELECT device_id FROM job_devices "
            "WHERE job_id = ? AND state = 'sent' AND sent_at < ? ORDER BY sent_at LIMIT ?) RETURNING state",
            [retries, retries, at, retries, job_id, job_id, ts(before), limit])]
        _move(db, job_id, "sent", "timed_out", states.count("timed_out"))
        _move(db, job_id, "sent", "queued", states.count("queued"))
    return len(states)


def apply_acks(registry: Registry, acks: Sequence[tuple[str, str, bool, str]], now: datetime,
               unknown: list | None = None) -> int:
    """(device_id, command_id, ok, detail) acks: a `sent` row with that command id and device -> acked / failed.
    Acks of other commands (or late ones, after a timeout) change nothing, and an ack applied twice (two hubs
    received it) counts once: only a `sent` row moves, and the counters move by the rows RETURNING said changed.
    Returns how many rows changed. `unknown`, if given, gets the acks whose command id no job device has (yet),
    checked in the same transaction (a follower hub keeps those for a while: the leader may not have recorded
    the send yet)."""
    at = ts(now)
    moved: dict[tuple[int, str], int] = {}
    with registry.write() as db:
        for device_id, cid, ok, detail in acks:
            new = "acked" if ok else "failed"
            for row in db.query("UPDATE job_devices SET state = ?, finished_at = ?, detail = ? "
                                "WHERE command_id = ? AND device_id = ? AND state = 'sent' RETURNING job_id",
                                [new, at, detail[:500], cid, device_id]):
                moved[(row["job_id"], new)] = moved.get((row["job_id"], new), 0) + 1
        for (job_id, new), n in moved.items():
            _move(db, job_id, "sent", new, n)
        if unknown is not None and acks:
            known = _known(db, registry.dialect, [a[1] for a in acks])
            unknown.extend(a for a in acks if a[1] not in known)
    return sum(moved.values())


def _known(db, dialect: str, command_ids: Sequence[str]) -> set[str]:
    return {r["command_id"] for r in db.query(
        f"SELECT command_id FROM job_devices WHERE command_id IS NOT NULL AND command_id IN "
        f"(SELECT j.value FROM {dbsql.json_values(dialect, '?')})", [json.dumps(list(command_ids))])}


def known_commands(registry: Registry, command_ids: Sequence[str]) -> set[str]:
    """The command ids some job device row has (a read: no write lock)."""
    return _known(registry, registry.dialect, command_ids) if command_ids else set()


def finish(registry: Registry, job_id: int, state: str, reason: str | None, now: datetime,
           actor: str = "hub") -> bool:
    """A running job -> completed / aborted (audited); False if it was no longer running."""
    at = ts(now)
    with registry.write() as db:
        rows = list(db.query("SELECT name, created_by, n_queued, n_sent, n_acked, n_failed, n_timed_out, n_offline "
                             "FROM jobs WHERE id = ? AND state = 'running'", [job_id]))
        if not rows:
            return False
        db.execute("UPDATE jobs SET state = ?, finished = ?, reason = ? WHERE id = ?", [state, at, reason, job_id])
        counts = ", ".join(f"{s} {rows[0][f'n_{s}']}" for s in DEVICE_STATES)
        registry.append_audit(db, [(at, actor, f"job.{'complete' if state == 'completed' else 'abort'}", None,
                            "ok" if state == "completed" else "error",
                            f"job {job_id} {rows[0]['name']!r} (created by {rows[0]['created_by']}): running -> "
                            f"{state}; {counts}" + (f"; {reason}" if reason else ""), None)])
    return True
