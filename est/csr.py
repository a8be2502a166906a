"""PKCS#10 CSR handling for EST: loading, key policy, identity/CA checks, client request bodies."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from .errors import BadRequest, Forbidden, safe_repr
from .messages import MAX_CSR_BODY, check_request_content_type, decode_base64_body, encode_base64_body

__all__ = [
    "KeyPolicy",
    "DEFAULT_KEY_POLICY",
    "PEM_CSR_LABELS",
    "load_csr",
    "check_csr_key",
    "check_csr_request",
    "parse_enroll_request",
    "build_csr_request_body",
]

PEM_CSR_LABELS = frozenset({"CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST"})

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


@dataclass(frozen=True)
class KeyPolicy:
    """Which subject public keys a CSR may carry."""

    ec_curves: frozenset[str] = field(default_factory=lambda: frozenset({"secp256r1", "secp384r1"}))
    """Accepted EC curve names (cryptography's ``curve.name``)."""
    allow_rsa: bool = True
    min_rsa_bits: int = 2048
    max_rsa_bits: int = 8192
    allow_ed25519: bool = False


DEFAULT_KEY_POLICY = KeyPolicy()

_MIN_EC_BITS = 256  # EC curves below this are reported as weak rather than merely unsupported


def load_csr(body: bytes, *, max_size: int = MAX_CSR_BODY) -> x509.CertificateSigningRequest:
    """Decode an EST CSR body (base64 DER) and verify its self-signature.

    A PEM body (``-----BEGIN CERTIFICATE REQUEST-----``, or the legacy ``NEW
    CERTIFICATE REQUEST`` label) is tolerated: the armor is stripped and the
    inside is held to the same strict base64 rules.  EST mandates bare base64
    DER, but PEM is the same bytes with a header line, some clients (and
    curl/openssl users) send it, and accepting it costs no ambiguity.

    Errors: 413 body_too_large, 400 bad_base64 / bad_pem / bad_csr /
    bad_csr_signature / unsupported_key (key algorithm cryptography cannot load).
    """
    der = decode_base64_body(body, max_size=max_size, pem_labels=PEM_CSR_LABELS)
    try:
        csr = x509.load_der_x509_csr(der)
    except x509.InvalidVersion:  # not a ValueError: PKCS#10 defines version 0 (v1) only
        raise BadRequest("bad_csr", "CSR version is not v1 (0)") from None
    except ValueError:
        raise BadRequest("bad_csr", "body is not a DER-encoded PKCS#10 CertificationRequest") from None
    try:
        csr.public_key()
    except UnsupportedAlgorithm:
        raise BadRequest("unsupported_key", "CSR public key algorithm is not supported") from None
    except ValueError:
        raise BadRequest("bad_csr", "CSR subject public key is malformed") from None
    try:
        valid = csr.is_signature_valid
    except (UnsupportedAlgorithm, ValueError):
        raise BadRequest("bad_csr_signature", "CSR signature algorithm is not supported") from None
    if not valid:
        raise BadRequest("bad_csr_signature", "CSR signature does not verify with its own public key")
    return csr


def check_csr_key(
    csr: x509.CertificateSigningRequest, policy: KeyPolicy = DEFAULT_KEY_POLICY
) -> PublicKey:
    """Enforce ``policy`` on the CSR's public key and return the key.

    Errors (400): weak_key (RSA below ``min_rsa_bits``, EC curve below 256
    bits), unsupported_key (anything else the policy does not allow).
    """
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        curve = key.curve
        if curve.name in policy.ec_curves:
            return key
        allowed = ", ".join(sorted(policy.ec_curves)) or "none"
        if curve.key_size < _MIN_EC_BITS:
            raise BadRequest(
                "weak_key", f"EC key on {curve.name} ({curve.key_size} bits) is too weak; accepted curves: {allowed}"
            )
        raise BadRequest("unsupported_key", f"EC curve {curve.name} is not accepted; accepted curves: {allowed}")
    if isinstance(key, rsa.RSAPublicKey):
        bits = key.key_size
        if not policy.allow_rsa:
            raise BadRequest("unsupported_key", "RSA keys are not accepted by policy")
        if bits < policy.min_rsa_bits:
            raise BadRequest("weak_key", f"RSA key is {bits} bits; the minimum is {policy.min_rsa_bits}")
        if bits > policy.max_rsa_bits:
            raise BadRequest("unsupported_key", f"RSA key is {bits} bits; the maximum is {policy.max_rsa_bits}")
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        if policy.allow_ed25519:
            return key
        raise BadRequest("unsupported_key", "Ed25519 keys are not accepted by policy")
    if isinstance(key, ed448.Ed448PublicKey):
        name = "Ed448"
    elif isinstance(key, dsa.DSAPublicKey):
        name = "DSA"
    else:
        name = type(key).__name__
    raise BadRequest("unsupported_key", f"{name} keys are not accepted")


def check_csr_request(
    csr: x509.CertificateSigningRequest,
    device_id: str,
    *,
    accepted_names: Collection[str] = (),
) -> None:
    """Refuse CSRs asking for a CA certificate or for another identity than ``device_id``.

    * 403 ca_requested: the extensionRequest has BasicConstraints cA=TRUE, or
      KeyUsage keyCertSign / cRLSign.
    * 403 name_mismatch: a subject commonName differs from ``device_id``, or a
      subjectAltName entry is not a DNS name / URI / RFC 822 name equal to
      ``device_id`` or one of ``accepted_names`` (IP addresses, directory
      names, otherNames and registered IDs are always refused).
    * 400 bad_csr: the subject or the requested extensions cannot be parsed.

    An empty subject is fine (the hub decides the subject); subject attributes
    other than commonName are ignored since the hub never copies them.  Names
    compare exactly (case-sensitive).
    """
    if not device_id:
        raise ValueError("device_id must be a non-empty string")
    try:
        cns = [attr.value for attr in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        extensions = csr.extensions
    except (ValueError, TypeError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        # TypeError: cryptography's Name refuses e.g. a commonName encoded as a BIT STRING that way
        raise BadRequest("bad_csr", f"CSR subject or extension request is malformed ({type(exc).__name__})") from None

    _check_not_ca(extensions)
    for cn in cns:
        if cn != device_id:
            raise Forbidden(
                "name_mismatch",
                f"CSR subject CN {safe_repr(cn)} does not match the authenticated device {safe_repr(device_id)}",
            )
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    allowed = {device_id, *accepted_names}
    for name in san:
        if isinstance(name, (x509.DNSName, x509.UniformResourceIdentifier, x509.RFC822Name)):
            if name.value in allowed:
                continue
            shown = safe_repr(name.value)
        else:
            shown = "a value"
        raise Forbidden(
            "name_mismatch",
            f"CSR subjectAltName {type(name).__name__} {shown} does not name the authenticated device "
            f"{safe_repr(device_id)}",
        )


def _check_not_ca(extensions: x509.Extensions) -> None:
    for ext in extensions:
        value = ext.value
        if isinstance(value, x509.BasicConstraints) and value.ca:
            raise Forbidden("ca_requested", "CSR requests BasicConstraints cA=TRUE; CA certificates are not issued")
        if isinstance(value, x509.KeyUsage) and (value.key_cert_sign or value.crl_sign):
            raise Forbidden(
                "ca_requested", "CSR requests KeyUsage keyCertSign/cRLSign; CA certificates are not issued"
            )


def parse_enroll_request(
    content_type: str | bytes | None,
    body: bytes,
    device_id: str,
    *,
    key_policy: KeyPolicy = DEFAULT_KEY_POLICY,
    accepted_names: Collection[str] = (),
    max_size: int = MAX_CSR_BODY,
) -> x509.CertificateSigningRequest:
    """Server side: all checks for a simpleenroll/simplereenroll request, in order.

    Content type (415), size (413), base64/PEM/DER/signature (400), key
    policy (400), CA and identity checks (403).  Returns the verified CSR.
    """
    check_request_content_type(content_type)
    csr = load_csr(body, max_size=max_size)
    check_csr_key(csr, key_policy)
    check_csr_request(csr, device_id, accepted_names=accepted_names)
    return csr


def build_csr_request_body(csr: x509.CertificateSigningRequest) -> bytes:
    """Client side: the simpleenroll/simplereenroll body (base64 DER, CRLF-wrapped)."""
    return encode_base64_body(csr.public_bytes(serialization.Encoding.DER))
