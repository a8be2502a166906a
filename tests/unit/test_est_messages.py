"""Unit tests for est.messages and est.errors: paths, content types, RFC 8951 base64 bodies."""

from __future__ import annotations

import base64
import os

import pytest

from est import errors
from est.messages import (
    CT_PKCS7_CERTS_ONLY,
    MAX_CSR_BODY,
    PATH_CACERTS,
    PATH_CSRATTRS,
    PATH_SIMPLEENROLL,
    PATH_SIMPLEREENROLL,
    check_request_content_type,
    decode_base64_body,
    encode_base64_body,
    is_certs_only_content_type,
    parse_content_type,
    split_est_path,
)


# --- errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "status"),
    [
        (errors.BadRequest, 400),
        (errors.Unauthorized, 401),
        (errors.Forbidden, 403),
        (errors.PayloadTooLarge, 413),
        (errors.UnsupportedMediaType, 415),
        (errors.BadResponse, 502),
    ],
)
def test_error_subclasses_carry_status_code_and_message(cls, status):
    err = cls("some_code", "what went wrong")
    assert isinstance(err, errors.EstError)
    assert (err.status, err.code, err.message) == (status, "some_code", "what went wrong")
    assert str(err) == "some_code: what went wrong"
    assert f"status={status}" in repr(err)


def test_error_status_override():
    assert errors.EstError("unknown_operation", "x", status=404).status == 404


def test_safe_repr_truncates():
    text = errors.safe_repr("a" * 500, limit=20)
    assert len(text) == 20 and text.endswith("...")


# --- paths --------------------------------------------------------------------


def test_well_known_paths():
    assert PATH_CACERTS == "/.well-known/est/cacerts"
    assert PATH_SIMPLEENROLL == "/.well-known/est/simpleenroll"
    assert PATH_SIMPLEREENROLL == "/.well-known/est/simplereenroll"
    assert PATH_CSRATTRS == "/.well-known/est/csrattrs"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/.well-known/est/cacerts", (None, "cacerts")),
        ("/.well-known/est/simpleenroll", (None, "simpleenroll")),
        ("/.well-known/est/fleet-a/simplereenroll", ("fleet-a", "simplereenroll")),
        ("/.well-known/est/ca1/csrattrs", ("ca1", "csrattrs")),
    ],
)
def test_split_est_path_accepts(path, expected):
    assert split_est_path(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        "/.well-known/est/",
        "/.well-known/est/serverkeygen",
        "/.well-known/est/a/b/simpleenroll",
        "/.well-known/est//simpleenroll",
        "/.well-known/est/../simpleenroll",
        "/est/simpleenroll",
        "/.well-known/estsimpleenroll",
    ],
)
def test_split_est_path_refuses(path):
    with pytest.raises(errors.EstError) as exc:
        split_est_path(path)
    assert (exc.value.status, exc.value.code) == (404, "unknown_operation")


# --- content types ------------------------------------------------------------


def test_parse_content_type_lowercases_and_unquotes():
    mime, params = parse_content_type('Application/PKCS7-MIME; SMIME-Type="certs-only" ;name=x.p7c')
    assert mime == "application/pkcs7-mime"
    assert params == {"smime-type": "certs-only", "name": "x.p7c"}


def test_parse_content_type_quoted_pair_and_semicolon_inside_quotes():
    mime, params = parse_content_type(r'text/plain; a="x;\"y\""')
    assert mime == "text/plain"
    assert params == {"a": 'x;"y"'}


def test_parse_content_type_tolerates_trailing_semicolon_and_bytes():
    assert parse_content_type(b"application/pkcs10;") == ("application/pkcs10", {})


@pytest.mark.parametrize(
    "header",
    [None, "", "   ", "application", "application/", "/pkcs10", "application/pkcs10 extra",
     "application/pkcs10; =x", 'application/pkcs10; a="unterminated', "application/pkcs10; a=1; A=2"],
)
def test_parse_content_type_refuses_malformed(header):
    with pytest.raises(errors.UnsupportedMediaType) as exc:
        parse_content_type(header)
    assert (exc.value.status, exc.value.code) == (415, "bad_content_type")


@pytest.mark.parametrize(
    "header", ["application/pkcs10", "APPLICATION/PKCS10", "application/pkcs10; charset=binary", " application/pkcs10 "]
)
def test_check_request_content_type_accepts_pkcs10(header):
    check_request_content_type(header)


@pytest.mark.parametrize(
    "header", ["application/pkcs7-mime", "application/pkcs10x", "text/plain", "application/x-pem-file", None]
)
def test_check_request_content_type_refuses_others_with_415(header):
    with pytest.raises(errors.EstError) as exc:
        check_request_content_type(header)
    assert (exc.value.status, exc.value.code) == (415, "bad_content_type")


