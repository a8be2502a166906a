"""hub.est.server: single-valued headers sent twice are found (the old handler let the last Authorization win)."""

from __future__ import annotations

from email.message import Message

from hub.est.server import repeated_headers


def headers(*pairs: tuple[str, str]) -> Message:
    msg = Message()
    for name, value in pairs:
        msg[name] = value
    return msg


def test_a_second_authorization_or_content_length_is_found():
    assert repeated_headers(headers(("Authorization", "Basic a"), ("authorization", "Basic b"))) == ("authorization",)
    assert repeated_headers(headers(("Content-Length", "5"), ("Content-Length", "500"),
                                    ("Content-Type", "application/pkcs10"))) == ("content-length",)


def test_single_headers_and_repeatable_ones_pass():
    assert repeated_headers(headers(("Authorization", "Basic a"), ("Accept", "a"), ("Accept", "b"))) == ()
