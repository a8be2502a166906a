"""PKCS#7 certs-only bodies (RFC 7030 4.1.3 / 4.2.3): server encoding and client parsing via pyca/cryptography."""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from .errors import BadResponse, EstError
from .messages import MAX_CERTS_BODY, decode_base64_body, encode_base64_body

__all__ = ["PEM_PKCS7_LABELS", "certs_only_der", "certs_only_response", "parse_certs_only"]

PEM_PKCS7_LABELS = frozenset({"PKCS7", "CMS"})


def certs_only_der(certs: Sequence[x509.Certificate]) -> bytes:
    """Degenerate SignedData (certs-only) in DER.

    The certificates field is a DER ``SET OF``, so cryptography writes it in
    canonical (sorted-by-encoding) order: input order is NOT preserved and
    consumers must not rely on it (build chains by issuer/subject).
    """
    certs = list(certs)
    if not certs:
        raise ValueError("a certs-only response needs at least one certificate")
    return pkcs7.serialize_certificates(certs, serialization.Encoding.DER)


def certs_only_response(certs: Sequence[x509.Certificate]) -> bytes:
    """Server side: body for /cacerts and (re)enroll responses (base64 of :func:`certs_only_der`)."""
    return encode_base64_body(certs_only_der(certs))


def parse_certs_only(body: bytes, *, max_size: int = MAX_CERTS_BODY) -> list[x509.Certificate]:
    """Client side: certificates from a certs-only body.

    Accepts the RFC 8951 base64 form (whitespace tolerant, also PEM ``PKCS7``
    / ``CMS`` armor) or raw DER (detected by its leading 0x30 SEQUENCE byte;
    base64 of DER starts with "M").  Returns certificates in the order they appear on the wire.

    Errors are BadResponse (502): body_too_large, bad_base64, bad_pem,
    bad_pkcs7 (not a PKCS#7 SignedData, or no certificates in it).  Nothing else escapes.
    """
    data = bytes(body)
    if len(data) > max_size:
        raise BadResponse("body_too_large", f"body is {len(data)} bytes; the limit is {max_size}")
    try:
        if data[:1] == b"\x30":
            der = data  # raw DER; base64 of a SEQUENCE starts with "M", never with "0" (0x30)
        else:
            der = decode_base64_body(data, max_size=max_size, pem_labels=PEM_PKCS7_LABELS)
    except EstError as exc:
        raise BadResponse(exc.code, exc.message) from None
    try:
        certs = pkcs7.load_der_pkcs7_certificates(der)
    except x509.InvalidVersion:  # not a ValueError: a certificate in it is neither v1, v2 nor v3
        raise BadResponse("bad_pkcs7", "a certificate in the PKCS#7 SignedData has an invalid version") from None
    except ValueError:
        raise BadResponse("bad_pkcs7", "body is not a DER PKCS#7 SignedData with certificates") from None
    except UnsupportedAlgorithm:  # a well-formed ContentInfo of another type (data, envelopedData, ...)
        raise BadResponse("bad_pkcs7", "PKCS#7 content type is not SignedData") from None
    if not certs:
        raise BadResponse("bad_pkcs7", "PKCS#7 SignedData contains no certificates")
    return list(certs)
