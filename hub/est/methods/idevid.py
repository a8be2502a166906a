"""EST simpleenroll authenticated by a factory birth certificate (IEEE 802.1AR IDevID) over mTLS, RFC 7030 3.3.2.

A device whose token holds only its key and the birth certificate a manufacturer CA signed presents that
certificate as its TLS client certificate and sends a CSR without an Authorization header. The hub issues the
operational certificate when, in this order (the first failure is the audit's precise reason; the device only ever
gets one generic 403 `birth_rejected`):

  birth_not_manufacturer  the certificate is not signed directly by a configured manufacturer CA (a fleet
                          certificate is not a birth certificate: it never authorizes this method, and a birth
                          certificate never authorizes simplereenroll, MQTT or the API: those listeners do not
                          trust manufacturer CAs, and the EST service checks the device CA itself there)
  birth_expired           outside its validity (the hub's clock; 802.1AR's 99991231235959Z never expires)
  birth_no_serial         no single subject serialNumber (802.1AR 7.2.8: the device serial)
  birth_not_allowlisted   (manufacturer, serial) was not imported with a batch
  birth_cert_mismatch     the batch pinned another certificate (SHA-256) for that serial
  birth_used              enrolled once already and the operator did not allow re-provisioning
  birth_device_<status>   the device the batch maps it to is suspended, revoked or decommissioned
  birth_key_mismatch      the CSR's key is not the birth certificate's key

The hub, not the CSR, decides the subject: the device id is the one the batch maps the serial to.

Proof of possession: the TLS handshake of this very connection was signed with the birth certificate's key
(CertificateVerify), and the CSR must carry that same public key and a valid signature. RFC 7030 3.5's
tls-unique binding in the CSR's challengePassword is not used: TLS 1.3 has no tls-unique and Python exposes no
exporter; since the CSR key must equal the key that authenticated the handshake, a relayed CSR gains nothing
(whoever relays it cannot complete the handshake without the key).

Trust at the TLS layer: `ManufacturerTrust.refresh` adds each manufacturer CA to the listener's SSLContext
(OpenSSL's store is shared by new handshakes), polled by every EST worker about once a second. The store can only
grow (a removed manufacturer's CA still completes handshakes until the hub restarts); the decision above re-reads
the registry's manufacturers on every request (`trust_version`), and the enrollment's transaction re-checks the
allowlist, so the TLS store is never the last word: a removed manufacturer's births are refused at once.
"""

from __future__ import annotations

import logging
import ssl
import threading
from datetime import datetime
from typing import TYPE_CHECKING, Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

import est
from est.errors import EstError, Forbidden

from hub.manufacturer import store as births

if TYPE_CHECKING:
    from hub.est.service import EstRequest, EstResponse, EstService

log = logging.getLogger("tessera.hub.est")

#: what the device is told for every birth refusal (the audit keeps the precise code and message)
GENERIC = Forbidden("birth_rejected", "the birth certificate was not accepted for enrollment")
REFRESH_S = 1.0


