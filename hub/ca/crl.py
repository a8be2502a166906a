"""The device CRL: build its contents, validate it, write it atomically (DER + PEM), decide when to re-issue.

Files in crl_dir: ``device.crl`` (DER, served over HTTP at the CRL distribution point) and ``device.crl.pem``
(PEM, for third parties; the broker decides from the registry, not from a CRL). Both are replaced with
os.replace() only after the bytes on disk have been read back and validated, so no reader ever sees a
half-written, foreign or expired CRL.
"""

from __future__ import annotations

import base64
import contextlib
import os
import tempfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

DER_NAME = "device.crl"
PEM_NAME = "device.crl.pem"
CLOCK_SKEW = timedelta(minutes=5)

_REASONS = {flag.value.lower(): flag for flag in x509.ReasonFlags if flag is not x509.ReasonFlags.remove_from_crl}


class CrlError(Exception):
    """A CRL is unusable (unparseable, wrongly signed, wrong issuer, not yet valid, expired) or cannot be written."""


def reason_flag(reason: str) -> x509.ReasonFlags:
    """The CRL reason for a name like 'keyCompromise' or 'key_compromise'; unknown names give unspecified."""
    key = (reason or "").replace("_", "").replace("-", "").replace(" ", "").lower()
    return _REASONS.get(key, x509.ReasonFlags.unspecified)


def crl_builder(issuer: x509.Certificate, revoked: Iterable[tuple[int, datetime, str]], now: datetime,
                crl_number: int, next_update: timedelta) -> x509.CertificateRevocationListBuilder:
    """An unsigned CRL for `issuer`: lastUpdate now, nextUpdate now + next_update, CRLNumber, AKI, entries.

    Entries are (serial, revoked_at, reason); a repeated serial keeps its first entry. Reasons are RFC 5280 names
    (keyCompromise, superseded, ...); unknown ones and 'unspecified' get no reason code (RFC 5280 5.3.1 says to
    omit the extension rather than use unspecified).
    """
    if not 0 < crl_number < 2**159:
        raise CrlError("CRL number must be a positive integer of at most 20 octets")
    if next_update <= timedelta(0):
        raise CrlError("next_update must be positive")
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    seen: set[int] = set()
    entries: list[x509.RevokedCertificate] = []
    for serial, revoked_at, reason in revoked:
        if serial in seen:
            continue
        seen.add(serial)
        if revoked_at.tzinfo is None:
            raise ValueError("revocation times must be timezone-aware datetimes (UTC)")
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(revoked_at)
        flag = reason_flag(reason)
        if flag is not x509.ReasonFlags.unspecified:
            entry = entry.add_extension(x509.CRLReason(flag), critical=False)
        entries.append(entry.build())
    # The entries go in through the constructor, once: add_revoked_certificate returns a copy of the whole
    # builder each time (O(n^2): 17 s for 100k entries).
    builder = (x509.CertificateRevocationListBuilder(revoked_certificates=entries)
               .issuer_name(issuer.subject).last_update(now).next_update(now + next_update)
               .add_extension(x509.CRLNumber(crl_number), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False))
    return builder


def _load(data: bytes) -> x509.CertificateRevocationList:
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_crl(data)
    return x509.load_der_x509_crl(data)


def crl_number(crl: x509.CertificateRevocationList) -> int | None:
    """The CRL's CRLNumber, or None when it has none."""
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None


def validate_crl(crl_der: bytes, issuer: x509.Certificate, now: datetime, *, skew: timedelta = CLOCK_SKEW,
                 margin: timedelta = timedelta(0)) -> x509.CertificateRevocationList:
    """Parse a CRL (DER, or PEM) and return it if it is usable now; raise CrlError saying why not.

    Checks: it parses; its issuer name is `issuer`'s subject; its signature verifies with `issuer`'s key; it
    has a CRLNumber; lastUpdate <= now + skew; nextUpdate is present and later than now + margin.
    """
    if now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime (UTC)")
    try:
        crl = _load(bytes(crl_der))
        _ = crl.signature_hash_algorithm  # parse errors in the outer structure surface here
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CrlError(f"CRL does not parse: {exc}") from None
    if crl.issuer != issuer.subject:
        raise CrlError(f"CRL issuer {crl.issuer.rfc4514_string()!r} is not {issuer.subject.rfc4514_string()!r}")
    try:
        valid = crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CrlError(f"CRL signature cannot be checked: {exc}") from None
    if not valid:
        raise CrlError("CRL signature is not valid for the issuer's key (corrupted or signed by another CA)")
    if crl_number(crl) is None:
        raise CrlError("CRL has no CRLNumber extension")
    if crl.last_update_utc > now + skew:
        raise CrlError(f"CRL is not valid yet (lastUpdate {crl.last_update_utc:%Y-%m-%d %H:%M:%S}Z)")
    if crl.next_update_utc is None:
        raise CrlError("CRL has no nextUpdate")
    if crl.next_update_utc <= now + margin:
        raise CrlError(f"CRL has expired (nextUpdate {crl.next_update_utc:%Y-%m-%d %H:%M:%S}Z)")
    return crl


def _encode(crl: x509.CertificateRevocationList, encoding: serialization.Encoding) -> bytes:
    return crl.public_bytes(encoding)


