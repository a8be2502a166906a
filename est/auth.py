"""HTTP Basic authentication for EST (RFC 7617, RFC 7030 3.2.3), with passwords kept out of errors and reprs."""

from __future__ import annotations

import base64
import binascii
import re
from typing import NamedTuple

from .errors import Unauthorized

__all__ = ["BasicCredentials", "MAX_AUTH_HEADER", "basic_auth_header", "parse_basic_auth", "www_authenticate"]

MAX_AUTH_HEADER = 4096
_CTL_RE = re.compile(r"[\x00-\x1f\x7f]")
_TOKEN68_RE = re.compile(r"[A-Za-z0-9+/]+=*")


class BasicCredentials(NamedTuple):
    """``(user, password)``; unpacks like a tuple, but repr/str never show the password.

    Compare passwords with ``hmac.compare_digest`` (or better, a password hash).
    """

    user: str
    password: str

    def __repr__(self) -> str:
        return f"BasicCredentials(user={self.user!r}, password=<redacted>)"

    __str__ = __repr__


def basic_auth_header(user: str, password: str) -> str:
    """Client side: the ``Authorization`` header value for Basic auth (UTF-8, RFC 7617).

    Raises ValueError if ``user`` is empty or contains ':' or either part has
    a control character (the message never includes the password).
    """
    if not user:
        raise ValueError("Basic auth user-id must not be empty")
    if ":" in user:
        raise ValueError("Basic auth user-id must not contain ':'")
    if _CTL_RE.search(user):
        raise ValueError("Basic auth user-id must not contain control characters")
    if _CTL_RE.search(password):
        raise ValueError("Basic auth password must not contain control characters")
    token = base64.b64encode(f"{user}:{password}".encode("utf-8")).decode("ascii")
    return f"Basic {token}"


def parse_basic_auth(header: str | bytes | None) -> BasicCredentials:
    """Server side: parse an ``Authorization`` header carrying Basic credentials.

    Errors (401): missing_auth (absent/empty), bad_auth_scheme (not Basic),
    bad_auth_encoding (not strict base64, not UTF-8, too long),
    bad_auth_format (no ':' separator, empty user-id, control characters).
    No error message includes any part of the header.
    """
    if isinstance(header, bytes):
        try:
            header = header.decode("ascii")
        except UnicodeDecodeError:
            raise Unauthorized("bad_auth_encoding", "Authorization header is not ASCII") from None
    if header is None or not header.strip():
        raise Unauthorized("missing_auth", "Authorization header is missing")
    if len(header) > MAX_AUTH_HEADER:
        raise Unauthorized("bad_auth_encoding", f"Authorization header is longer than {MAX_AUTH_HEADER} characters")
    scheme, _, rest = header.strip(" \t").partition(" ")
    if scheme.lower() != "basic":
        # never echo the scheme: a client that forgot "Basic " would put its credentials there
        raise Unauthorized("bad_auth_scheme", "Authorization scheme is not Basic")
    token = rest.strip(" \t")
    if not token:
        raise Unauthorized("bad_auth_encoding", "Basic credentials are empty")
    if not _TOKEN68_RE.fullmatch(token) or len(token) % 4:
        raise Unauthorized("bad_auth_encoding", "Basic credentials are not valid base64")
    try:
        raw = binascii.a2b_base64(token, strict_mode=True)
    except binascii.Error:
        raise Unauthorized("bad_auth_encoding", "Basic credentials are not valid base64") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Unauthorized("bad_auth_encoding", "Basic credentials are not UTF-8") from None
    user, sep, password = text.partition(":")
    if not sep:
        raise Unauthorized("bad_auth_format", "Basic credentials have no ':' between user-id and password")
    if not user:
        raise Unauthorized("bad_auth_format", "Basic credentials have an empty user-id")
    if _CTL_RE.search(text):
        raise Unauthorized("bad_auth_format", "Basic credentials contain control characters")
    return BasicCredentials(user, password)


def www_authenticate(realm: str = "tessera-est") -> str:
    """Server side: ``WWW-Authenticate`` value to send with a 401."""
    if _CTL_RE.search(realm):
        raise ValueError("realm must not contain control characters")
    quoted = realm.replace("\\", "\\\\").replace('"', '\\"')
    return f'Basic realm="{quoted}", charset="UTF-8"'