class ManufacturerTrust:
    """The manufacturer CAs of one registry, cached; `refresh(ctx)` also teaches them to an SSLContext."""

    def __init__(self, registry, monotonic: Callable[[], float]):
        self.registry, self.monotonic = registry, monotonic
        self._lock = threading.Lock()
        self._version: tuple | None = None
        self._cas: list[tuple[str, x509.Certificate]] = []
        self._loaded: set[str] = set()  # SHA-256 of the CAs an SSLContext was given
        self._checked = float("-inf")

    def cas(self) -> list[tuple[str, x509.Certificate]]:
        """(name, CA) of every manufacturer, re-read when the registry's set changed."""
        with self._lock:
            version = births.trust_version(self.registry)  # read first: a CA changed meanwhile is read next time
            if version != self._version:
                self._cas, self._version = births.trusted(self.registry), version
            return list(self._cas)

    def refresh(self, ctx: ssl.SSLContext, force: bool = False) -> None:
        """Add CAs added since the last call to `ctx` (at most once a REFRESH_S unless `force`)."""
        now = self.monotonic()
        if not force and now - self._checked < REFRESH_S:
            return
        self._checked = now
        try:
            cas = self.cas()
        except Exception as exc:  # a registry closing under us: try again next tick
            log.debug("manufacturer trust not refreshed: %s", exc)
            return
        for name, ca in cas:
            digest = births.fingerprint(ca)
            if digest not in self._loaded:
                ctx.load_verify_locations(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
                self._loaded.add(digest)
                log.info("EST: trusting manufacturer %s (%s) for birth certificates", name, ca.subject.rfc4514_string())


def identify(peer_der: bytes, cas: list[tuple[str, x509.Certificate]], now: datetime
             ) -> tuple[str, str, x509.Certificate]:
    """(manufacturer, device serial, certificate) of a birth certificate; Forbidden with the precise code."""
    try:
        cert = x509.load_der_x509_certificate(peer_der)
    except ValueError as exc:
        raise Forbidden("birth_not_manufacturer", f"unreadable client certificate: {str(exc)[:120]}") from None
    name = None
    for candidate, ca in cas:
        if cert.issuer != ca.subject:
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except Exception:  # noqa: BLE001  (a bad signature, or a key type that cannot have signed it)
            continue
        name = candidate
        break
    if name is None:
        raise Forbidden("birth_not_manufacturer", f"client certificate {cert.subject.rfc4514_string()[:120]} "
                        f"(issuer {cert.issuer.rfc4514_string()[:120]}) is not signed by a manufacturer CA")
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise Forbidden("birth_expired", f"{name} birth certificate outside its validity "
                        f"({cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} .. {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})")
    serials = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    if len(serials) != 1 or not births.SERIAL_RE.fullmatch(str(serials[0].value)):
        raise Forbidden("birth_no_serial", f"{name} birth certificate without one valid subject serialNumber")
    return name, str(serials[0].value), cert


def is_birth_refusal(code: str) -> bool:
    """Codes answered with GENERIC (hub.est.service._deny)."""
    return code.startswith("birth_")


def _code(exc: births.BirthRejected) -> str:
    return exc.code if is_birth_refusal(exc.code) else f"birth_{exc.code}"


def simpleenroll(service: "EstService", req: "EstRequest", trust: ManufacturerTrust) -> "EstResponse":
    """simpleenroll with the TLS client certificate as a birth certificate (no Authorization header)."""
    device_id = None
    try:
        service._admit(req)
        service._budget(req, None)
        now = service.clock()
        manufacturer, serial, birth = identify(req.peer_cert_der, trust.cas(), now)
        digest = births.fingerprint(birth)
        try:
            allowed = births.lookup(service.registry, manufacturer, serial, digest)  # the one read-only check
            device_id = allowed["device_id"]
        except births.BirthRejected as exc:
            device_id = exc.device_id
            raise Forbidden(_code(exc), str(exc)) from None
        csr = est.parse_enroll_request(req.headers.get("content-type"), req.body, device_id,
                                       key_policy=service.key_policy)
        if births.spki(csr) != births.spki(birth):
            raise Forbidden("birth_key_mismatch", f"{manufacturer} serial {serial}: the CSR's key is not the birth "
                            "certificate's key")
        device_id, cert = births.enroll(
            service.registry, manufacturer, serial, digest, now,
            lambda dev: service.ca.issue_device_cert(csr.public_key(), dev, service.policy, now, service.crl_urls),
            source=req.source, checked=allowed, audit_denied=False)
    except EstError as exc:
        return service._deny("enroll", req, exc, device_id)
    except births.BirthRejected as exc:  # lost a race to the same birth certificate, or its maker was removed
        return service._deny("enroll", req, Forbidden(_code(exc), str(exc)), exc.device_id or device_id)
    log.info("enrolled %s from %s with the %s birth certificate %s (serial %x)", device_id, req.source, manufacturer,
             serial, cert.serial_number)
    from hub.serve import stats

    stats.of(service.registry).enrolled()
    return service._issued(cert)
