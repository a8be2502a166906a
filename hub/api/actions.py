"""The fleet API's registry writes: edit a device's groups and labels, and status changes by selector in one batch.

A bulk revoke / suspend / resume is ONE `BEGIN IMMEDIATE` transaction however many devices it touches: the match
count is re-checked inside it (the confirmed count must still be the truth), then device statuses, certificates
(revoke), one audit row and one authz event per changed device are written together. The caller then rings the
broker once and asks for one CRL publication (hub/api/routes.py).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any, Mapping

from hub.authz.policy import AuthzError, check_groups, check_labels
from hub.registry import sql as dbsql
from hub.registry.store import (DeviceExists, DeviceNotActive, InvalidDeviceId, InvalidName, Registry, UnknownDevice,
                          _ts)

from .queries import BadRequest, Conflict, NotFound, Selector, count

#: action -> the status it sets (resume: 'active', or 'pending' for a device that never enrolled)
ACTIONS = {"revoke": "revoked", "suspend": "suspended", "resume": "active"}
#: action -> the statuses it changes (everything else it matches is skipped; revoked/decommissioned are final)
_CHANGES = {"revoke": ("pending", "active", "suspended"), "suspend": ("pending", "active"), "resume": ("suspended",)}


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
            registry.append_audit(db, [(at, actor, "device.edit", device_id, "ok", "; ".join(changes), source)])
    return {"changed": bool(changes), "groups_changed": groups is not None and groups != old_groups}


def bulk_status(registry: Registry, action: str, sel: Selector, confirm_count: int, reason: str, now: datetime,
                actor: str, source: str | None = None) -> dict[str, Any]:
    """Set the status of every device `sel` matches, in one transaction, if `confirm_count` is still the match
    count (Conflict otherwise, nothing written). Devices already in that status, and revoked or decommissioned ones
    (final), are left alone; a resumed device that never enrolled goes back to 'pending'. Returns matched, changed
    (ids), skipped and revoked certificate count."""
    status = ACTIONS[action]
    at = _ts(now)
    frm, where, params, _ = sel.sql(dialect=registry.dialect)  # (not `source`: that is the caller's address)
    pg = registry.dialect == dbsql.POSTGRESQL
    batch = "pg_temp.api_batch" if pg else "temp.api_batch"  # this connection's own temporary table
    with registry.write() as db:
        matched = count(_Reader(db), sel)
        if matched != confirm_count:
            raise Conflict(f"the selector matches {matched} devices now, not {confirm_count}: nothing was done; "
                           "check the selector (dry run) and confirm the new count")
        changes = _CHANGES[action]
        rows = db.execute(f"SELECT d.id, d.status FROM {frm} WHERE {where} "
                          f"AND d.status IN ({','.join('?' * len(changes))}) ORDER BY d.id",
                          [*params, *changes]).fetchall()
        ids = [r[0] for r in rows]
        db.execute("CREATE TEMP TABLE IF NOT EXISTS api_batch (id TEXT PRIMARY KEY)" + ("" if pg else " WITHOUT ROWID"))
        db.execute(f"DELETE FROM {batch}")
        dbsql.executemany(db, f"INSERT INTO {batch} (id) VALUES (?)", [(i,) for i in ids])
        # cut off: offline now, and last seen now if it was online (presence readers follow the last_seen index)
        presence = ", last_seen = CASE WHEN online = 1 THEN ? ELSE last_seen END, online = 0" if status != "active" else ""
        if status == "active":  # never enrolled (no certificate): back to pending
            new_status = dict(db.execute(
                "UPDATE devices SET status = CASE WHEN EXISTS (SELECT 1 FROM certificates c "
                "WHERE c.device_id = devices.id) THEN 'active' ELSE 'pending' END "
                f"WHERE id IN (SELECT id FROM {batch}) RETURNING id, status").fetchall())
        else:
            db.execute(f"UPDATE devices SET status = ?{presence} WHERE id IN (SELECT id FROM {batch})",
                       [status, at])
            new_status = dict.fromkeys(ids, status)
        revoked: dict[str, list[str]] = {}
        if status == "revoked":
            for serial, device_id in db.execute(
                    "UPDATE certificates SET status = 'revoked', revoked_at = ?, revocation_reason = ? "
                    f"WHERE device_id IN (SELECT id FROM {batch}) AND status IN ('active', 'superseded') "
                    "AND not_after > ? RETURNING serial, device_id", [at, reason or "device revoked", at]).fetchall():
                revoked.setdefault(device_id, []).append(serial)
        audits, events = [], []
        for device_id, old in rows:
            detail = f"{old} -> {new_status[device_id]}" + (f"; reason: {reason}" if reason else "") + "; bulk"
            if revoked.get(device_id):
                detail += f"; revoked certificates: {', '.join(sorted(revoked[device_id]))}"
            audits.append((at, actor, f"device.{status}", device_id, "ok", detail, source))
            events.append((at, device_id, f"device {new_status[device_id]}"))
        registry.append_audit(db, audits)
        dbsql.executemany(db, "INSERT INTO authz_events (at, principal, reason) VALUES (?, ?, ?)", events)
        db.execute(f"DELETE FROM {batch}")
    return {"matched": matched, "changed": ids, "skipped": matched - len(ids),
            "revoked_certificates": sum(len(v) for v in revoked.values())}


#: Devices one POST /devices may create (one transaction).
MAX_CREATE = 10_000
_DEVICE_FIELDS = {"id", "groups", "labels"}


def _create_row(item: Any, where: str) -> tuple[str, dict, list]:
    if not isinstance(item, dict):
        raise BadRequest(f"{where} must be an object with id, groups, labels", "devices")
    unknown = set(item) - _DEVICE_FIELDS
    if unknown:
        raise BadRequest(f"{where}: unknown fields {sorted(unknown)} (a device has id, groups, labels)", "body")
    device_id = item.get("id")
    if not isinstance(device_id, str):
        raise BadRequest(f"{where}: id must be a string", "id")
    groups = item.get("groups", [])
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise BadRequest(f"{where}: groups must be a list of group names", "groups")
    labels = item.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise BadRequest(f"{where}: labels must be an object of key: value strings", "labels")
    return device_id, labels, groups


def create_devices(registry: Registry, body: Mapping[str, Any], fleet: str, now: datetime, ttl: timedelta,
                   actor: str) -> dict[str, Any]:
    """POST /devices: one device ({"id", "groups", "labels"}) or a batch ({"devices": [...]}, at most MAX_CREATE),
    all in ONE transaction (`create_devices_with_tokens`: nothing is written if one is refused). Each new device is
    'pending' with a one-time token, returned here only. BadRequest (invalid id, group or label: the validator's
    message), Conflict (an id that exists, or twice in the batch)."""
    if "devices" in body:
        if set(body) != {"devices"}:
            raise BadRequest("a batch is {\"devices\": [...]} and nothing else", "body")
        items = body["devices"]
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_CREATE:
            raise BadRequest(f"devices must be a list of 1-{MAX_CREATE} devices", "devices")
        rows = [_create_row(item, f"devices[{n}]") for n, item in enumerate(items)]
    else:
        if "id" not in body:
            raise BadRequest("the body is a device {\"id\", \"groups\", \"labels\"} or {\"devices\": [...]}",
                             "body")
        rows = [_create_row(body, "the device")]
    try:
        created = registry.create_devices_with_tokens(rows, fleet, now, ttl, actor=actor)
    except InvalidDeviceId as exc:
        raise BadRequest(str(exc), "id") from None
    except InvalidName as exc:
        raise BadRequest(str(exc), "groups" if "group" in str(exc) else "labels") from None
    except DeviceExists as exc:
        raise Conflict(str(exc)) from None
    except ValueError as exc:
        raise BadRequest(str(exc), "body") from None
    expires = _ts(now + ttl)
    return {"created": len(created), "token_expires": expires,
            "devices": [{"id": device_id, "status": "pending", "token": token} for device_id, token in created]}


def new_token(registry: Registry, device_id: str, now: datetime, ttl: timedelta, actor: str) -> dict[str, Any]:
    """POST /devices/{id}/token: a fresh one-time token (the device's unused older ones stop working)."""
    try:
        token = registry.create_token(device_id, now, ttl, actor=actor)
    except UnknownDevice as exc:
        raise NotFound(str(exc)) from None
    except DeviceNotActive as exc:
        raise Conflict(f"{exc}: only a pending or active device gets a token") from None
    return {"id": device_id, "token": token, "token_expires": _ts(now + ttl)}


def decommission(registry: Registry, device_id: str, now: datetime, actor: str, reason: str) -> dict[str, Any]:
    """DELETE /devices/{id}: `Registry.decommission` (final; the row and its audit trail stay)."""
    try:
        return registry.decommission(device_id, now, actor, reason)
    except UnknownDevice as exc:
        raise NotFound(str(exc)) from None


class _Reader:
    """Lets `queries.count` run inside an open transaction (same connection)."""

    def __init__(self, db):
        self.db = db
        self.dialect = dbsql.dialect(db)

    def query(self, sql: str, params=()) -> list[dict]:
        return list(self.db.query(sql, list(params)))