def pem_armor(der: bytes) -> bytes:
    """The PEM form (RFC 7468 "X509 CRL") of a DER CRL: base64 in 64-character lines, byte for byte what
    cryptography writes (encoding a 100k-entry CRL costs 0.4 s each time; this costs nothing)."""
    b64 = base64.b64encode(der)
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return b"-----BEGIN X509 CRL-----\n" + b"\n".join(lines) + b"\n-----END X509 CRL-----\n"


def write_temp(directory: Path, final_name: str, data: bytes) -> Path:
    """Write data to a new temp file `.<final_name>.<random>.tmp` next to final_name (mode 0644: a CRL is public),
    fsynced. A process killed before its os.replace() leaves it behind: `remove_stale_temps`."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=f".{final_name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o644)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    return Path(name)


def remove_stale_temps(crl_dir: Path) -> list[Path]:
    """Delete the temp files (`write_temp`) a publication cut short by the end of its process left in crl_dir, and
    the fixed-name `*.tmp` of older versions; returns them. For the hub's start, before it publishes anything."""
    removed = []
    for path in sorted(Path(crl_dir).glob("*.tmp")) + sorted(Path(crl_dir).glob(".*.tmp")):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def pem_matches_der(crl_dir: Path) -> bool:
    """device.crl.pem is the armor of device.crl (False also when either is missing): the two are renamed into
    place one after the other, so a process killed between the renames leaves the PEM one CRL behind."""
    try:
        return pem_armor((Path(crl_dir) / DER_NAME).read_bytes()) == (Path(crl_dir) / PEM_NAME).read_bytes()
    except OSError:
        return False


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_crl_atomically(crl: x509.CertificateRevocationList, crl_dir: Path, issuer: x509.Certificate,
                         now: datetime) -> Path:
    """Write the CRL as device.crl (DER) and device.crl.pem (PEM) in crl_dir; return the DER path.

    The DER is encoded once and the PEM is its armor (`pem_armor`); each is written to a temp file in crl_dir and
    fsynced; the files ON DISK are read back and must be byte for byte what was written, and the DER is validated
    (validate_crl, CRLNumber greater than the current file's); only then os.replace() puts them in place. On any failure the temp files are removed, the old files are untouched, and CrlError is raised.
    """
    crl_dir = Path(crl_dir)
    crl_dir.mkdir(parents=True, exist_ok=True)
    current = current_crl(crl_dir, issuer)
    temps: list[Path] = []
    try:
        der = _encode(crl, serialization.Encoding.DER)  # once: each encoding of a big CRL costs
        pem = pem_armor(der)
        der_tmp = write_temp(crl_dir, DER_NAME, der)
        temps.append(der_tmp)
        pem_tmp = write_temp(crl_dir, PEM_NAME, pem)
        temps.append(pem_tmp)
        if der_tmp.read_bytes() != der or pem_tmp.read_bytes() != pem:
            raise CrlError("the CRL read back from disk differs from the one written")
        on_disk_der = validate_crl(der, issuer, now)  # the bytes on disk, parsed and checked (the PEM is their armor)
        new_number = crl_number(on_disk_der) or 0
        if current is not None and new_number <= (crl_number(current) or 0):
            raise CrlError(f"CRL number {new_number} is not greater than the current CRL's "
                           f"{crl_number(current)}; CRL numbers must increase")
        os.replace(der_tmp, crl_dir / DER_NAME)  # DER first: it is what next_crl_number() reads
        os.replace(pem_tmp, crl_dir / PEM_NAME)
        temps.clear()
        fsync_dir(crl_dir)
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return crl_dir / DER_NAME


def current_crl(crl_dir: Path, issuer: x509.Certificate | None = None) -> x509.CertificateRevocationList | None:
    """The CRL in crl_dir/device.crl (or the PEM file if the DER one is missing/unreadable), None if there is none.

    With `issuer`, a CRL from another issuer or with a bad signature counts as none. Expiry is not checked.
    """
    for name in (DER_NAME, PEM_NAME):
        try:
            crl = _load((Path(crl_dir) / name).read_bytes())
            _ = crl.signature_hash_algorithm
            if issuer is not None and (crl.issuer != issuer.subject or
                                       not crl.is_signature_valid(issuer.public_key())):  # type: ignore[arg-type]
                continue
        except (OSError, ValueError, TypeError, UnsupportedAlgorithm):
            continue
        return crl
    return None


def next_crl_number(crl_dir: Path) -> int:
    """The CRLNumber for the next CRL: the current on-disk CRL's number + 1, or 1 when there is no CRL yet.

    Raises CrlError if CRL files exist but none can be read (restarting at 1 would break monotonic numbering).
    """
    numbers: list[int] = []
    found = False
    for name in (DER_NAME, PEM_NAME):
        path = Path(crl_dir) / name
        if not path.exists():
            continue
        found = True
        with contextlib.suppress(OSError, ValueError, TypeError):
            number = crl_number(_load(path.read_bytes()))
            if number is not None:
                numbers.append(number)
    if not found:
        return 1
    if not numbers:
        raise CrlError(f"the CRL files in {crl_dir} cannot be read; fix or remove them to restart numbering")
    return max(numbers) + 1


def crl_needs_refresh(crl: x509.CertificateRevocationList, now: datetime, fraction: float = 0.5) -> bool:
    """True once more than `fraction` of the CRL's [lastUpdate, nextUpdate] window has passed (or it has none)."""
    if not 0 < fraction <= 1:
        raise ValueError("fraction must be in (0, 1]")
    if crl.next_update_utc is None:
        return True
    window = crl.next_update_utc - crl.last_update_utc
    return now - crl.last_update_utc > window * fraction
