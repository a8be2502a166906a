"""The RabbitMQ listener's CRL directory: what the TLS handshake refuses, since the auth back end never sees a serial.

Two CRLs in OpenSSL hash-directory form (`<issuer name hash>.r0`, what Erlang's ssl_crl_hash_dir reads at every
lookup), PEM, signed by the device and the service CA: the published CRLs' entries (revoked, and held for
suspended devices) plus every superseded certificate whose grace is over (reason superseded). The published CRLs
(hub/ca/revocation.py) stay as they are: a superseded certificate is not revoked for third parties.
Written atomically; `entries_key` tells callers whether anything changed, so rewriting is cheap to skip.
"""

from __future__ import annotations

import os
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from hub.authz.identities import revoked_identity_certificates
from hub.ca.authority import FleetCA
from hub.ca.revocation import device_crl_entries
from hub.registry.store import Registry, _ts

LIFETIME = timedelta(days=1)  # nextUpdate: rewritten at every change, and once REFRESH old (an expired CRL would
REFRESH = timedelta(hours=6)  # make every handshake fail: Erlang cannot decide the certificate's status)

_SUPERSEDED = {
    "device": "SELECT serial, grace_until FROM certificates WHERE status = 'superseded' AND grace_until <= ? "
              "AND not_after > ?",
    "service": "SELECT serial, grace_until FROM identity_certificates WHERE status = 'superseded' "
               "AND grace_until <= ? AND not_after > ?",
}


def name_hash(ca_pem: Path) -> str:
    """OpenSSL's subject name hash of a CA certificate (the hash directory's file name)."""
    proc = subprocess.run(["openssl", "x509", "-hash", "-noout", "-in", str(ca_pem)], capture_output=True,
                          text=True, check=True)
    return proc.stdout.strip()


def entries(registry: Registry, now: datetime) -> dict[str, list[tuple[int, datetime, str]]]:
    at = _ts(now)
    out = {"device": device_crl_entries(registry, now),
           "service": [(int(r["serial"], 16), datetime.fromisoformat(r["revoked_at"]), r["reason"] or "unspecified")
                       for r in revoked_identity_certificates(registry, now)]}
    for issuer, sql in _SUPERSEDED.items():
        seen = {e[0] for e in out[issuer]}
        out[issuer] += [(int(r["serial"], 16), datetime.fromisoformat(r["grace_until"]), "superseded")
                        for r in registry.query(sql, [at, at]) if int(r["serial"], 16) not in seen]
    return out


def entries_key(found: dict[str, list[tuple[int, datetime, str]]]) -> tuple:
    return tuple((k, tuple(sorted(e[0] for e in v))) for k, v in sorted(found.items()))


class CrlDir:
    """Writes the listener's CRLs for `ca` into `directory` (created 0700)."""

    def __init__(self, ca: FleetCA, directory: Path, device_ca_pem: Path, service_ca_pem: Path):
        self.ca, self.dir = ca, directory
        self.hashes = {"device": name_hash(device_ca_pem), "service": name_hash(service_ca_pem)}
        self.number = int(datetime.now().timestamp() * 1000)
        self.key: tuple | None = None
        self.written: datetime | None = None

    def due(self, now: datetime) -> bool:
        """True once the CRLs are REFRESH old (or were never written by this process)."""
        return self.written is None or now - self.written >= REFRESH

    def write(self, registry: Registry, now: datetime, force: bool = False) -> bool:
        """Rewrite the CRLs if their entries changed (or `force`); True if written."""
        found = entries(registry, now)
        key = entries_key(found)
        if key == self.key and not force and not self.due(now):
            return False
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for issuer, revoked in found.items():
            self.number += 1
            crl = self.ca.build_crl(revoked, now, crl_number=self.number, next_update=LIFETIME, issuer=issuer)
            path = self.dir / f"{self.hashes[issuer]}.r0"
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        self.key, self.written = key, now
        return True
