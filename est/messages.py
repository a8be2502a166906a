"""EST wire constants and body/header codecs (RFC 7030 with RFC 8951 base64 rules), free of I/O."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Collection

from .errors import BadRequest, EstError, PayloadTooLarge, UnsupportedMediaType, safe_repr

__all__ = [
    "WELL_KNOWN_PREFIX",
    "OP_CACERTS",
    "OP_SIMPLEENROLL",
    "OP_SIMPLEREENROLL",
    "OP_CSRATTRS",
    "OPERATIONS",
    "PATH_CACERTS",
    "PATH_SIMPLEENROLL",
    "PATH_SIMPLEREENROLL",
    "PATH_CSRATTRS",
    "CT_PKCS10",
    "CT_PKCS7_CERTS_ONLY",
    "CT_CSRATTRS",
    "MAX_CSR_BODY",
    "MAX_CERTS_BODY",
    "split_est_path",
    "parse_content_type",
    "check_request_content_type",
    "is_certs_only_content_type",
    "decode_base64_body",
    "encode_base64_body",
]

WELL_KNOWN_PREFIX = "/.well-known/est"
OP_CACERTS = "cacerts"
OP_SIMPLEENROLL = "simpleenroll"
OP_SIMPLEREENROLL = "simplereenroll"
OP_CSRATTRS = "csrattrs"
OPERATIONS = frozenset({OP_CACERTS, OP_SIMPLEENROLL, OP_SIMPLEREENROLL, OP_CSRATTRS})
PATH_CACERTS = f"{WELL_KNOWN_PREFIX}/{OP_CACERTS}"
PATH_SIMPLEENROLL = f"{WELL_KNOWN_PREFIX}/{OP_SIMPLEENROLL}"
PATH_SIMPLEREENROLL = f"{WELL_KNOWN_PREFIX}/{OP_SIMPLEREENROLL}"
PATH_CSRATTRS = f"{WELL_KNOWN_PREFIX}/{OP_CSRATTRS}"

CT_PKCS10 = "application/pkcs10"
CT_PKCS7_CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
CT_CSRATTRS = "application/csrattrs"

MAX_CSR_BODY = 16 * 1024
"""Largest accepted request body (before base64 decoding); an RSA-8192 CSR is ~2.5 KiB of base64."""
MAX_CERTS_BODY = 256 * 1024
"""Largest certs-only / csrattrs response body the client side accepts."""

_WHITESPACE = b" \t\r\n"
_B64_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~-]*")  # RFC 7030 3.2.2 CA label (one path segment)

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[\t\x20-\x7e])*"'
_MEDIA_RE = re.compile(rf"[ \t]*({_TOKEN})/({_TOKEN})[ \t]*")
_PARAM_RE = re.compile(rf";[ \t]*(?:({_TOKEN})=({_TOKEN}|{_QUOTED})[ \t]*)?")
_QUOTED_PAIR_RE = re.compile(r"\\(.)")
_PEM_RE = re.compile(
    rb"\A[ \t\r\n]*-----BEGIN ([A-Z0-9 ]{1,40})-----\r?\n(.*?)-----END \1-----[ \t\r\n]*\Z", re.S
)


def split_est_path(path: str) -> tuple[str | None, str]:
    """Split ``/.well-known/est[/<label>]/<operation>`` into ``(label, operation)``.

    Raises EstError(404, "unknown_operation") for anything else (query strings
    must be stripped by the caller).
    """
    prefix = WELL_KNOWN_PREFIX + "/"
    if not path.startswith(prefix):
        raise EstError("unknown_operation", f"path is not under {WELL_KNOWN_PREFIX}/", status=404)
    parts = path[len(prefix):].split("/")
    if len(parts) == 1 and parts[0] in OPERATIONS:
        return None, parts[0]
    if len(parts) == 2 and parts[1] in OPERATIONS and _LABEL_RE.fullmatch(parts[0]):
        return parts[0], parts[1]
    raise EstError("unknown_operation", f"no EST operation at path {safe_repr(path)}", status=404)


def parse_content_type(header: str | bytes | None) -> tuple[str, dict[str, str]]:
    """Parse a Content-Type header into ``(mime, params)``.

    ``mime`` and parameter names are lower-cased, quoted values unquoted.
    Raises UnsupportedMediaType("bad_content_type") when missing or malformed.
    """
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    if header is None or not header.strip():
        raise UnsupportedMediaType("bad_content_type", "Content-Type header is missing")
    m = _MEDIA_RE.match(header)
    if m is None:
        raise UnsupportedMediaType("bad_content_type", "Content-Type is not a type/subtype media type")
    mime = f"{m.group(1)}/{m.group(2)}".lower()
    params: dict[str, str] = {}
    pos = m.end()
    while pos < len(header):
        p = _PARAM_RE.match(header, pos)
        if p is None:
            raise UnsupportedMediaType(
                "bad_content_type", f"Content-Type has a malformed parameter at offset {pos}"
            )
        pos = p.end()
        if p.group(1) is None:  # empty parameter, e.g. a trailing ';'
            continue
        name, value = p.group(1).lower(), p.group(2)
        if value.startswith('"'):
            value = _QUOTED_PAIR_RE.sub(r"\1", value[1:-1])
        if name in params:
            raise UnsupportedMediaType("bad_content_type", f"Content-Type repeats parameter {name!r}")
        params[name] = value
    return mime, params


def check_request_content_type(header: str | bytes | None, expected: str = CT_PKCS10) -> dict[str, str]:
    """Require the request media type ``expected`` (case-insensitive, any parameters); return the params.

    Raises UnsupportedMediaType (415, "bad_content_type") otherwise.
    """
    mime, params = parse_content_type(header)
    if mime != expected.lower():
        raise UnsupportedMediaType(
            "bad_content_type", f"expected Content-Type {expected}, got {safe_repr(mime)}"
        )
    return params


def is_certs_only_content_type(header: str | bytes | None) -> bool:
    """Client side: is this an ``application/pkcs7-mime`` response whose smime-type (if any) is certs-only?"""
    try:
        mime, params = parse_content_type(header)
    except EstError:
        return False
    smime_type = params.get("smime-type")
    return mime == "application/pkcs7-mime" and (smime_type is None or smime_type.lower() == "certs-only")


def decode_base64_body(
    body: bytes, *, max_size: int = MAX_CSR_BODY, pem_labels: Collection[str] = ()
) -> bytes:
    """Decode an EST body per RFC 8951: always base64, Content-Transfer-Encoding ignored.

    The size limit applies to the raw body before anything else (413
    "body_too_large").  Spaces, tabs, CR and LF are ignored anywhere; any other
    non-alphabet byte, bad padding or data after padding is refused (400
    "bad_base64").  If ``pem_labels`` is given, a body wrapped in PEM armor with
    one of those labels is unwrapped first (400 "bad_pem" if the armor is
    malformed or has another label).
    """
    data = bytes(body)
    if len(data) > max_size:
        raise PayloadTooLarge("body_too_large", f"body is {len(data)} bytes; the limit is {max_size}")
    if pem_labels:
        data = _strip_pem_armor(data, pem_labels)
    compact = data.translate(None, _WHITESPACE)
    if not compact:
        raise BadRequest("bad_base64", "body is empty")
    if compact.translate(None, _B64_CHARS):
        offset = next(i for i, b in enumerate(data) if b not in _B64_CHARS and b not in _WHITESPACE)
        raise BadRequest(
            "bad_base64", f"body has a non-base64 byte 0x{data[offset]:02x} at offset {offset}"
        )
    if len(compact) % 4:
        raise BadRequest(
            "bad_base64", f"base64 text is {len(compact)} characters, not a multiple of 4 (missing padding?)"
        )
    try:
        return binascii.a2b_base64(compact, strict_mode=True)
    except binascii.Error as exc:
        raise BadRequest("bad_base64", f"invalid base64: {exc}") from None


def encode_base64_body(der: bytes) -> bytes:
    """Base64-encode DER for an EST body: 64-character lines, each ended by CRLF (RFC 7030 examples)."""
    text = base64.b64encode(der)
    return b"".join(text[i : i + 64] + b"\r\n" for i in range(0, len(text), 64))


def _strip_pem_armor(data: bytes, labels: Collection[str]) -> bytes:
    """Return the base64 text inside PEM armor, or ``data`` unchanged if it is not armored."""
    if not data.lstrip(_WHITESPACE).startswith(b"-----BEGIN "):
        return data
    m = _PEM_RE.match(data)
    if m is None:
        raise BadRequest("bad_pem", "body starts with PEM armor but it is malformed or followed by data")
    label = m.group(1).decode("ascii")
    if label not in labels:
        raise BadRequest(
            "bad_pem", f"PEM label {label!r} is not one of {', '.join(sorted(labels))}"
        )
    return m.group(2)
