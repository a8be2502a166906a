"""Publishing CRLs from the registry (for third parties: the broker decides from the registry, not from a CRL).

The device CRL lists revoked certificates and, as certificateHold, the certificates of suspended devices
(resuming a device takes them off again). The service CRL lists revoked service identity certificates. Both are
built, signed, validated on disk and swapped in atomically, in the background (hub.serve.live.CrlPublisher).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from cryptography.hazmat.primitives import serialization

from hub.ca.authority import FleetCA
from hub.ca.crl import (CrlError, crl_needs_refresh, crl_number, fsync_dir, next_crl_number, validate_crl,
                        write_crl_atomically, write_temp)
from hub.registry.store import Registry

CRL_LIFETIME = timedelta(days=7)
SERVICE_CRL = "service.crl.pem"


def device_crl_entries(registry: Registry, now: datetime) -> list[tuple[int, datetime, str]]:
    entries = [(int(r["serial"], 16), datetime.fromisoformat(r["revoked_at"]), r["reason"] or "unspecified")
               for r in registry.revoked_certificates(now)]
    entries += [(int(r["serial"], 16), datetime.fromisoformat(r["held_at"]), "certificateHold")
                for r in registry.held_certificates(now)]
    return entries


def publish_crl(ca: FleetCA, registry: Registry, crl_dir: Path, now: datetime) -> Path:
    """Regenerate the device CRL from the registry and install it; returns the DER path."""
    crl_dir.mkdir(parents=True, exist_ok=True)
    crl = ca.build_crl(device_crl_entries(registry, now), now, next_update=CRL_LIFETIME,
                       crl_number=next_crl_number(crl_dir))
    return write_crl_atomically(crl, crl_dir, ca.device_ca, now)


def publish_service_crl(ca: FleetCA, registry: Registry | None, crl_dir: Path, now: datetime,
                        force: bool = False) -> bytes:
    """(Re)issue the service CA's CRL (revoked service identity certificates); PEM. Without `force` a current
    CRL is kept as it is."""
    path = crl_dir / SERVICE_CRL
    number = 1
    try:
        old = validate_crl(path.read_bytes(), ca.service_ca, now, margin=timedelta(0))
        if not force and not crl_needs_refresh(old, now):
            return path.read_bytes()
        number = (crl_number(old) or 0) + 1
    except (OSError, CrlError):  # missing, expired or damaged: issue a fresh one
        pass
    entries = []
    if registry is not None:
        from hub.authz.identities import revoked_identity_certificates

        entries = [(int(r["serial"], 16), datetime.fromisoformat(r["revoked_at"]), r["reason"] or "unspecified")
                   for r in revoked_identity_certificates(registry, now)]
    crl = ca.build_crl(entries, now, crl_number=number, next_update=CRL_LIFETIME, issuer="service")
    pem = crl.public_bytes(serialization.Encoding.PEM)
    tmp = write_temp(crl_dir, SERVICE_CRL, pem)  # fsynced, like the device CRL's files
    try:
        validate_crl(tmp.read_bytes(), ca.service_ca, now)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(crl_dir)
    return pem
