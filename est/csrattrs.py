"""CSR Attributes (RFC 7030 4.5): a tiny strict DER codec for SEQUENCE OF (OID | Attribute)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import AttributeOID, PublicKeyAlgorithmOID, SignatureAlgorithmOID

from .errors import BadResponse, EstError
from .messages import MAX_CERTS_BODY, decode_base64_body, encode_base64_body

# cryptography has no CsrAttrs type and no public OID encoder; this module is the
# only hand-written DER in the package and is limited to the three tags below.

__all__ = [
    "CsrAttribute",
    "CsrAttrItem",
    "OID_EC_PUBLIC_KEY",
    "OID_SECP256R1",
    "OID_SECP384R1",
    "OID_ECDSA_WITH_SHA256",
    "OID_ECDSA_WITH_SHA384",
    "OID_CHALLENGE_PASSWORD",
    "OID_EXTENSION_REQUEST",
    "DEFAULT_CSRATTRS",
    "build_csrattrs",
    "csrattrs_response",
    "parse_csrattrs",
]

_SEQUENCE, _SET, _OID = 0x30, 0x31, 0x06
_MAX_OID_BYTES = 63  # the longest OBJECT IDENTIFIER content cryptography represents

OID_EC_PUBLIC_KEY = PublicKeyAlgorithmOID.EC_PUBLIC_KEY
OID_SECP256R1 = x509.ObjectIdentifier("1.2.840.10045.3.1.7")
OID_SECP384R1 = x509.ObjectIdentifier("1.3.132.0.34")
OID_ECDSA_WITH_SHA256 = SignatureAlgorithmOID.ECDSA_WITH_SHA256
OID_ECDSA_WITH_SHA384 = SignatureAlgorithmOID.ECDSA_WITH_SHA384
OID_CHALLENGE_PASSWORD = AttributeOID.CHALLENGE_PASSWORD
OID_EXTENSION_REQUEST = x509.ObjectIdentifier("1.2.840.113549.1.9.14")


@dataclass(frozen=True)
class CsrAttribute:
    """An ``Attribute`` item: type OID plus a non-empty set of values.

    Values are OIDs, or the raw DER of one element for anything else (parse
    side; the builder re-emits such bytes after checking they are one TLV).
    """

    oid: x509.ObjectIdentifier
    values: tuple[x509.ObjectIdentifier | bytes, ...]


CsrAttrItem = x509.ObjectIdentifier | CsrAttribute

DEFAULT_CSRATTRS: tuple[CsrAttrItem, ...] = (
    CsrAttribute(OID_EC_PUBLIC_KEY, (OID_SECP256R1,)),
    OID_ECDSA_WITH_SHA256,
)
"""Advertise: EC key on P-256, signed with ecdsa-with-SHA256."""


def build_csrattrs(items: Iterable[CsrAttrItem] = DEFAULT_CSRATTRS) -> bytes:
    """DER ``CsrAttrs`` for ``items`` (order kept; attribute value SETs sorted as DER requires)."""
    parts = []
    for item in items:
        if isinstance(item, x509.ObjectIdentifier):
            parts.append(_encode_oid(item))
        elif isinstance(item, CsrAttribute):
            if not item.values:
                raise ValueError(f"attribute {item.oid.dotted_string} needs at least one value")
            values = sorted(_encode_value(v) for v in item.values)
            parts.append(_tlv(_SEQUENCE, _encode_oid(item.oid) + _tlv(_SET, b"".join(values))))
        else:
            raise TypeError(f"CsrAttrs item must be ObjectIdentifier or CsrAttribute, not {type(item).__name__}")
    return _tlv(_SEQUENCE, b"".join(parts))


def csrattrs_response(items: Iterable[CsrAttrItem] = DEFAULT_CSRATTRS) -> bytes:
    """Server side: /csrattrs body (base64 of :func:`build_csrattrs`), Content-Type application/csrattrs."""
    return encode_base64_body(build_csrattrs(items))


def parse_csrattrs(body: bytes, *, max_size: int = MAX_CERTS_BODY) -> list[CsrAttrItem]:
    """Client side: items of a /csrattrs body (base64, or raw DER starting with SEQUENCE).

    An empty (or whitespace-only) body means no attributes.  Errors are
    BadResponse (502): body_too_large, bad_base64, bad_csrattrs.
    """
    data = bytes(body)
    if len(data) > max_size:
        raise BadResponse("body_too_large", f"body is {len(data)} bytes; the limit is {max_size}")
    if not data.strip():
        return []
    if data[0] == _SEQUENCE:
        der = data  # raw DER; base64 of a SEQUENCE starts with "M", never with "0" (0x30)
    else:
        try:
            der = decode_base64_body(data, max_size=max_size)
        except EstError as exc:
            raise BadResponse(exc.code, exc.message) from None
    tag, start, end = _read_tlv(der, 0)
    if tag != _SEQUENCE or end != len(der):
        raise _bad("top level is not a single SEQUENCE")
    items: list[CsrAttrItem] = []
    pos = start
    while pos < end:
        tag, cstart, cend = _read_tlv(der, pos)
        if tag == _OID:
            items.append(_decode_oid(der[cstart:cend]))
        elif tag == _SEQUENCE:
            items.append(_parse_attribute(der, cstart, cend))
        else:
            raise _bad(f"item at offset {pos} has tag 0x{tag:02x}, expected OID or SEQUENCE")
        pos = cend
    return items


def _parse_attribute(der: bytes, start: int, end: int) -> CsrAttribute:
    tag, ostart, oend = _read_tlv(der, start, end)
    if tag != _OID:
        raise _bad(f"attribute at offset {start} does not start with an OID")
    tag, sstart, send = _read_tlv(der, oend, end)
    if tag != _SET or send != end:
        raise _bad(f"attribute at offset {start} is not OID followed by a SET of values")
    values: list[x509.ObjectIdentifier | bytes] = []
    pos = sstart
    while pos < send:
        vtag, vstart, vend = _read_tlv(der, pos, send)
        values.append(_decode_oid(der[vstart:vend]) if vtag == _OID else der[pos:vend])
        pos = vend
    if not values:
        raise _bad(f"attribute at offset {start} has an empty value SET")
    return CsrAttribute(_decode_oid(der[ostart:oend]), tuple(values))


def _bad(message: str) -> BadResponse:
    return BadResponse("bad_csrattrs", f"CsrAttrs DER: {message}")


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def _read_tlv(der: bytes, pos: int, limit: int | None = None) -> tuple[int, int, int]:
    """Return ``(tag, content_start, content_end)`` of the DER element at ``pos`` (definite, minimal lengths)."""
    limit = len(der) if limit is None else limit
    if pos + 2 > limit:
        raise _bad(f"truncated element at offset {pos}")
    tag, first = der[pos], der[pos + 1]
    if tag & 0x1F == 0x1F:
        raise _bad(f"high-tag-number form at offset {pos}")
    pos += 2
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise _bad(f"indefinite length at offset {pos - 2} (BER, not DER)")
    else:
        n = first & 0x7F
        if n > 4 or pos + n > limit:
            raise _bad(f"bad length field at offset {pos - 2}")
        length = int.from_bytes(der[pos : pos + n], "big")
        if der[pos] == 0 or length < 0x80:
            raise _bad(f"non-minimal length at offset {pos - 2}")
        pos += n
    if pos + length > limit:
        raise _bad(f"element at offset {pos} overruns its container")
    return tag, pos, pos + length


def _encode_value(value: x509.ObjectIdentifier | bytes) -> bytes:
    if isinstance(value, x509.ObjectIdentifier):
        return _encode_oid(value)
    raw = bytes(value)
    try:
        _, _, end = _read_tlv(raw, 0)
    except BadResponse as exc:
        raise ValueError(f"raw attribute value is not one DER element: {exc.message}") from None
    if end != len(raw):
        raise ValueError("raw attribute value has trailing bytes after its DER element")
    return raw


def _encode_oid(oid: x509.ObjectIdentifier) -> bytes:
    arcs = [int(a) for a in oid.dotted_string.split(".")]
    out = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return _tlv(_OID, bytes(out))


def _decode_oid(content: bytes) -> x509.ObjectIdentifier:
    if not content or content[-1] & 0x80:
        raise _bad("empty or truncated OBJECT IDENTIFIER")
    arcs: list[int] = []
    value, fresh = 0, True
    for byte in content:
        if fresh and byte == 0x80:
            raise _bad("non-minimal OBJECT IDENTIFIER arc")
        value = (value << 7) | (byte & 0x7F)
        fresh = not byte & 0x80
        if fresh:
            arcs.append(value)
            value = 0
    # cryptography's limits, checked before it sees the OID: past them it raises ValueError, or (a first
    # subidentifier of 2**128 or more) panics with an "attempt to add with overflow" that is no Exception at all
    if len(content) > _MAX_OID_BYTES:
        raise _bad(f"OBJECT IDENTIFIER is {len(content)} bytes; at most {_MAX_OID_BYTES} are supported")
    if any(arc >> 128 for arc in arcs):
        raise _bad("OBJECT IDENTIFIER has an arc wider than 128 bits")
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    try:
        return x509.ObjectIdentifier(".".join(str(a) for a in head + arcs[1:]))
    except ValueError:  # a backstop: anything else cryptography cannot represent
        raise _bad("OBJECT IDENTIFIER cannot be represented") from None
