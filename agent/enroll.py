"""Enrollment and renewal: key in the token, CSR signed there, EST (simpleenroll / simplereenroll), verified storage."""

from __future__ import annotations

import logging
import os
import re
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from hsm import worker
from hsm.secretfile import PrivateFileError, read_private_file
from hsm.errors import KeyNotFound
from hsm.keys import require_sign_only

from .config import AgentConfig, ConfigError
from .estclient import EstClient, EstClientError
from .keyowner import foreign_key_refusal, new_key_id
from .state import (CERT, ROOT, Identity, StateError, ensure_dir, load_identity, store_certificate, verify_issued,
                    write_atomic)

log = logging.getLogger("tessera.agent.enroll")


class EnrollError(Exception):
    """Enrollment or renewal failed; nothing was changed (the message says why and what to do)."""


class AlreadyEnrolled(Exception):
    """The device holds a valid certificate already."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def read_token(path: Path) -> str:
    try:
        token = read_private_file(path, "token file").decode("utf-8", "replace").strip()
    except PrivateFileError as exc:
        raise EnrollError(str(exc)) from None
    if not token or len(token) > 256 or any(c.isspace() for c in token):
        raise EnrollError(f"{path} does not hold one enrollment token")
    return token


def destroy_file(path: Path) -> None:
    """Overwrite then unlink a secret file (best effort on flash; the token is single-use anyway)."""
    try:
        size = path.stat().st_size
        with open(path, "r+b") as fh:
            fh.write(b"\0" * size)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError:
        pass
    path.unlink(missing_ok=True)


def _load_root(data: bytes, source: str) -> x509.Certificate:
    try:
        root = x509.load_pem_x509_certificate(data)
        bc = root.extensions.get_extension_for_class(x509.BasicConstraints).value
        root.verify_directly_issued_by(root)
    except Exception:
        raise EnrollError(f"{source} is not a self-signed CA certificate (the fleet root)") from None
    if not bc.ca:
        raise EnrollError(f"{source} is not a CA certificate")
    return root


def pin_root(cfg: AgentConfig, ca_file: Path | None, ca_fingerprint: str | None) -> x509.Certificate:
    """The fleet root, from a file, or fetched from /cacerts and accepted only if its SHA-256 fingerprint matches."""
    if ca_file:
        try:
            return _load_root(ca_file.read_bytes(), str(ca_file))
        except OSError as exc:
            raise EnrollError(f"cannot read the fleet CA file {ca_file}: {exc.strerror}") from None
    if not ca_fingerprint:
        raise EnrollError("give the fleet CA (--ca-file) or its SHA-256 fingerprint (--ca-fingerprint)")
    want = ca_fingerprint.strip().lower().removeprefix("sha256:").replace(":", "")
    if not re.fullmatch(r"[0-9a-f]{64}", want):
        raise EnrollError(f"--ca-fingerprint {ca_fingerprint[:80]!r} is not a SHA-256 fingerprint (64 hex digits, "
                          "colons allowed: openssl x509 -noout -fingerprint -sha256 -in fleet-root.pem)")
    import ssl

    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname, probe.verify_mode = False, ssl.CERT_NONE  # bootstrap only; verified below, then re-done
    try:
        certs = EstClient(cfg.hub_url, cafile="", context=probe, check_eku=False).cacerts()
    except EstClientError as exc:
        raise EnrollError(str(exc)) from None
    for cert in certs:
        if cert.fingerprint(hashes.SHA256()).hex() == want:
            return _load_root(cert.public_bytes(serialization.Encoding.PEM), "the pinned CA")
    raise EnrollError("no certificate from the hub matches the pinned CA fingerprint; refusing to enroll")


def _ensure_key(cfg: AgentConfig, label: str, device_id: str, recorded: Identity | None = None):
    """The token key `label` for `device_id`: generated (its CKA_ID names the device), or reused if an earlier
    attempt for this same device made it; another device's key is refused (EnrollError)."""
    try:
        info = worker.describe_key(cfg.token_config, label)
    except KeyNotFound:
        return worker.generate_key(cfg.token_config, label, cfg.token.key_type, new_key_id(device_id))
    require_sign_only(info)  # a key made elsewhere (pkcs11-tool's defaults can decrypt) is refused, not reused
    refused = foreign_key_refusal(info.label, info.id, info.token_label, device_id,
                                  recorded.device_id if recorded else None, recorded.key_label if recorded else None)
    if refused:
        raise EnrollError(refused)
    log.info("reusing token key %s (an earlier attempt for %s created it)", label, device_id)
    return info


