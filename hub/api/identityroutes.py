"""The fleet API's service identity routes (list, show, add from a CSR, revoke) and the hub directory's own local
operator identity (`svc.local-admin`, what the CLI on the hub's machine authenticates with).

Add takes a CSR, not a key request: the private key is made where it will be used (the CLI, or a PKCS#11 token
through its key worker) and never crosses the network or exists on the hub; the CSR only proves possession, the hub
decides every field of the certificate (CN=svc.<name>, O=<fleet>, clientAuth, the lifetime). Writes need `admin`.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web

from hub.authz.identities import IdentityError, add_identity, check_identity_name, get_identity, list_identities
from hub.authz.identities import revoke_identity
from hub.authz.policy import service_principal
from hub.registry import sql as dbsql
from hub.registry.store import Registry, _ts, serial_hex

from .openapi import NAME_PATTERN, REASON
from .queries import BadRequest, Conflict, NotFound
from .routing import PREFIX, Param, Route, check_reason, json_body, json_response, query_params

LOCAL_OPERATOR = "local-admin"
LOCAL_ROLE = "admin"
LOCAL_VALIDITY = timedelta(days=825)
LOCAL_RENEW_BEFORE = timedelta(days=30)
MAX_DAYS = 3650
MAX_CSR = 16 * 1024
_IDENTITY_ACTIONS = ("identity.add", "identity.revoke", "identity.renew")


# --- issuing (shared by the route and the local operator) -------------------------------------------------------

def _issue(ca, principal: str, public_key, now: datetime, lifetime: timedelta):
    from hub.ca.authority import CaError

    try:
        return ca.issue_identity_cert(public_key, principal, now, lifetime)
    except CaError as exc:
        raise BadRequest(str(exc), "csr") from None


def _public_key_of(csr_pem: Any):
    from cryptography import x509

    if not isinstance(csr_pem, str) or not 0 < len(csr_pem) <= MAX_CSR:
        raise BadRequest(f"csr must be a PEM certificate request of at most {MAX_CSR} characters", "csr")
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode("ascii"))
        valid = csr.is_signature_valid
    except (ValueError, UnicodeEncodeError, TypeError, x509.InvalidVersion):
        raise BadRequest("csr is not a PEM certificate request", "csr") from None
    if not valid:
        raise BadRequest("csr signature does not verify (the CSR must prove possession of the key)", "csr")
    try:
        return csr.public_key()
    except Exception:  # noqa: BLE001  (an unsupported key algorithm)
        raise BadRequest("csr holds an unsupported public key (use EC P-256/P-384 or RSA >= 2048)", "csr") from None


def create_identity(cfg, ca, registry: Registry, body: dict, now: datetime, actor: str) -> dict[str, Any]:
    """POST /identities: check everything, issue from the service CA, record (one transaction)."""
    from cryptography.hazmat.primitives import serialization

    unknown = set(body) - {"name", "role", "days", "csr", "description"}
    if unknown:
        raise BadRequest(f"unknown fields {sorted(unknown)} (an identity has name, role, days, csr)", "body")
    name, role, days = body.get("name"), body.get("role"), body.get("days", 365)
    if not isinstance(name, str):
        raise BadRequest("name must be a string", "name")
    if not isinstance(role, str):
        raise BadRequest("role must be a string", "role")
    if isinstance(days, float) and days.is_integer():
        days = int(days)
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise BadRequest(f"days must be an integer 1-{MAX_DAYS}", "days")
    description = body.get("description", "")
    if not isinstance(description, str) or len(description) > 200 or not description.isprintable():
        raise BadRequest("description must be at most 200 printable characters", "description")
    from hub.authz.identities import check_role

    try:
        check_identity_name(name)
        check_role(registry, role)
    except IdentityError as exc:
        raise BadRequest(str(exc), "name" if exc.code == "invalid_name" else "role") from None
    if registry.query("SELECT 1 FROM identities WHERE name = ?", [name]):
        raise Conflict(f"identity {name!r} already exists")
    public = _public_key_of(body.get("csr"))
    cert = _issue(ca, service_principal(name), public, now, timedelta(days=days))
    try:
        ident = add_identity(registry, name, role, cert, now, actor=actor, description=description)
    except IdentityError as exc:
        raise Conflict(str(exc)) from None
    pem = serialization.Encoding.PEM
    return {**ident, "serial": serial_hex(cert.serial_number), "subject": cert.subject.rfc4514_string(),
            "not_after": _ts(cert.not_valid_after_utc), "certificate": cert.public_bytes(pem).decode(),
            "chain": (cfg.ca_dir / "service-ca.pem").read_text(), "root": (cfg.ca_dir / "root.pem").read_text()}


def ensure_local_operator(cfg, ca, registry: Registry, now: datetime) -> bool:
    """The hub directory's operator identity svc.local-admin (role admin; svc.local-admin-<hub-id> on a joined hub:
    HubConfig.local_operator): its key and certificate in tls/local-admin.{key,pem} (0600), its certificate current in the
    registry. Made when missing, re-issued when
    it expires within 30 days or no longer matches the registry; an operator's revocation of it is final (left
    alone). Returns True if anything changed."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from hub.ca.authority import _write_new, new_file_key

    from .auditroutes import apply_schema

    apply_schema(registry)
    cert_path, key_path = cfg.tls_dir / f"{LOCAL_OPERATOR}.pem", cfg.tls_dir / f"{LOCAL_OPERATOR}.key"
    name = cfg.local_operator
    rows = registry.query("SELECT status FROM identities WHERE name = ?", [name])
    if rows and rows[0]["status"] != "active":
        return False
    if rows and cert_path.exists() and key_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            current = registry.query("SELECT 1 FROM identity_certificates WHERE identity = ? AND serial = ? AND "
                                     "status = 'active'", [name, serial_hex(cert.serial_number)])
            if current and cert.not_valid_after_utc - now > LOCAL_RENEW_BEFORE:
                return False
        except ValueError:
            pass
    cfg.tls_dir.mkdir(mode=0o700, exist_ok=True)
    tmp_key = key_path.with_name(key_path.name + ".new")
    tmp_key.unlink(missing_ok=True)
    key = new_file_key(tmp_key, "ec-p256")
    cert = _issue(ca, service_principal(name), key.public_key(), now, LOCAL_VALIDITY)
    tmp_cert = cert_path.with_name(cert_path.name + ".new")
    tmp_cert.unlink(missing_ok=True)
    _write_new(tmp_cert, cert.public_bytes(serialization.Encoding.PEM)
               + (cfg.ca_dir / "service-ca.pem").read_bytes(), 0o600)
    if not rows:
        add_identity(registry, name, LOCAL_ROLE, cert, now, actor="hub",
                     description="the hub directory's local operator (the CLI on this machine)")
    else:
        _renew(registry, name, cert, now)
    os.replace(tmp_key, key_path)
    os.replace(tmp_cert, cert_path)
    return True


