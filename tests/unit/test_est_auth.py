"""Unit tests for est.auth: Basic auth header building and strict parsing, without leaking passwords."""

from __future__ import annotations

import base64

import pytest

from est import errors
from est.auth import MAX_AUTH_HEADER, BasicCredentials, basic_auth_header, parse_basic_auth, www_authenticate

SECRET = "s3cr3t-Pa55"


def b64(text: str | bytes) -> str:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


def refuse(header, code: str) -> errors.EstError:
    with pytest.raises(errors.Unauthorized) as exc:
        parse_basic_auth(header)
    err = exc.value
    assert (err.status, err.code) == (401, code)
    return err


@pytest.mark.parametrize(
    ("user", "password"),
    [("dev-1", SECRET), ("dev-1", ""), ("dev-1", "a:b:c"), ("gerät-ü", "pässwörd €"), ("u", " spaced ")],
)
def test_round_trip(user, password):
    header = basic_auth_header(user, password)
    assert header.startswith("Basic ")
    creds = parse_basic_auth(header)
    assert creds == (user, password)
    assert (creds.user, creds.password) == (user, password)


def test_header_matches_rfc7617_example():
    assert basic_auth_header("Aladdin", "open sesame") == "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="


@pytest.mark.parametrize("header", ["basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==", "BASIC   QWxhZGRpbjpvcGVuIHNlc2FtZQ==  ",
                                    b"Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="])
def test_parse_is_lenient_on_scheme_case_and_spacing(header):
    assert parse_basic_auth(header) == ("Aladdin", "open sesame")


def test_password_not_in_repr_or_str():
    creds = parse_basic_auth(basic_auth_header("dev-1", SECRET))
    assert SECRET not in repr(creds) and SECRET not in str(creds) and SECRET not in f"{creds}"
    assert "dev-1" in repr(creds) and "redacted" in repr(creds)
    user, password = creds
    assert password == SECRET


@pytest.mark.parametrize("header", [None, "", "   ", b""])
def test_missing(header):
    refuse(header, "missing_auth")


@pytest.mark.parametrize("header", ["Bearer abc.def", "Digest username=x", "Basicx " + b64("a:b"), "Negotiate"])
def test_non_basic_scheme(header):
    refuse(header, "bad_auth_scheme")


def test_scheme_error_does_not_echo_credentials_sent_without_scheme():
    token = b64(f"dev-1:{SECRET}")
    err = refuse(token, "bad_auth_scheme")
    assert token not in str(err) and token not in repr(err) and SECRET not in str(err)


@pytest.mark.parametrize(
    "header",
    [
        "Basic",
        "Basic   ",
        "Basic !!!!",
        "Basic " + b64("dev:pwx").rstrip("="),  # missing padding
        "Basic " + b64("dev:pwx") + "AAAA",  # data after padding
        "Basic " + b64("dev:pwx").replace("=", "") + "=",  # wrong padding
        "Basic ZGV2 OnB3",  # space inside the token
        "Basic " + b64(b"dev:\xff\xfe"),  # not UTF-8
        "Basic " + "A" * MAX_AUTH_HEADER,
        "Basic é" .encode("utf-8"),
    ],
)
def test_bad_encoding(header):
    err = refuse(header, "bad_auth_encoding")
    assert "dev" not in err.message


def test_bad_encoding_with_url_alphabet():
    token = b64("dev-1:??>>")
    assert "+" in token
    refuse("Basic " + token.replace("+", "-"), "bad_auth_encoding")


def test_no_colon_does_not_echo_decoded_text():
    err = refuse("Basic " + b64(SECRET), "bad_auth_format")
    assert SECRET not in str(err) and b64(SECRET) not in str(err)
    assert "':'" in err.message


@pytest.mark.parametrize("decoded", [":" + SECRET, "dev\x00:" + SECRET, "dev:" + SECRET + "\n"])
def test_bad_format(decoded):
    err = refuse("Basic " + b64(decoded), "bad_auth_format")
    assert SECRET not in str(err)


@pytest.mark.parametrize(
    ("user", "password"),
    [("", SECRET), ("a:b", SECRET), ("a\nb", SECRET), ("dev", SECRET + "\r\nX-Evil: 1")],
)
def test_header_builder_refuses_unencodable_input(user, password):
    with pytest.raises(ValueError) as exc:
        basic_auth_header(user, password)
    assert SECRET not in str(exc.value)


def test_www_authenticate():
    assert www_authenticate() == 'Basic realm="tessera-est", charset="UTF-8"'
    assert www_authenticate('a "b" \\c') == 'Basic realm="a \\"b\\" \\\\c", charset="UTF-8"'
    with pytest.raises(ValueError):
        www_authenticate("x\r\ny")


def test_credentials_type():
    assert isinstance(parse_basic_auth(basic_auth_header("a", "b")), BasicCredentials)
