"""Service identities and the hub's own identity in the registry: add, list, show, revoke (audited, with events).

A service identity (a back end, an operator, a console user) is a principal `svc.<name>` with one role and
certificates from the service CA. The hub itself is the identity `tessera-hub` (kind 'hub', role 'hub'), whose
current admin certificate is registered here so the broker plugin can recognise it by issuer and serial.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from hub.registry import sql as dbsql
from hub.registry.store import Registry, RegistryError, _ts, serial_hex

from .policy import DEFAULT_ROLES, GRANTABLE_ROLES, HUB_PRINCIPAL, AuthzError, check_name, service_principal

_REASON_RE = re.compile(r"[\x20-\x7e]{0,200}")


class IdentityError(RegistryError):
    code = "identity_error"


def _cert_row(identity: str, cert: x509.Certificate, now: datetime) -> dict[str, Any]:
    return {"serial": serial_hex(cert.serial_number), "identity": identity,
            "subject": cert.subject.rfc4514_string(), "not_before": _ts(cert.not_valid_before_utc),
            "not_after": _ts(cert.not_valid_after_utc), "fingerprint_sha256": cert.fingerprint(hashes.SHA256()).hex(),
            "status": "active", "grace_until": None, "revoked_at": None, "revocation_reason": None,
            "issued_at": _ts(now), "pem": cert.public_bytes(serialization.Encoding.PEM).decode()}


def check_identity_name(name: str) -> str:
    try:
        check_name(name, "identity name")
    except AuthzError as exc:
        raise IdentityError(str(exc), "invalid_name") from None
    if name == HUB_PRINCIPAL:
        raise IdentityError(f"identity name {name!r} is reserved for the hub", "invalid_name")
    return name


def check_role(registry: Registry, role: str) -> str:
    """A role a service identity may hold: a grantable built-in one, or a role an operator added to the registry."""
    if role in GRANTABLE_ROLES:
        return role
    if role in DEFAULT_ROLES:
        raise IdentityError(f"role {role!r} cannot be granted to a service identity "
                            f"(grantable: {', '.join(GRANTABLE_ROLES)})", "unknown_role")
    if not registry.query("SELECT 1 FROM roles WHERE name = ? AND description != 'built-in'", [role]):
        raise IdentityError(f"unknown role {role!r} (grantable: {', '.join(GRANTABLE_ROLES)})", "unknown_role")
    return role


def _check_cert_for(cert: x509.Certificate, principal: str) -> None:
    """The certificate must name this principal (and only it) as its CN: the broker's view joins on the serial,
    but every tool that reads the subject must see the same principal."""
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns != [principal]:
        raise IdentityError(f"certificate subject {cert.subject.rfc4514_string()!r} does not name {principal!r}",
                            "cert_mismatch")


def check_reason(reason: str) -> str:
    """A revocation reason: up to 200 printable ASCII characters (it goes into the audit log and the CRL)."""
    if not isinstance(reason, str) or not _REASON_RE.fullmatch(reason):
        raise IdentityError("revocation reason must be at most 200 printable ASCII characters", "invalid_reason")
    return reason


def add_identity(registry: Registry, name: str, role: str, cert: x509.Certificate, now: datetime,
                 actor: str = "cli", description: str = "") -> dict[str, Any]:
    """Record a new service identity with its first certificate (issued by the caller from the service CA)."""
    check_identity_name(name)
    check_role(registry, role)
    _check_cert_for(cert, service_principal(name))
    with registry.write() as db:
        if db.execute("SELECT 1 FROM identities WHERE name = ?", [name]).fetchone():
            raise IdentityError(f"identity {name!r} already exists", "identity_exists")
        if db.execute("SELECT 1 FROM identity_certificates WHERE serial = ?",
                      [serial_hex(cert.serial_number)]).fetchone():
            raise IdentityError(f"certificate serial {serial_hex(cert.serial_number)} is already registered",
                                "cert_exists")
        dbsql.insert(db, "identities", {"name": name, "kind": "service", "role": role, "status": "active",
                                        "created": _ts(now), "revoked_at": None, "description": description})
        dbsql.insert(db, "identity_certificates", _cert_row(name, cert, now))
        registry._audit_row(db, "identity.add", "ok", now, actor, None,
                            f"identity={service_principal(name)} role={role} serial={serial_hex(cert.serial_number)}")
    return get_identity(registry, name)


def ensure_hub_identity(registry: Registry, cert: x509.Certificate, now: datetime) -> bool:
    """Register the hub's admin certificate as the current credential of the `tessera-hub` identity.

    Idempotent; a new admin certificate supersedes the old one at once. Returns True if anything changed."""
    serial = serial_hex(cert.serial_number)
    with registry.write() as db:
        if db.execute("SELECT 1 FROM identity_certificates WHERE serial = ? AND identity = ? AND status = 'active'",
                      [serial, HUB_PRINCIPAL]).fetchone():
            return False
        db.execute("INSERT INTO identities (name, kind, role, status, created, description) "
                   "VALUES (?, 'hub', 'hub', 'active', ?, 'the hub itself') ON CONFLICT DO NOTHING",
                   [HUB_PRINCIPAL, _ts(now)])
        db.execute("UPDATE identity_certificates SET status = 'superseded', grace_until = ? "
                   "WHERE identity = ? AND status = 'active'", [_ts(now), HUB_PRINCIPAL])
        db.execute("DELETE FROM identity_certificates WHERE serial = ?", [serial])
        dbsql.insert(db, "identity_certificates", _cert_row(HUB_PRINCIPAL, cert, now))
        registry._audit_row(db, "identity.hub", "ok", now, "hub", None, f"hub admin certificate serial={serial}")
        registry.authz_event(db, HUB_PRINCIPAL, "hub certificate", now)
    return True


def get_identity(registry: Registry, name: str) -> dict[str, Any]:
    rows = registry.query("SELECT name, kind, role, status, created, revoked_at, description FROM identities "
                          "WHERE name = ?", [name])
    if not rows:
        raise IdentityError(f"no identity {name!r}", "unknown_identity")
    ident = rows[0]
    ident["principal"] = name if ident["kind"] == "hub" else service_principal(name)
    ident["certificates"] = registry.query(
        "SELECT serial, subject, not_before, not_after, fingerprint_sha256, status, revoked_at, revocation_reason, "
        "issued_at FROM identity_certificates WHERE identity = ? ORDER BY issued_at DESC", [name])
    return ident


def list_identities(registry: Registry) -> list[dict[str, Any]]:
    return registry.query(
        "SELECT i.name, i.kind, i.role, i.status, i.created, (SELECT MAX(c.not_after) FROM identity_certificates c "
        "WHERE c.identity = i.name AND c.status = 'active') AS cert_not_after FROM identities i ORDER BY i.name")


def revoke_identity(registry: Registry, name: str, now: datetime, actor: str = "cli",
                    reason: str = "") -> dict[str, Any]:
    """Revoke a service identity and all its certificates (final). The broker cuts its sessions off at once."""
    check_identity_name(name)
    check_reason(reason)
    at = _ts(now)
    with registry.write() as db:
        row = db.execute("SELECT status, kind FROM identities WHERE name = ?", [name]).fetchone()
        if row is None:
            raise IdentityError(f"no identity {name!r}", "unknown_identity")
        if row[0] == "revoked":
            raise IdentityError(f"identity {name!r} is already revoked; revocation is final", "identity_revoked")
        db.execute("UPDATE identities SET status = 'revoked', revoked_at = ? WHERE name = ?", [at, name])
        serials = [r[0] for r in db.execute(
            "UPDATE identity_certificates SET status = 'revoked', revoked_at = ?, revocation_reason = ? "
            "WHERE identity = ? AND status != 'revoked' RETURNING serial", [at, reason or "identity revoked", name])]
        registry._audit_row(db, "identity.revoke", "ok", now, actor, None,
                            f"identity={service_principal(name)}; certificates: {', '.join(sorted(serials))}"
                            + (f"; reason: {reason}" if reason else ""))
        registry.authz_event(db, service_principal(name), "identity revoked", now)
    return get_identity(registry, name)


def revoked_identity_certificates(registry: Registry, now: datetime) -> list[dict[str, Any]]:
    """Unexpired revoked service-side certificates, for the service CRL."""
    return registry.query("SELECT serial, revoked_at, revocation_reason AS reason FROM identity_certificates "
                          "WHERE status = 'revoked' AND not_after > ? ORDER BY serial", [_ts(now)])