def _renew(registry: Registry, name: str, cert, now: datetime) -> None:
    from hub.authz.identities import _cert_row

    serial = serial_hex(cert.serial_number)
    with registry.write() as db:
        db.execute("UPDATE identity_certificates SET status = 'superseded', grace_until = ? "
                   "WHERE identity = ? AND status = 'active'", [_ts(now), name])
        dbsql.insert(db, "identity_certificates", _cert_row(name, cert, now))
        registry._audit_row(db, "identity.renew", "ok", now, "hub", None,  # noqa: SLF001
                            f"identity={service_principal(name)} serial={serial}")
        registry.authz_event(db, service_principal(name), "identity certificate renewed", now)


# --- handlers -------------------------------------------------------------------------------------------------------

def _principal(row: dict) -> dict:
    return {**row, "principal": row["name"] if row["kind"] == "hub" else service_principal(row["name"])}


def _identity_audit(registry: Registry, principal: str, limit: int = 20) -> list[dict]:
    marks = ",".join("?" * len(_IDENTITY_ACTIONS))  # identity rows name the principal at the start of the detail
    head = f"identity={principal}"  # then ' ' or ';' (an exact prefix: LIKE's case rule differs between dialects)
    return registry.query(f"SELECT * FROM audit WHERE action IN ({marks}) AND substr(detail, 1, ?) IN (?, ?) "
                          "ORDER BY id DESC LIMIT ?",
                          [*_IDENTITY_ACTIONS, len(head) + 1, f"{head} ", f"{head};", limit])


def _show(registry: Registry, name: str) -> dict:
    try:
        ident = get_identity(registry, name)
    except IdentityError as exc:
        raise NotFound(str(exc)) from None
    ident["audit"] = _identity_audit(registry, ident["principal"])
    return ident


def _name(request: web.Request) -> str:
    name = request.match_info["name"]
    try:
        check_identity_name(name) if name != "tessera-hub" else None
    except IdentityError as exc:
        raise BadRequest(str(exc), "name") from None
    return name


async def list_all(api, request: web.Request, principal) -> web.Response:
    if query_params(request):
        raise BadRequest("GET /identities takes no parameters", sorted(request.query)[0])
    rows = await api.run(list_identities, api.registry)
    return json_response({"items": [_principal(r) for r in rows]})


async def show(api, request: web.Request, principal) -> web.Response:
    return json_response(await api.run(_show, api.registry, _name(request)))


async def create(api, request: web.Request, principal) -> web.Response:
    body = await json_body(request)
    result = await api.run(create_identity, api.cfg, api.live.ca, api.registry, body, api.clock(), principal.name)
    return json_response(result, status=201)


def _revoke(registry: Registry, name: str, now: datetime, actor: str, reason: str) -> dict:
    try:
        return revoke_identity(registry, name, now, actor=actor, reason=reason)
    except IdentityError as exc:
        if exc.code == "unknown_identity":
            raise NotFound(str(exc)) from None
        if exc.code == "identity_revoked":
            raise Conflict(str(exc)) from None
        raise BadRequest(str(exc), "reason") from None


