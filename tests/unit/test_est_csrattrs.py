"""Unit tests for est.csrattrs, with openssl asn1parse as an independent DER reader."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from est import errors
from est.csrattrs import (
    DEFAULT_CSRATTRS,
    OID_CHALLENGE_PASSWORD,
    OID_EC_PUBLIC_KEY,
    OID_ECDSA_WITH_SHA256,
    OID_ECDSA_WITH_SHA384,
    OID_EXTENSION_REQUEST,
    OID_SECP256R1,
    OID_SECP384R1,
    CsrAttribute,
    build_csrattrs,
    csrattrs_response,
    parse_csrattrs,
)
from est.messages import decode_base64_body

OID = x509.ObjectIdentifier

# RFC 7030 section 4.5.2 example response body
RFC7030_EXAMPLE = (
    b"MEEGCSqGSIb3DQEJBzASBgcqhkjOPQIBMQcGBSuBBAAiMBYGCSqGSIb3DQEJDjEJ\r\n"
    b"BgcrBgEBAQEWBggqhkjOPQQDAw==\r\n"
)
RFC7030_ITEMS = [
    OID_CHALLENGE_PASSWORD,
    CsrAttribute(OID_EC_PUBLIC_KEY, (OID_SECP384R1,)),
    CsrAttribute(OID_EXTENSION_REQUEST, (OID("1.3.6.1.1.1.1.22"),)),
    OID_ECDSA_WITH_SHA384,
]

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")


def _oid_der(oid: x509.ObjectIdentifier) -> bytes:
    return build_csrattrs([oid])[2:]


def asn1parse(der: bytes) -> list[tuple[int, str, str]]:
    """(depth, type, value) rows from `openssl asn1parse`, which fails on malformed DER."""
    out = subprocess.run(
        ["openssl", "asn1parse", "-inform", "DER"], input=der, capture_output=True, check=True
    ).stdout.decode()
    rows = []
    for line in out.splitlines():
        m = re.match(r"\s*\d+:d=(\d+)\s+hl=\s*\d+\s+l=\s*\d+\s+(?:prim|cons):\s+(\S+(?: \S+)?)\s*(?::(.*))?$", line)
        assert m, line
        rows.append((int(m.group(1)), m.group(2).strip(), (m.group(3) or "").strip()))
    return rows


@needs_openssl
def test_default_csrattrs_decode_with_openssl():
    der = decode_base64_body(csrattrs_response())
    assert asn1parse(der) == [
        (0, "SEQUENCE", ""),
        (1, "SEQUENCE", ""),
        (2, "OBJECT", "id-ecPublicKey"),
        (2, "SET", ""),
        (3, "OBJECT", "prime256v1"),
        (1, "OBJECT", "ecdsa-with-SHA256"),
    ]


@needs_openssl
@pytest.mark.parametrize("count", [3, 12, 30])  # SET content 33, 132 and 330 bytes: all length forms
def test_unusual_oids_and_long_lengths_decode_with_openssl(count):
    odd = [OID("2.999.16384.1"), OID("1.3.6.1.4.1.55555.1.2"), OID("0.39.127.128.16383")]
    many = tuple(OID(f"1.3.6.1.4.1.99999.{i}") for i in range(count))
    der = build_csrattrs([*odd, CsrAttribute(OID("1.2.3"), many)])
    assert parse_csrattrs(der) == [*odd, CsrAttribute(OID("1.2.3"), tuple(sorted(many, key=_oid_der)))]
    rows = asn1parse(der)
    assert [r[2] for r in rows[1:4]] == ["2.999.16384.1", "1.3.6.1.4.1.55555.1.2", "0.39.127.128.16383"]
    assert rows[5] == (2, "OBJECT", "1.2.3")
    assert rows[6] == (2, "SET", "")
    assert sorted(r[2] for r in rows[7:]) == sorted(o.dotted_string for o in many)
    assert len(rows) == 7 + len(many)


def test_oid_encoding_matches_cryptography():
    # the DER cryptography itself writes for ecdsa-with-SHA256 and id-ecPublicKey inside a CSR
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    csr_der = csr.public_bytes(serialization.Encoding.DER)
    der = build_csrattrs(DEFAULT_CSRATTRS)
    for oid_der in (der[4:13], der[15:25], der[25:35]):
        assert oid_der[0] == 0x06 and oid_der in csr_der


def test_rfc7030_example_parses():
    assert parse_csrattrs(RFC7030_EXAMPLE) == RFC7030_ITEMS


def test_rfc7030_example_rebuilds_byte_identical():
    assert csrattrs_response(RFC7030_ITEMS) == RFC7030_EXAMPLE


def test_default_round_trip_and_raw_der():
    assert parse_csrattrs(csrattrs_response()) == list(DEFAULT_CSRATTRS)
    assert parse_csrattrs(build_csrattrs()) == list(DEFAULT_CSRATTRS)
    assert DEFAULT_CSRATTRS == (CsrAttribute(OID_EC_PUBLIC_KEY, (OID_SECP256R1,)), OID_ECDSA_WITH_SHA256)


def test_empty_csrattrs():
    assert build_csrattrs([]) == b"\x30\x00"
    assert parse_csrattrs(csrattrs_response([])) == []
    assert parse_csrattrs(b"") == [] and parse_csrattrs(b"\r\n") == []


def test_attribute_values_are_sorted_as_der_set():
    # X.690 11.6: SET OF elements in ascending octet order; 06 05 (secp384r1) < 06 08 (secp256r1)
    for given in [(OID_SECP256R1, OID_SECP384R1), (OID_SECP384R1, OID_SECP256R1)]:
        der = build_csrattrs([CsrAttribute(OID_EC_PUBLIC_KEY, given)])
        assert der.index(bytes.fromhex("06052b81040022")) < der.index(bytes.fromhex("06082a8648ce3d030107"))
        (attr,) = parse_csrattrs(der)
        assert attr.values == (OID_SECP384R1, OID_SECP256R1)


def test_non_oid_values_kept_as_raw_der():
    utf8 = b"\x0c\x05hello"
    der = build_csrattrs([CsrAttribute(OID("1.2.3.4"), (utf8, OID("1.2.3.5")))])
    (attr,) = parse_csrattrs(der)
    assert set(attr.values) == {utf8, OID("1.2.3.5")}


@pytest.mark.parametrize(
    "items",
    [[CsrAttribute(OID("1.2.3"), ())], [CsrAttribute(OID("1.2.3"), (b"\x0c\x05hel",))],
     [CsrAttribute(OID("1.2.3"), (b"\x05\x00\x00",))]],
)
def test_build_refuses_bad_attributes(items):
    with pytest.raises(ValueError):
        build_csrattrs(items)


def test_build_refuses_other_types():
    with pytest.raises(TypeError):
        build_csrattrs(["1.2.3"])


@pytest.mark.parametrize(
    ("der_hex", "fragment"),
    [
        ("3000" + "00", "single SEQUENCE"),  # trailing data
        ("3103060129", "single SEQUENCE"),  # SET at top level
        ("3080060129" + "0000", "indefinite length"),
        ("308103060129", "non-minimal length"),
        ("3005060129", "overruns"),
        ("30030201" + "05", "tag 0x02"),  # INTEGER item
        ("30073005060129" + "3100", "empty value SET"),
        ("3006300406012931", "truncated"),
        ("300730050201053100", "does not start with an OID"),
        ("30083006060129060129", "OID followed by a SET"),
        ("30020600", "OBJECT IDENTIFIER"),  # empty OID
        ("3003060181", "OBJECT IDENTIFIER"),  # truncated arc
        ("300406028001", "non-minimal OBJECT IDENTIFIER"),
        ("301f", "overruns"),
    ],
)
def test_parse_refuses_malformed_der(der_hex, fragment):
    with pytest.raises(errors.BadResponse) as exc:
        parse_csrattrs(base64.b64encode(bytes.fromhex(der_hex)))
    assert (exc.value.status, exc.value.code) == (502, "bad_csrattrs")
    assert fragment in exc.value.message


def test_parse_refuses_bad_base64_and_oversize():
    with pytest.raises(errors.BadResponse) as exc:
        parse_csrattrs(b"MEEG*")
    assert exc.value.code == "bad_base64"
    with pytest.raises(errors.BadResponse) as exc:
        parse_csrattrs(RFC7030_EXAMPLE, max_size=10)
    assert exc.value.code == "body_too_large"


def test_parse_of_base64_that_is_not_csrattrs():
    with pytest.raises(errors.BadResponse) as exc:
        parse_csrattrs(base64.b64encode(b"\x02\x01\x05"))
    assert exc.value.code == "bad_csrattrs"