def enroll(cfg: AgentConfig, token_file: Path, ca_file: Path | None = None, ca_fingerprint: str | None = None,
           now: datetime | None = None) -> Identity:
    """Enroll once; idempotent (AlreadyEnrolled), and a failure leaves nothing half-done, so it can be retried."""
    try:
        cfg.require("device_id", "hub_url")
    except ConfigError as exc:
        raise EnrollError(str(exc)) from None
    state = ensure_dir(cfg.state)
    now = now or _now()
    ident = load_identity(state)
    if ident and ident.device_id != cfg.device_id and datetime.fromisoformat(ident.not_after) > now:
        raise EnrollError(f"{state} holds the identity of device {ident.device_id!r} (valid until "
                          f"{ident.not_after[:19]}Z); refusing to enroll {cfg.device_id!r} over it (use a state_dir "
                          "and token of its own)")
    if ident and datetime.fromisoformat(ident.not_after) > now:
        raise AlreadyEnrolled(f"{ident.device_id} is enrolled (certificate {ident.serial[:16]}…, valid until "
                              f"{ident.not_after[:19]}Z); use `tessera-agent renew` to renew")
    token = read_token(token_file)
    root = pin_root(cfg, ca_file, ca_fingerprint)
    root_pem = root.public_bytes(serialization.Encoding.PEM)
    write_atomic(state / ROOT, root_pem, 0o644)
    info = _ensure_key(cfg, cfg.token.key_label, cfg.device_id, ident)
    csr_der = worker.make_csr(cfg.token_config, info.label, common_name=cfg.device_id)
    try:
        certs = EstClient(cfg.hub_url, cafile=str(state / ROOT)).simpleenroll(csr_der, cfg.device_id, token)
    except EstClientError as exc:
        raise EnrollError(str(exc)) from None
    public_key = x509.load_der_x509_csr(csr_der).public_key()
    try:
        leaf, chain = verify_issued(certs, root, cfg.device_id, public_key, _now())
    except StateError as exc:
        raise EnrollError(f"refusing the hub's certificate: {exc}") from None
    ident = store_certificate(state, leaf, chain, cfg.device_id, info.label, info.uri, now, renewed=False)
    destroy_file(token_file)
    log.info("enrolled %s: certificate %s valid until %s", cfg.device_id, ident.serial, ident.not_after)
    return ident


BIRTH_CERT = "birth-cert.pem"  # the birth certificate as read from the token (public), for the TLS stack


def enroll_birth(cfg: AgentConfig, ca_file: Path | None = None, ca_fingerprint: str | None = None,
                 now: datetime | None = None) -> Identity:
    """Enroll with the factory birth certificate (IEEE 802.1AR IDevID) in the token: the certificate labelled
    token.key_label and the key with its CKA_ID authenticate EST simpleenroll over mTLS (no enrollment token);
    the CSR is signed by that same key (the hub requires it). The hub decides the device id: the operational
    certificate's CN (a configured device_id must match it). Idempotent (AlreadyEnrolled) like enroll()."""
    from hsm.certificates import read_certificate
    from hsm.tls import client_context

    try:
        cfg.require("hub_url")
    except ConfigError as exc:
        raise EnrollError(str(exc)) from None
    state = ensure_dir(cfg.state)
    now = now or _now()
    ident = load_identity(state)
    if ident and datetime.fromisoformat(ident.not_after) > now:
        raise AlreadyEnrolled(f"{ident.device_id} is enrolled (certificate {ident.serial[:16]}…, valid until "
                              f"{ident.not_after[:19]}Z); use `tessera-agent renew` to renew")
    root = pin_root(cfg, ca_file, ca_fingerprint)
    write_atomic(state / ROOT, root.public_bytes(serialization.Encoding.PEM), 0o644)
    try:
        birth_der, key_id = read_certificate(cfg.token_config, cfg.token.key_label)
    except KeyNotFound:
        raise EnrollError(f"no birth certificate labelled {cfg.token.key_label!r} in token {cfg.token.label!r} "
                          "(the factory writes it next to the key: tessera-factory birth)") from None
    birth = x509.load_der_x509_certificate(birth_der)
    try:
        info = worker.describe_key(cfg.token_config, key_id=key_id)
    except KeyNotFound:
        raise EnrollError(f"the token holds the birth certificate {cfg.token.key_label!r} but no key with its "
                          f"CKA_ID {key_id.hex()}") from None
    require_sign_only(info)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if serialization.load_pem_public_key(info.public_key_pem.encode()).public_bytes(
            serialization.Encoding.DER, spki) != birth.public_key().public_bytes(serialization.Encoding.DER, spki):
        raise EnrollError(f"the birth certificate {cfg.token.key_label!r} is not for the token key {info.label!r}")
    write_atomic(state / BIRTH_CERT, birth.public_bytes(serialization.Encoding.PEM), 0o644)
    csr_der = worker.make_csr(cfg.token_config, key_id=info.id)  # empty subject: the hub decides it
    ctx = client_context(state / ROOT, state / BIRTH_CERT, info.uri, cfg.token_config)
    try:
        certs = EstClient(cfg.hub_url, cafile=str(state / ROOT), context=ctx).simpleenroll_with_cert(csr_der)
    except EstClientError as exc:
        raise EnrollError(str(exc)) from None
    public_key = birth.public_key()
    cns = certs[0].subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    device_id = str(cns[0].value) if len(cns) == 1 else ""
    if cfg.device_id and device_id != cfg.device_id:
        raise EnrollError(f"the hub issued a certificate for {device_id!r}, but this device is configured as "
                          f"{cfg.device_id!r}; refusing it")
    try:
        leaf, chain = verify_issued(certs, root, device_id, public_key, _now())
    except StateError as exc:
        raise EnrollError(f"refusing the hub's certificate: {exc}") from None
    ident = store_certificate(state, leaf, chain, device_id, info.label, info.uri, now, renewed=False)
    log.info("enrolled %s with its birth certificate (serial %s): certificate %s valid until %s", device_id,
             birth.subject.rfc4514_string(), ident.serial, ident.not_after)
    return ident