async def revoke(api, request: web.Request, principal) -> web.Response:
    from hub.broker import BrokerError

    name = _name(request)
    if name == "tessera-hub":
        raise Conflict("the hub's own identity cannot be revoked here (re-initialise its admin certificate)")
    body = await json_body(request)
    unknown = set(body) - {"reason"}
    if unknown:
        raise BadRequest(f"unknown fields {sorted(unknown)} (a revocation takes a reason)", "body")
    reason = check_reason(body.get("reason", ""))
    ident = await api.run(_revoke, api.registry, name, api.clock(), principal.name, reason)
    revoked = sum(1 for c in ident["certificates"] if c["revoked_at"] == ident["revoked_at"])
    api.live.crl.changed()
    kicked, ms, note = None, None, None
    try:  # the doorbell: the plugin also finds the change by itself within a broker tick
        result = await api.run(api.live.broker.sync)
        kicked, ms = result.kicked, result.seconds * 1000
    except BrokerError as exc:
        note = str(exc)
    return json_response({**ident, "revoked_certificates": revoked, "sessions_cut": kicked, "sync_ms": ms,
                          "broker_note": note})


# --- the table ------------------------------------------------------------------------------------------------------

_NAME = Param("name", "path", {"type": "string"}, "identity name (the principal is svc.NAME)", required=True)
_STR = {"type": "string"}
_NULLABLE = {"type": ["string", "null"]}
_CERT = {"type": "object", "properties": {k: _NULLABLE for k in (
    "serial", "subject", "not_before", "not_after", "fingerprint_sha256", "status", "revoked_at",
    "revocation_reason", "issued_at")}}
_IDENTITY = {"type": "object", "required": ["name", "kind", "role", "status", "principal"],
             "properties": {"name": _STR, "kind": _STR, "role": _STR, "status": _STR, "principal": _STR,
                            "created": _STR, "revoked_at": _NULLABLE, "cert_not_after": _NULLABLE,
                            "description": _STR, "certificates": {"type": "array", "items": _CERT},
                            "audit": {"type": "array", "items": {"type": "object"}}}}
SCHEMAS: dict[str, dict] = {
    "Identity": _IDENTITY,
    "IdentityList": {"type": "object", "required": ["items"],
                     "properties": {"items": {"type": "array", "items": {"$ref": "#/components/schemas/Identity"}}}},
    "IdentityCreate": {
        "type": "object", "required": ["name", "role", "csr"], "additionalProperties": False,
        "properties": {"name": {"type": "string", "pattern": NAME_PATTERN}, "role": {"type": "string"},
                       "days": {"type": "integer", "minimum": 1, "maximum": MAX_DAYS, "default": 365},
                       "csr": {"type": "string", "maxLength": MAX_CSR, "description": "PEM PKCS#10 request"},
                       "description": {"type": "string", "maxLength": 200}}},
    "IdentityCreated": {"allOf": [{"$ref": "#/components/schemas/Identity"}, {
        "type": "object", "required": ["serial", "certificate", "chain", "root"],
        "properties": {"serial": _STR, "subject": _STR, "not_after": _STR,
                       "certificate": {"type": "string", "description": "PEM, the new certificate"},
                       "chain": {"type": "string", "description": "PEM, the service CA"},
                       "root": {"type": "string", "description": "PEM, the fleet root"}}}]},
    "IdentityRevoke": {"type": "object", "additionalProperties": False, "properties": {"reason": REASON}},
    "IdentityRevoked": {"allOf": [{"$ref": "#/components/schemas/Identity"}, {
        "type": "object", "properties": {"revoked_certificates": {"type": "integer"},
                                         "sessions_cut": {"type": ["integer", "null"]},
                                         "sync_ms": {"type": ["number", "null"]},
                                         "broker_note": _NULLABLE}}]},
}

ROUTES: tuple[Route, ...] = (
    Route("GET", f"{PREFIX}/identities", "identities.list", "read",
          "Service identities (and the hub's own): principal, role, status, certificate expiry", list_all,
          response="IdentityList", errors=(400, 403)),
    Route("POST", f"{PREFIX}/identities", "identities.create", "admin",
          "Add a service identity: the hub issues its client certificate from the service CA for the CSR's key "
          "(the key never leaves the caller)", create, body="IdentityCreate", response="IdentityCreated",
          errors=(400, 403, 409), success=201),
    Route("GET", f"{PREFIX}/identities/{{name}}", "identities.show", "read",
          "One identity: role, status, certificates, recent audit entries", show, params=(_NAME,),
          response="Identity", errors=(400, 403, 404)),
    Route("POST", f"{PREFIX}/identities/{{name}}/revoke", "identities.revoke", "admin",
          "Revoke a service identity for good: its certificates are revoked, the broker cuts its sessions",
          revoke, params=(_NAME,), body="IdentityRevoke", response="IdentityRevoked",
          errors=(400, 403, 404, 409)),
)
