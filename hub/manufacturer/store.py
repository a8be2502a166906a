"""Manufacturer CAs and the birth-certificate allowlist in the registry: add, list, remove, import a batch, allow
a re-provisioning, and the enrollment that spends a birth certificate and records the operational certificate
(on the registry's issuing path, Registry._issuing, like token enrollment).

Every change is one write transaction of the registry (BEGIN IMMEDIATE on SQLite, the advisory write lock on
PostgreSQL; the same statements on both) with its audit row (hub/registry/audit.py's chain). A batch is all or
nothing: an unknown manufacturer, a malformed row, a serial or device id already known, or one twice in the batch
writes nothing at all. Time is passed in, never read here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from hub.ca.policy import PolicyError, check_device_id
from hub.registry.errors import DeviceExists, RegistryError
from hub.registry.schema import ENROLLABLE_STATUSES, EST_ACTOR
from hub.registry.sql import executemany
from hub.registry.store import Registry, _ts

from .schema import apply_schema

#: A manufacturer's name: like a device id (it is shown, audited and used in paths).
NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
#: A device serial number as 802.1AR puts it in the subject's serialNumber: printable, no spaces, <= 64.
SERIAL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+-]{0,63}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
MAX_BATCH = 10_000
MAX_CA_PEM = 16 * 1024


class ManufacturerError(RegistryError):
    """A manufacturer or batch request the registry refuses (the message is safe to show); `code` says which."""


class BirthRejected(RegistryError):
    """A birth certificate that may not enroll now; `code` is the precise reason (for the audit only), `device_id`
    the device the allowlist maps it to (None when it is not on the allowlist)."""

    def __init__(self, message: str, code: str, device_id: str | None = None) -> None:
        super().__init__(message, code)
        self.device_id = device_id


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ManufacturerError(f"invalid manufacturer name {str(name)[:80]!r}: use 1-63 characters a-z, 0-9 and "
                                "'-', starting with a letter or digit", code="bad_name")
    return name


def check_serial(serial: object) -> str:
    if not isinstance(serial, str) or not SERIAL_RE.fullmatch(serial):
        raise ManufacturerError(f"invalid serial number {str(serial)[:80]!r}: 1-64 of A-Z a-z 0-9 . _ : / + -, "
                                "starting with a letter or digit", code="bad_serial")
    return serial


def load_ca(pem: object, fleet_cas: Iterable[x509.Certificate] = ()) -> x509.Certificate:
    """The manufacturer CA certificate from PEM: one CA certificate (basicConstraints cA, keyCertSign), signed by
    its own key if self-signed, and none of the fleet's own CAs (a fleet CA must never vouch for births)."""
    if not isinstance(pem, str) or not 0 < len(pem) <= MAX_CA_PEM:
        raise ManufacturerError(f"the CA must be one PEM certificate of at most {MAX_CA_PEM} characters",
                                code="bad_ca")
    try:
        certs = x509.load_pem_x509_certificates(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise ManufacturerError("the CA is not a PEM certificate", code="bad_ca") from None
    if len(certs) != 1:
        raise ManufacturerError(f"the CA file holds {len(certs)} certificates; give the one CA that signs the "
                                "birth certificates", code="bad_ca")
    ca = certs[0]
    try:
        bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise ManufacturerError("the certificate is not a CA certificate (no basicConstraints / keyUsage)",
                                code="bad_ca") from None
    if not bc.ca or not ku.key_cert_sign:
        raise ManufacturerError("the certificate is not a CA certificate (cA false or no keyCertSign)", code="bad_ca")
    own = {spki(c) for c in fleet_cas}
    if spki(ca) in own:
        raise ManufacturerError("that is one of this fleet's own CAs, not a manufacturer's", code="fleet_ca")
    return ca


def spki(holder: x509.Certificate | x509.CertificateSigningRequest) -> bytes:
    """The DER SubjectPublicKeyInfo of a certificate's or a CSR's key (to compare keys)."""
    return holder.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def add_manufacturer(registry: Registry, name: str, ca: x509.Certificate, now: datetime, actor: str,
                     source: str | None = None) -> dict[str, Any]:
    """Trust `ca` for birth certificates under `name`. Conflict ('exists') for a taken name or a CA already added."""
    apply_schema(registry)
    check_name(name)
    row = {"name": name, "ca_pem": ca.public_bytes(serialization.Encoding.PEM).decode(), "ca_sha256": fingerprint(ca),
           "subject": ca.subject.rfc4514_string(), "added": _ts(now), "added_by": actor}
    with registry.write() as db:
        taken = next(db.query("SELECT name FROM manufacturers WHERE name = ? OR ca_sha256 = ?",
                              [name, row["ca_sha256"]]), None)
        if taken:
            what = "name" if taken["name"] == name else f"CA (as {taken['name']!r})"
            raise ManufacturerError(f"a manufacturer with that {what} exists already", code="exists")
        db.execute("INSERT INTO manufacturers (name, ca_pem, ca_sha256, subject, added, added_by) "
                   "VALUES (?, ?, ?, ?, ?, ?)", [row[k] for k in ("name", "ca_pem", "ca_sha256", "subject", "added",
                                                               "added_by")])
        registry.append_audit(db, [(row["added"], actor, "manufacturer.add", None, "ok",
                                    f"{name}: CA {row['subject']} sha256 {row['ca_sha256']}", source)])
    return public(row)


def public(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("name", "subject", "ca_sha256", "added", "added_by")}


def list_manufacturers(registry: Registry) -> list[dict[str, Any]]:
    """Every manufacturer with its allowlist counts (expected, used, allowed to re-provision)."""
    apply_schema(registry)
    return registry.query(
        "SELECT m.name, m.subject, m.ca_sha256, m.added, m.added_by, "
        "(SELECT COUNT(*) FROM births b WHERE b.manufacturer = m.name) AS births, "
        "(SELECT COUNT(*) FROM births b WHERE b.manufacturer = m.name AND b.used_at IS NOT NULL) AS used "
        "FROM manufacturers m ORDER BY m.name")


def trusted(registry: Registry) -> list[tuple[str, x509.Certificate]]:
    """(name, CA certificate) of every manufacturer, for the EST listener's trust and the idevid method."""
    apply_schema(registry)
    return [(r["name"], x509.load_pem_x509_certificate(r["ca_pem"].encode()))
            for r in registry.query("SELECT name, ca_pem FROM manufacturers ORDER BY name")]


def trust_version(registry: Registry) -> tuple[tuple[str, str], ...]:
    """Changes whenever a manufacturer is added or removed (cheap: polled by every EST worker, a handful of rows)."""
    apply_schema(registry)
    return tuple((r["name"], r["ca_sha256"])
                 for r in registry.query("SELECT name, ca_sha256 FROM manufacturers ORDER BY name"))


def remove_manufacturer(registry: Registry, name: str, now: datetime, actor: str,
                        source: str | None = None) -> dict[str, Any]:
    """Stop trusting `name`'s CA: the manufacturer and its allowlist go in one transaction with one audit row, so
    a birth enrollment under it that has not committed yet is refused (its allowlist row is gone); devices that
    enrolled through it keep their devices rows and certificates; devices of its batches that never enrolled stay
    pending (counted in the answer: give them a token or decommission them). ManufacturerError 'unknown'."""
    apply_schema(registry)
    check_name(name)
    with registry.write() as db:
        row = next(db.query("SELECT * FROM manufacturers WHERE name = ?", [name]), None)
        if row is None:
            raise ManufacturerError(f"no manufacturer {name!r}", code="unknown")
        counts = next(db.query(
            "SELECT COUNT(*) AS births, COUNT(b.used_at) AS used, "
            "COALESCE(SUM(CASE WHEN d.status = 'pending' THEN 1 ELSE 0 END), 0) AS pending "
            "FROM births b JOIN devices d ON d.id = b.device_id WHERE b.manufacturer = ?", [name]))
        counts = {k: int(v) for k, v in counts.items()}  # (PostgreSQL's SUM is a Decimal)
        db.execute("DELETE FROM births WHERE manufacturer = ?", [name])
        db.execute("DELETE FROM manufacturers WHERE name = ?", [name])
        registry.append_audit(db, [(_ts(now), actor, "manufacturer.remove", None, "ok",
                                    f"{name}: CA {row['subject']} sha256 {row['ca_sha256']}; {counts['births']} "
                                    f"birth certificates dropped ({counts['used']} enrolled, {counts['pending']} "
                                    "devices left pending)", source)])
    return {"name": name, "subject": row["subject"], "ca_sha256": row["ca_sha256"], **counts}


def _batch_row(raw: Mapping[str, Any], n: int) -> tuple[str, str, str | None]:
    if not isinstance(raw, Mapping):
        raise ManufacturerError(f"row {n}: must be an object with serial and device_id", code="bad_batch")
    unknown = set(raw) - {"serial", "device_id", "cert_sha256"}
    if unknown:
        raise ManufacturerError(f"row {n}: unknown fields {sorted(unknown)}", code="bad_batch")
    serial = check_serial(raw.get("serial"))
    device_id = raw.get("device_id") or serial.lower()
    try:
        check_device_id(device_id)
    except (PolicyError, TypeError) as exc:
        raise ManufacturerError(f"row {n}: {exc}", code="bad_batch") from None
    digest = raw.get("cert_sha256") or None
    if digest is not None and (not isinstance(digest, str) or not SHA256_RE.fullmatch(digest.lower())):
        raise ManufacturerError(f"row {n}: cert_sha256 must be 64 hex digits", code="bad_batch")
    return serial, device_id, digest and digest.lower()


def import_batch(registry: Registry, name: str, batch: str, rows: Iterable[Mapping[str, Any]], fleet: str,
                 now: datetime, actor: str, source: str | None = None) -> dict[str, Any]:
    """Allowlist a factory batch of `name`'s birth certificates: for each row (serial, device_id — default the
    serial in lower case —, cert_sha256 optional) a pending device and its allowlist entry, in ONE transaction
    with one audit row per device. Raises ManufacturerError (unknown manufacturer 'unknown', bad rows
    'bad_batch'), DeviceExists; nothing is written then."""
    apply_schema(registry)
    check_name(name)
    if not isinstance(batch, str) or not NAME_RE.fullmatch(batch):
        raise ManufacturerError("the batch name must be 1-63 characters a-z, 0-9 and '-'", code="bad_batch")
    parsed = [_batch_row(raw, n) for n, raw in enumerate(rows, 1)]
    if not parsed or len(parsed) > MAX_BATCH:
        raise ManufacturerError(f"a batch has 1-{MAX_BATCH} rows, not {len(parsed)}", code="bad_batch")
    for what, values in (("serial", [p[0] for p in parsed]), ("device id", [p[1] for p in parsed])):
        if len(set(values)) != len(values):
            dup = next(v for n, v in enumerate(values) if v in values[:n])
            raise ManufacturerError(f"{what} {dup!r} appears twice in the batch", code="bad_batch")
    at = _ts(now)
    with registry.write() as db:
        if not next(db.query("SELECT 1 FROM manufacturers WHERE name = ?", [name]), None):
            raise ManufacturerError(f"no manufacturer {name!r} (add it first: manufacturer add)", code="unknown")
        for start in range(0, len(parsed), 500):
            part = parsed[start:start + 500]
            marks = ",".join("?" * len(part))
            taken = next(db.query(f"SELECT serial FROM births WHERE manufacturer = ? AND serial IN ({marks}) LIMIT 1",
                                  [name, *[p[0] for p in part]]), None)
            if taken:
                raise ManufacturerError(f"serial {taken['serial']!r} of {name} is allowlisted already",
                                        code="exists")
            taken = next(db.query(f"SELECT id FROM devices WHERE id IN ({marks}) LIMIT 1", [p[1] for p in part]),
                         None)
            if taken:
                raise DeviceExists(f"device {taken['id']!r} already exists")
        executemany(db, "INSERT INTO devices (id, fleet, status, labels, groups, created, online) "
                            "VALUES (?, ?, 'pending', '{}', '[]', ?, 0)", [(d, fleet, at) for _, d, _ in parsed])
        executemany(db, "INSERT INTO births (manufacturer, serial, device_id, cert_sha256, batch, imported) "
                            "VALUES (?, ?, ?, ?, ?, ?)", [(name, s, d, h, batch, at) for s, d, h in parsed])
        registry.append_audit(db, [(at, actor, "manufacturer.import", d, "ok",
                                    f"{name} serial {s} batch {batch}" + ("; certificate pinned" if h else ""),
                                    source) for s, d, h in parsed])
    return {"manufacturer": name, "batch": batch, "imported": len(parsed),
            "devices": [d for _, d, _ in parsed][:100]}


def allow_reprovision(registry: Registry, device_id: str, now: datetime, actor: str,
                      source: str | None = None) -> dict[str, Any]:
    """Let the device's birth certificate enroll once more (its next enrollment uses the permission up).
    ManufacturerError 'unknown' if the device has no birth certificate on the allowlist."""
    apply_schema(registry)
    with registry.write() as db:
        row = next(db.query("SELECT * FROM births WHERE device_id = ?", [device_id]), None)
        if row is None:
            raise ManufacturerError(f"device {device_id!r} has no birth certificate on the allowlist", code="unknown")
        db.execute("UPDATE births SET reprovision = 1 WHERE device_id = ?", [device_id])
        registry.append_audit(db, [(_ts(now), actor, "manufacturer.allow_reprovision", device_id, "ok",
                                    f"{row['manufacturer']} serial {row['serial']}", source)])
        row["reprovision"] = 1
    return birth_view(row)


def allow_reprovision_batch(registry: Registry, manufacturer: str, batch: str, now: datetime, actor: str,
                            source: str | None = None) -> dict[str, Any]:
    """allow_reprovision for every birth certificate of one imported batch that enrolled already (one transaction,
    one audit row). ManufacturerError 'unknown' if the manufacturer has no such batch."""
    apply_schema(registry)
    with registry.write() as db:
        if not next(db.query("SELECT 1 FROM births WHERE manufacturer = ? AND batch = ? LIMIT 1",
                             [manufacturer, batch]), None):
            raise ManufacturerError(f"{manufacturer} has no batch {str(batch)[:80]!r}", code="unknown")
        n = db.execute("UPDATE births SET reprovision = 1 WHERE manufacturer = ? AND batch = ? "
                       "AND used_at IS NOT NULL AND reprovision = 0", [manufacturer, batch]).rowcount
        registry.append_audit(db, [(_ts(now), actor, "manufacturer.allow_reprovision", None, "ok",
                                    f"{manufacturer} batch {batch}: {n} birth certificates", source)])
    return {"manufacturer": manufacturer, "batch": batch, "allowed": n}


def birth_view(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("manufacturer", "serial", "device_id", "batch", "imported", "used_at", "used_from")} \
        | {"reprovision": bool(row["reprovision"])}


def _check_birth(query: Callable[[str, list], list[dict[str, Any]]], manufacturer: str, serial: str,
                 cert_sha256: str) -> dict[str, Any]:
    rows = query("SELECT b.*, d.status FROM births b JOIN devices d ON d.id = b.device_id "
                 "WHERE b.manufacturer = ? AND b.serial = ?", [manufacturer, serial])
    row = rows[0] if rows else None
    if row is None:
        raise BirthRejected(f"{manufacturer} serial {serial} is not on the allowlist", code="birth_not_allowlisted")
    if row["cert_sha256"] and row["cert_sha256"] != cert_sha256:
        raise BirthRejected(f"{manufacturer} serial {serial}: not the birth certificate the batch names "
                            f"(sha256 {cert_sha256})", code="birth_cert_mismatch", device_id=row["device_id"])
    if row["used_at"] is not None and not row["reprovision"]:
        raise BirthRejected(f"{manufacturer} serial {serial} enrolled already ({row['used_at']} from "
                            f"{row['used_from']}); re-provisioning is not allowed", code="birth_used",
                            device_id=row["device_id"])
    if row["status"] not in ENROLLABLE_STATUSES:
        raise BirthRejected(f"device {row['device_id']!r} is {row['status']}", code=f"device_{row['status']}",
                            device_id=row["device_id"])
    return row


def lookup(registry: Registry, manufacturer: str, serial: str, cert_sha256: str) -> dict[str, Any]:
    """The allowlist row if that birth certificate may enroll now (read-only); else BirthRejected."""
    apply_schema(registry)
    return _check_birth(registry.query, manufacturer, serial, cert_sha256)


def enroll(registry: Registry, manufacturer: str, serial: str, cert_sha256: str, now: datetime,
           issue: Callable[[str], x509.Certificate], source: str | None = None,
           checked: Mapping[str, Any] | None = None, audit_denied: bool = True) -> tuple[str, x509.Certificate]:
    """Spend the birth certificate and record the certificate `issue(device_id)` builds, on the registry's issuing
    path (Registry._issuing, as token enrollment): checked read-only first (a refusal never costs a signature;
    `checked`, the row `lookup` returned, when the caller read it already: the allowlist is read once), signed
    outside the write lock, then checked again, spent and recorded in one transaction shared with concurrent
    issuings (group commit on SQLite, the shared write lock on PostgreSQL: a second request with the same birth
    certificate that lost the race is refused there by the guarded UPDATE, its certificate dropped). A pending
    device becomes active; an active one (re-provisioned) has its certificate superseded at once.
    Returns (device_id, certificate). BirthRejected is audited 'denied' unless `audit_denied` is False (the EST
    service aggregates its denials); issue() failing is audited 'error' and propagates. Nothing else is written
    then."""
    if checked is None:
        try:
            checked = lookup(registry, manufacturer, serial, cert_sha256)
        except BirthRejected as exc:
            if audit_denied:
                registry.audit("enroll", "denied", now, EST_ACTOR, exc.device_id, f"{exc.code}: {exc}", source)
            raise
    device_id = checked["device_id"]
    at = _ts(now)

    def body(db: Any, cert: x509.Certificate) -> x509.Certificate:
        row = _check_birth(lambda sql, params: list(db.query(sql, params)), manufacturer, serial, cert_sha256)
        if row["device_id"] != device_id:  # removed and imported again meanwhile, for another device
            raise BirthRejected(f"{manufacturer} serial {serial} is not on the allowlist",
                                code="birth_not_allowlisted", device_id=row["device_id"])
        again = row["used_at"] is not None
        # exactly once: spent only if still unused (or allowed once more), whoever else (thread, hub) races for it
        if db.execute("UPDATE births SET used_at = ?, used_from = ?, reprovision = 0 WHERE manufacturer = ? "
                      "AND serial = ? AND (used_at IS NULL OR reprovision = 1)",
                      [at, source, manufacturer, serial]).rowcount != 1:
            raise BirthRejected(f"{manufacturer} serial {serial} enrolled already", code="birth_used",
                                device_id=device_id)
        db.execute("UPDATE devices SET status = 'active' WHERE id = ? AND status = 'pending'", [device_id])
        if db.execute("UPDATE certificates SET status = 'superseded', grace_until = ? "
                      "WHERE device_id = ? AND status = 'active'", [at, device_id]).rowcount:
            registry.authz_event(db, device_id, "re-provisioned", now)
        cert_serial = registry._insert_cert(db, device_id, cert, now)
        registry.append_audit(db, [(at, EST_ACTOR, "enroll", device_id, "ok",
                                    f"serial {cert_serial}; birth certificate {manufacturer} serial {serial}"
                                    + ("; re-provisioned" if again else ""), source)])
        return cert

    cert = registry._issuing("enroll", device_id, now, source, lambda db: checked, lambda: issue(device_id), body,
                             audit_denied)
    return device_id, cert
