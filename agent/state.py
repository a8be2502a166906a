"""The agent's state directory: certificate chain, pinned fleet root, identity and status files (0700/0600)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # cryptography is imported only where certificates are handled (not by the running session)
    from cryptography import x509

CERT = "cert.pem"
ROOT = "fleet-root.pem"
IDENTITY = "identity.json"
STATUS = "status.json"
SPOOL = "spool.sqlite3"


class StateError(Exception):
    """State files are missing, unreadable or inconsistent; the message says which and what to do."""


@dataclass
class Identity:
    device_id: str
    key_label: str
    key_uri: str
    serial: str
    not_before: str
    not_after: str
    fingerprint_sha256: str
    enrolled_at: str
    renewed_at: str = ""


def ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write via a temp file, fsync, rename: readers see the old or the new file, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load_identity(state: Path) -> Identity | None:
    try:
        return Identity(**json.loads((state / IDENTITY).read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        raise StateError(f"{state / IDENTITY} is damaged ({exc.__class__.__name__}); re-enroll the device") from None




def _spki(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def verify_issued(certs: list[x509.Certificate], root: x509.Certificate, device_id: str, public_key,
                  now: datetime) -> tuple[x509.Certificate, list[x509.Certificate]]:
    """Check what the hub returned: leaf for our key and id, clientAuth, chaining to the pinned fleet root.

    Returns (leaf, chain without root). Raises StateError saying what is wrong.
    """
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    spki = _spki(public_key)
    leaves = [c for c in certs if _spki(c.public_key()) == spki]
    if len(leaves) != 1:
        raise StateError("the hub's answer holds no certificate for this device's key")
    leaf = leaves[0]
    cns = [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns != [device_id]:
        raise StateError(f"the certificate names {cns!r}, not this device {device_id!r}")
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = []
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise StateError("the certificate is not a TLS client certificate (no clientAuth EKU)")
    chain: list[x509.Certificate] = []
    current = leaf
    pool = [c for c in certs if c is not leaf and c != root]
    for _ in range(4):
        if current.issuer == root.subject:
            try:
                current.verify_directly_issued_by(root)
            except Exception:
                raise StateError("the certificate chain does not verify against the pinned fleet root") from None
            break
        issuer = next((c for c in pool if c.subject == current.issuer), None)
        if issuer is None:
            raise StateError("the certificate chain does not lead to the pinned fleet root")
        try:
            current.verify_directly_issued_by(issuer)
            bc = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
        except Exception:
            raise StateError("a certificate in the chain does not verify") from None
        if not bc.ca:
            raise StateError("the chain contains a non-CA issuer")
        chain.append(issuer)
        current = issuer
    else:
        raise StateError("the certificate chain is too long")
    for cert in [leaf, *chain]:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise StateError(f"{cert.subject.rfc4514_string()} is not valid now")
    return leaf, chain


def store_certificate(state: Path, leaf: x509.Certificate, chain: list[x509.Certificate], device_id: str,
                      key_label: str, key_uri: str, now: datetime, renewed: bool) -> Identity:
    """Write cert.pem (leaf + chain) and identity.json atomically; cert first, so identity never points ahead."""
    from cryptography.hazmat.primitives import hashes, serialization

    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [leaf, *chain])
    write_atomic(state / CERT, pem, 0o644)
    old = load_identity(state)
    ident = Identity(device_id=device_id, key_label=key_label, key_uri=key_uri,
                     serial=format(leaf.serial_number, "x"), not_before=leaf.not_valid_before_utc.isoformat(),
                     not_after=leaf.not_valid_after_utc.isoformat(),
                     fingerprint_sha256=leaf.fingerprint(hashes.SHA256()).hex(),
                     enrolled_at=(old.enrolled_at if old and renewed else now.isoformat()),
                     renewed_at=now.isoformat() if renewed else "")
    write_atomic(state / IDENTITY, json.dumps(asdict(ident), indent=2).encode())
    return ident


def write_status(state: Path, status: dict) -> None:
    write_atomic(state / STATUS, json.dumps(status, indent=2, default=str).encode(), 0o644)


def read_status(state: Path) -> dict:
    try:
        return json.loads((state / STATUS).read_text())
    except (OSError, ValueError):
        return {}