def renew(cfg: AgentConfig, rotate_key: bool = False, now: datetime | None = None) -> Identity:
    """EST simplereenroll over mTLS with the current certificate and token key; optionally with a fresh key."""
    from hsm.tls import client_context

    state = cfg.state
    now = now or _now()
    ident = load_identity(state)
    if ident is None:
        raise EnrollError("this device is not enrolled; run `tessera-agent enroll` first")
    if datetime.fromisoformat(ident.not_after) <= now:
        raise EnrollError("the certificate has expired, so the hub cannot authenticate a renewal: get a new "
                          "enrollment token from the fleet manager (`tessera-hub device token <id>`) and run "
                          "`tessera-agent enroll --force`")
    root = _load_root((state / ROOT).read_bytes(), str(state / ROOT))
    label = ident.key_label
    if rotate_key:
        label = f"{cfg.token.key_label}-{now:%Y%m%d%H%M%S%f}"
        info = _ensure_key(cfg, label, ident.device_id)
    else:
        info = worker.describe_key(cfg.token_config, label)
    csr_der = worker.make_csr(cfg.token_config, info.label, common_name=ident.device_id)
    ctx = client_context(state / ROOT, state / CERT, ident.key_uri, cfg.token_config)
    try:
        certs = EstClient(cfg.hub_url, cafile=str(state / ROOT), context=ctx).simplereenroll(csr_der)
        leaf, chain = verify_issued(certs, root, ident.device_id, x509.load_der_x509_csr(csr_der).public_key(),
                                    _now())
    except (EstClientError, StateError) as exc:
        if rotate_key:
            _drop_key(cfg, label)
        raise EnrollError(f"renewal failed: {exc}") from None
    new = store_certificate(state, leaf, chain, ident.device_id, info.label, info.uri, now, renewed=True)
    if rotate_key and ident.key_label != info.label:
        if _is_birth_key(cfg, ident.key_label):
            log.info("keeping token key %s: it is the birth certificate's (IEEE 802.1AR IDevID) key", ident.key_label)
        else:
            _drop_key(cfg, ident.key_label)
    log.info("renewed %s: certificate %s valid until %s%s", ident.device_id, new.serial, new.not_after,
             " (new key)" if rotate_key else "")
    return new


def _is_birth_key(cfg: AgentConfig, label: str) -> bool:
    """Whether `label` is the key the factory made for the birth certificate (never deleted)."""
    from hsm.certificates import IDEVID_KEY_ID_PREFIX

    try:
        return bytes(worker.describe_key(cfg.token_config, label).id).startswith(IDEVID_KEY_ID_PREFIX)
    except Exception:  # noqa: BLE001  (_drop_key then tries, and warns if it cannot)
        return False


def _drop_key(cfg: AgentConfig, label: str) -> None:
    try:
        worker.delete_key(cfg.token_config, label)
    except Exception as exc:  # the old key is harmless but reported
        log.warning("could not delete token key %s: %s", label, exc)

