"""Unit tests for est.pkcs7: certs-only encoding on the server, parsing on the client, end-to-end with a CSR."""

from __future__ import annotations

import base64
import datetime
import functools
import random
import shutil
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from est import errors
from est.csr import build_csr_request_body, parse_enroll_request
from est.messages import decode_base64_body
from est.pkcs7 import certs_only_der, certs_only_response, parse_certs_only

DER = serialization.Encoding.DER
NOW = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def issue(subject: str, public_key, issuer: str, issuer_key, *, ca: bool) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(name(subject))
        .issuer_name(name(issuer))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )


@functools.cache
def chain() -> tuple[tuple[x509.Certificate, ...], ec.EllipticCurvePrivateKey]:
    root_key, inter_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = issue("root", root_key.public_key(), "root", root_key, ca=True)
    inter = issue("intermediate", inter_key.public_key(), "root", root_key, ca=True)
    leaf = issue("leaf", leaf_key.public_key(), "intermediate", inter_key, ca=False)
    return (leaf, inter, root), inter_key


def ders(certs) -> list[bytes]:
    return [c.public_bytes(DER) for c in certs]


def test_round_trip_keeps_exactly_the_certificates():
    certs, _ = chain()
    out = parse_certs_only(certs_only_response(certs))
    assert sorted(ders(out)) == sorted(ders(certs))
    assert len(out) == 3


def test_wire_order_is_canonical_not_input_order():
    # certificates is a DER SET OF: cryptography sorts it, so order is not preserved
    certs, _ = chain()
    shuffled = list(certs)
    random.Random(7).shuffle(shuffled)
    assert certs_only_der(certs) == certs_only_der(shuffled) == certs_only_der(list(reversed(certs)))
    assert ders(parse_certs_only(certs_only_response(certs))) == sorted(ders(certs))


def test_single_certificate_round_trip():
    leaf = chain()[0][0]
    assert ders(parse_certs_only(certs_only_response([leaf]))) == ders([leaf])


def test_response_body_is_crlf_wrapped_base64_of_signed_data():
    certs, _ = chain()
    body = certs_only_response(certs)
    lines = body.split(b"\r\n")
    assert lines[-1] == b"" and all(len(line) == 64 for line in lines[:-2])
    der = decode_base64_body(body, max_size=1 << 20)
    assert ders(pkcs7.load_der_pkcs7_certificates(der)) == sorted(ders(certs))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_openssl_reads_certs_only_der():
    certs, _ = chain()
    out = subprocess.run(
        ["openssl", "pkcs7", "-inform", "DER", "-print_certs"],
        input=certs_only_der(certs), capture_output=True, check=True,
    ).stdout
    found = x509.load_pem_x509_certificates(out)
    assert sorted(ders(found)) == sorted(ders(certs))


def test_empty_list_refused():
    with pytest.raises(ValueError):
        certs_only_response([])


def test_parse_accepts_raw_der():
    certs, _ = chain()
    assert sorted(ders(parse_certs_only(certs_only_der(certs)))) == sorted(ders(certs))


def test_parse_accepts_unwrapped_and_oddly_wrapped_base64():
    certs, _ = chain()
    text = base64.b64encode(certs_only_der(certs))
    assert len(parse_certs_only(text)) == 3
    odd = b"\n".join(text[i : i + 76] for i in range(0, len(text), 76)) + b"\n\n"
    assert len(parse_certs_only(b"  " + odd)) == 3


def test_parse_accepts_pem_pkcs7():
    certs, _ = chain()
    pem = pkcs7.serialize_certificates(list(certs), serialization.Encoding.PEM)
    assert pem.startswith(b"-----BEGIN PKCS7-----")
    assert sorted(ders(parse_certs_only(pem))) == sorted(ders(certs))


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", "bad_base64"),
        (b"%%%%", "bad_base64"),
        (base64.b64encode(b"\x30\x03\x02\x01\x05"), "bad_pkcs7"),
        (b"\x30\x03\x02\x01\x05", "bad_pkcs7"),
        (b"-----BEGIN CERTIFICATE-----\nQUJD\n-----END CERTIFICATE-----\n", "bad_pem"),
    ],
)
def test_parse_errors_are_bad_response(body, code):
    with pytest.raises(errors.BadResponse) as exc:
        parse_certs_only(body)
    assert (exc.value.status, exc.value.code) == (502, code)


def test_parse_refuses_a_bare_certificate():
    leaf = chain()[0][0]
    with pytest.raises(errors.BadResponse) as exc:
        parse_certs_only(base64.b64encode(leaf.public_bytes(DER)))
    assert exc.value.code == "bad_pkcs7"


def test_parse_size_limit():
    certs, _ = chain()
    body = certs_only_response(certs)
    with pytest.raises(errors.BadResponse) as exc:
        parse_certs_only(body, max_size=len(body) - 1)
    assert exc.value.code == "body_too_large"
    with pytest.raises(errors.BadResponse):
        parse_certs_only(certs_only_der(certs), max_size=100)  # raw DER is limited too
    assert len(parse_certs_only(body, max_size=len(body))) == 3


def test_enroll_end_to_end_without_io():
    """Agent builds the request, hub validates and issues, agent parses the response."""
    (_, inter, _), inter_key = chain()
    device_key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(name("dev-7"))
        .sign(device_key, hashes.SHA256())
    )
    request_body = build_csr_request_body(csr)

    verified = parse_enroll_request("application/pkcs10", request_body, "dev-7")
    issued = issue("dev-7", verified.public_key(), "intermediate", inter_key, ca=False)
    response_body = certs_only_response([issued])

    (got,) = parse_certs_only(response_body)
    assert got.public_key() == device_key.public_key()
    got.verify_directly_issued_by(inter)
