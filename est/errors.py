"""EST error types: one exception class carrying an HTTP status, a machine code and a human message."""

from __future__ import annotations

__all__ = [
    "EstError",
    "BadRequest",
    "Unauthorized",
    "Forbidden",
    "PayloadTooLarge",
    "UnsupportedMediaType",
    "TooManyRequests",
    "BadResponse",
    "safe_repr",
]


class EstError(Exception):
    """An EST protocol error.

    ``status`` is the HTTP status a server should answer with, ``code`` a short
    stable machine string (e.g. ``"bad_csr"``) and ``message`` a precise human
    explanation.  Messages never contain secrets (passwords, raw bodies).
    """

    status: int = 400

    def __init__(self, code: str, message: str, *, status: int | None = None) -> None:
        if status is not None:
            self.status = status
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, code={self.code!r}, message={self.message!r})"


class BadRequest(EstError):
    """400: the request body or header is malformed or violates policy."""

    status = 400


class Unauthorized(EstError):
    """401: missing or malformed credentials."""

    status = 401


class Forbidden(EstError):
    """403: well-formed request asking for something the requester may not have."""

    status = 403


class PayloadTooLarge(EstError):
    """413: body exceeds the configured size limit."""

    status = 413


class UnsupportedMediaType(EstError):
    """415: request Content-Type is not the one the endpoint accepts."""

    status = 415


class TooManyRequests(EstError):
    """429: a rate limit; ``retry_after`` is the whole seconds to wait (the Retry-After header)."""

    status = 429

    def __init__(self, code: str, message: str, *, retry_after: int = 1) -> None:
        super().__init__(code, message)
        self.retry_after = retry_after


class BadResponse(EstError):
    """502: client side, the EST server's response could not be understood."""

    status = 502


def safe_repr(value: object, limit: int = 64) -> str:
    """repr() of an untrusted value, truncated, for use inside error messages."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text