def test_check_request_content_type_names_expected_and_actual():
    with pytest.raises(errors.EstError) as exc:
        check_request_content_type("text/plain")
    assert "application/pkcs10" in exc.value.message and "text/plain" in exc.value.message


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (CT_PKCS7_CERTS_ONLY, True),
        ("application/pkcs7-mime", True),
        ('Application/PKCS7-mime; smime-type="CERTS-ONLY"', True),
        ("application/pkcs7-mime; smime-type=server-generated-key", False),
        ("application/pkcs10", False),
        ("garbage", False),
        (None, False),
    ],
)
def test_is_certs_only_content_type(header, expected):
    assert is_certs_only_content_type(header) is expected


# --- base64 bodies (RFC 8951) -------------------------------------------------


def test_decode_plain_base64():
    assert decode_base64_body(base64.b64encode(b"\x30\x03\x02\x01\x05")) == b"\x30\x03\x02\x01\x05"


def test_decode_rfc7030_style_crlf_wrapped_and_whitespace():
    der = os.urandom(300)
    text = base64.b64encode(der)
    wrapped = b"\r\n".join(text[i : i + 64] for i in range(0, len(text), 64)) + b"\r\n"
    assert decode_base64_body(wrapped) == der
    assert decode_base64_body(b"  \n" + text[:10] + b" \t" + text[10:] + b"\n\n") == der


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "empty"),
        (b" \r\n\t", "empty"),
        (b"QUJD*RA==", "0x2a at offset 4"),
        (b"QUJD\x00RA==", "0x00 at offset 4"),
        (b"QUJD-_==", "0x2d at offset 4"),  # base64url alphabet is not base64
        (b"QUJDRA", "multiple of 4"),  # missing padding
        (b"QUJDRA==QUJD", "invalid base64"),  # data after padding
        (b"=QUJ", "invalid base64"),
        (b"QU=D", "invalid base64"),
        (b"QUJD\xc3\xa9A==", "0xc3"),
        (b"QUJD\x0bRA==", "0x0b"),  # vertical tab is not tolerated whitespace
    ],
)
def test_decode_refuses_bad_base64(body, fragment):
    with pytest.raises(errors.BadRequest) as exc:
        decode_base64_body(body)
    assert (exc.value.status, exc.value.code) == (400, "bad_base64")
    assert fragment in exc.value.message


def test_decode_size_limit_checked_before_decoding():
    # the body is not even base64: 413 must win, proving the limit is applied first
    body = b"*" * (MAX_CSR_BODY + 1)
    with pytest.raises(errors.PayloadTooLarge) as exc:
        decode_base64_body(body)
    assert (exc.value.status, exc.value.code) == (413, "body_too_large")
    assert str(MAX_CSR_BODY) in exc.value.message


def test_decode_size_limit_is_inclusive_and_configurable():
    body = base64.b64encode(b"x" * 30)  # 40 bytes
    assert decode_base64_body(body, max_size=40) == b"x" * 30
    with pytest.raises(errors.PayloadTooLarge):
        decode_base64_body(body, max_size=39)


def test_decode_pem_armor_only_when_labels_given():
    pem = b"-----BEGIN THING-----\nQUJD\n-----END THING-----\n"
    assert decode_base64_body(pem, pem_labels={"THING"}) == b"ABC"
    with pytest.raises(errors.BadRequest) as exc:
        decode_base64_body(pem)
    assert exc.value.code == "bad_base64"


@pytest.mark.parametrize(
    "pem",
    [
        b"-----BEGIN OTHER-----\nQUJD\n-----END OTHER-----\n",
        b"-----BEGIN THING-----\nQUJD\n-----END OTHER-----\n",
        b"-----BEGIN THING-----\nQUJD\n-----END THING-----\ntrailing",
        b"-----BEGIN THING-----\nQUJD\n",
    ],
)
def test_decode_refuses_bad_pem_armor(pem):
    with pytest.raises(errors.BadRequest) as exc:
        decode_base64_body(pem, pem_labels={"THING"})
    assert exc.value.code == "bad_pem"


@pytest.mark.parametrize("size", [0, 1, 2, 3, 47, 48, 49, 100, 1000])
def test_encode_wraps_at_64_with_crlf_and_round_trips(size):
    der = os.urandom(size)
    body = encode_base64_body(der)
    if size:
        assert body.endswith(b"\r\n")
        lines = body[:-2].split(b"\r\n")
        assert all(len(line) == 64 for line in lines[:-1])
        assert 0 < len(lines[-1]) <= 64
        assert b"\n" not in body.replace(b"\r\n", b"")
        assert decode_base64_body(body, max_size=10_000) == der
    else:
        assert body == b""


def test_encode_exact_layout():
    body = encode_base64_body(bytes(range(100)))  # 136 base64 characters
    assert [len(line) for line in body.split(b"\r\n")] == [64, 64, 8, 0]
