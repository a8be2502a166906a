"""The registry-side authorization decisions in Python: who is admitted and with which rights (no broker code).

The Mosquitto plugin (hub/broker/mosquitto/tessera_authz.c) makes these decisions in C from the same registry
rows (hub/authz/schema.py: CREDENTIAL_QUERY, RULES_QUERY); the RabbitMQ auth back end (hub/broker/rabbitmq/auth.py)
makes them here. `credential_refusal` is the plugin's function of the same name, word for word; a change to
either must be made to both (tests/integration/test_rabbitmq_authz.py runs one table of cases against both).
Reads only; `now` is passed in. `db` is a stdlib sqlite3 connection (the back end's read-only one on a SQLite
registry) or anything with the registry's `query(sql, params)` (a PgDb on PostgreSQL); the query texts are the
plugin's, `?1`-numbered, and each number is used once in order, so plain `?` means the same on the other side.
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass
from datetime import datetime
from typing import Mapping

from hub.registry.store import _ts

from .policy import Grants, client_id_allowed, expand
from .schema import CREDENTIAL_QUERY, RULES_QUERY

#: Every credential row of one principal (the RabbitMQ back end is told a name, never a certificate serial).
PRINCIPAL_CREDENTIALS = ("SELECT principal, kind, role, cert_status, principal_status, not_before, not_after, "
                         "grace_until, groups, serial FROM authz_credentials WHERE principal = ?1")


_NUMBERED = re.compile(r"\?\d+")


def _rows(db, sql: str, params: list) -> list[Mapping]:
    if isinstance(db, sqlite3.Connection):
        db.row_factory = sqlite3.Row
        return db.execute(sql, params).fetchall()
    return list(db.query(_NUMBERED.sub("?", sql), params))


@dataclass(frozen=True)
class Principal:
    name: str
    kind: str      # device, service or hub
    role: str
    groups: tuple[str, ...]
    grants: Grants


def credential_refusal(row: Mapping[str, str | None], now: str, active_serial: str | None = None,
                       serial: str | None = None) -> str | None:
    """Why the certificate with authz_credentials `row` may not be used at `now` (a stored timestamp), or None.

    `active_serial`: the certificate the principal last connected with while it was active (the plugin's
    per-broker memory); a superseded certificate is refused once another one connected."""
    if row["principal_status"] != "active":
        return "suspended" if row["principal_status"] == "suspended" else "revoked"
    if row["cert_status"] == "superseded":
        if (row["grace_until"] or "") <= now:
            return "superseded"
        if active_serial and serial and active_serial != serial:
            return "superseded"
    elif row["cert_status"] != "active":
        return "revoked"
    if (row["not_before"] or "") > now:
        return "not yet valid"
    if (row["not_after"] or "") <= now:
        return "expired"
    return None


def connect(db, issuer: str, serial: str, cn: str, client_id: str | None,
            now: datetime) -> tuple[Principal | None, str | None]:
    """The plugin's connect decision for a verified certificate (issuer 'device' or 'service', serial in hex):
    (principal, None) if admitted, (None, reason) if not. The rate limit is the broker's, not here."""
    found = _rows(db, CREDENTIAL_QUERY, [issuer, serial])
    if not found:
        return None, "unknown certificate"
    row = found[0]
    reason = credential_refusal(row, _ts(now))
    if reason is None and cn != row["principal"]:
        reason = "certificate CN mismatch"
    if reason is None and client_id != row["principal"]:
        reason = "client id mismatch"
    if reason:
        return None, reason
    return _principal(db, row), None


def by_credential(db, issuer: str, serial: str, client_id: str | None, now: datetime,
                  active_serial: str | None = None) -> tuple[Principal | None, str | None, Mapping | None]:
    """The connect decision for a credential named by its URI (hub/ca/credential.py: a broker that passes one name
    for the verified certificate): `connect` without the CN comparison, since the issuing CA bound the URI to the
    certificate. (principal, None, row) if admitted, (None, reason, row or None) if not; `active_serial` as in
    credential_refusal."""
    found = _rows(db, CREDENTIAL_QUERY, [issuer, serial])
    if not found:
        return None, "unknown certificate", None
    row = found[0]
    reason = credential_refusal(row, _ts(now), active_serial, serial)
    if reason is None and client_id is not None and not client_id_allowed(row["principal"], client_id):
        reason = "client id mismatch"
    if reason:
        return None, reason, row
    return _principal(db, row), None, row


def by_name(db, name: str, now: datetime) -> tuple[Principal | None, str | None]:
    """Admission by principal name alone (what a broker that only passes the certificate's CN can ask): the
    principal must be active and hold at least one usable certificate; which one was presented is the TLS
    listener's business (its CRL holds the revoked and spent superseded ones, hub/broker/rabbitmq/crl.py)."""
    rows = _rows(db, PRINCIPAL_CREDENTIALS, [name])
    if not rows:
        return None, "unknown principal"
    at = _ts(now)
    reasons = [credential_refusal(r, at) for r in rows]
    usable = [r for r, why in zip(rows, reasons) if why is None]
    if not usable:
        order = ("revoked", "suspended", "superseded", "expired", "not yet valid")
        return None, min(reasons, key=lambda r: order.index(r) if r in order else len(order))
    return _principal(db, usable[0]), None


def superseded_in_grace(db, name: str, now: datetime) -> list[Mapping]:
    """The principal's superseded certificates whose grace is not over at `now` (serial and grace_until)."""
    at = _ts(now)
    return [r for r in _rows(db, PRINCIPAL_CREDENTIALS, [name])
            if r["cert_status"] == "superseded" and (r["grace_until"] or "") > at]


def credentials_of(db, name: str) -> list[Mapping]:
    """Every certificate row of the principal (issuer, serial, cert_status): what a kick by credential closes."""
    return _rows(db, "SELECT issuer, serial, cert_status FROM authz_credentials WHERE principal = ?1", [name])


def _principal(db, row: Mapping) -> Principal:
    groups = tuple(g for g in json.loads(row["groups"] or "[]") if isinstance(g, str))
    rules = [(r["action"], r["pattern"]) for r in _rows(db, RULES_QUERY, [row["role"]])]
    return Principal(row["principal"], row["kind"], row["role"], groups, expand(rules, row["principal"], groups))
