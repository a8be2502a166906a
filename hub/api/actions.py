"""The fleet API's registry writes: edit a device's groups and labels, and status changes by selector in one batch.

A bulk revoke / suspend / resume is ONE `BEGIN IMMEDIATE` transaction however many devices it touches: the match
count is re-checked inside it (the confirmed count must still be the truth), then device statuses, certificates
(revoke), one audit row and one authz event per changed device are written together. The caller then rings the
broker once and asks for one CRL publication (hub/api/routes.py).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Mapping

from hub.authz.policy import AuthzError, check_groups, check_labels
from hub.registry import Registry, _ts

from .queries import BadRequest, Conflict, NotFound, Selector, count

#: action -> the status it sets
ACTIONS = {"revoke": "revoked", "suspend": "suspended", "resume": "active"}
_AUDIT = "INSERT INTO audit (at, actor, action, device_id, outcome, detail, source) VALUES (?, ?, ?, ?, ?, ?, ?)"


def patch_device(registry: Registry, device_id: str, body: Mapping[str, Any], now: datetime, actor: str,
                 source: str | None = None) -> dict[str, bool]:
    """Replace a device's groups and/or labels; a groups change writes an authz event in the same transaction
    (live sessions get the new group rights at once). Returns {'changed': ..., 'groups_changed': ...}."""
    unknown = set(body) - {"groups", "labels"}
    if unknown or not body:
        raise BadRequest(f"PATCH takes groups and/or labels{f', not {sorted(unknown)}' if unknown else ''}",
                         "body")
    try:
        groups = None
        if "groups" in body:
            if not isinstance(body["groups"], list):
                raise BadRequest("groups must be a list of group names", "groups")
            groups = check_groups(body["groups"])
        labels = None
        if "labels" in body:
            if not isinstance(body["labels"], dict):
                raise BadRequest("labels must be an object of key: value strings", "labels")
            labels = check_labels(body["labels"])
    except AuthzError as exc:
        raise BadRequest(str(exc), "groups" if "group" in str(exc) else "labels") from None
    at = _ts(now)
    with registry.write() as db:
        rows = db.execute("SELECT groups, labels FROM devices WHERE id = ?", [device_id]).fetchall()
        if not rows:
            raise NotFound(f"no device {device_id!r}")
        old_groups, old_labels = json.loads(rows[0][0]), json.loads(rows[0][1])
        changes = []
        if groups is not None and groups != old_groups:
            db.execute("UPDATE devices SET groups = ? WHERE id = ?", [json.dumps(groups), device_id])
            Registry.authz_event(db, device_id, "groups changed", now)
            changes.append(f"groups {old_groups} -> {groups}")
        if labels is not None and labels != old_labels:
            db.execute("UPDATE devices SET labels = ? WHERE id = ?", [json.dumps(labels, sort_keys=True), device_id])
            changes.append(f"labels {old_labels} -> {labels}")
        if changes:
            db.execute(_AUDIT, [at, actor, "device.edit", device_id, "ok", "; ".join(changes), source])
    return {"changed": bool(changes), "groups_changed": groups is not None and groups != old_groups}


def bulk_status(registry: Registry, action: str, sel: Selector, confirm_count: int, reason: str, now: datetime,
                actor: str, source: str | None = None) -> dict[str, Any]:
    """Set the status of every device `sel` matches, in one transaction, if `confirm_count` is still the match
    count (Conflict otherwise, nothing written). Devices already in that status, and revoked ones (revocation is
    final), are left alone. Returns matched, changed (ids), skipped and revoked certificate count."""
    status = ACTIONS[action]
    at = _ts(now)
    source, where, params, _ = sel.sql()
    with registry.write() as db:
        matched = count(_Reader(db), sel)
        if matched != confirm_count:
            raise Conflict(f"the selector matches {matched} devices now, not {confirm_count}: nothing was done; "
                           "check the selector (dry run) and confirm the new count")
        rows = db.execute(f"SELECT d.id, d.status FROM {source} WHERE {where} AND d.status != ? "
                          "AND d.status != 'revoked' ORDER BY d.id", [*params, status]).fetchall()
        ids = [r[0] for r in rows]
        db.execute("CREATE TEMP TABLE IF NOT EXISTS api_batch (id TEXT PRIMARY KEY) WITHOUT ROWID")
        db.execute("DELETE FROM temp.api_batch")
        db.conn.executemany("INSERT INTO temp.api_batch (id) VALUES (?)", [(i,) for i in ids])
        presence = ", online = 0" if status != "active" else ""
        db.execute(f"UPDATE devices SET status = ?{presence} WHERE id IN (SELECT id FROM temp.api_batch)", [status])
        revoked: dict[str, list[str]] = {}
        if status == "revoked":
            for serial, device_id in db.execute(
                    "UPDATE certificates SET status = 'revoked', revoked_at = ?, revocation_reason = ? "
                    "WHERE device_id IN (SELECT id FROM temp.api_batch) AND status IN ('active', 'superseded') "
                    "AND not_after > ? RETURNING serial, device_id", [at, reason or "device revoked", at]).fetchall():
                revoked.setdefault(device_id, []).append(serial)
        audits, events = [], []
        for device_id, old in rows:
            detail = f"{old} -> {status}" + (f"; reason: {reason}" if reason else "") + "; bulk"
            if revoked.get(device_id):
                detail += f"; revoked certificates: {', '.join(sorted(revoked[device_id]))}"
            audits.append((at, actor, f"device.{status}", device_id, "ok", detail, source))
            events.append((at, device_id, f"device {status}"))
        db.conn.executemany(_AUDIT, audits)
        db.conn.executemany("INSERT INTO authz_events (at, principal, reason) VALUES (?, ?, ?)", events)
        db.execute("DELETE FROM temp.api_batch")
    return {"matched": matched, "changed": ids, "skipped": matched - len(ids),
            "revoked_certificates": sum(len(v) for v in revoked.values())}


class _Reader:
    """Lets `queries.count` run inside an open transaction (same connection)."""

    def __init__(self, db):
        self.db = db

    def query(self, sql: str, params=()) -> list[dict]:
        return list(self.db.query(sql, list(params)))
