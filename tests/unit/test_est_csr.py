"""Unit tests for est.csr: loading, key policy, CA/identity checks, with real CSRs made by cryptography."""

from __future__ import annotations

import base64
import functools
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from est import errors
from est.csr import (
    DEFAULT_KEY_POLICY,
    KeyPolicy,
    build_csr_request_body,
    check_csr_key,
    check_csr_request,
    load_csr,
    parse_enroll_request,
)
from est.messages import MAX_CSR_BODY

DEVICE = "dev-0042"
DER = serialization.Encoding.DER


@functools.cache
def key(kind: str):
    if kind.startswith("rsa"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(kind[3:]))
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "ed448":
        return ed448.Ed448PrivateKey.generate()
    curve = {"p224": ec.SECP224R1, "p256": ec.SECP256R1, "p384": ec.SECP384R1, "p521": ec.SECP521R1,
             "k256": ec.SECP256K1}[kind]
    return ec.generate_private_key(curve())


def make_csr(kind: str = "p256", *, cn: str | list[str] | None = DEVICE, san=None, extensions=()):
    cns = [cn] if isinstance(cn, str) else (cn or [])
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, c) for c in cns])
    )
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    for ext in extensions:
        builder = builder.add_extension(ext, critical=True)
    private = key(kind)
    algorithm = None if kind in ("ed25519", "ed448") else hashes.SHA256()
    return builder.sign(private, algorithm)


def b64(csr) -> bytes:
    return base64.b64encode(csr.public_bytes(DER))


def raises(cls, code, fn, *args, **kwargs) -> errors.EstError:
    with pytest.raises(cls) as exc:
        fn(*args, **kwargs)
    assert exc.value.code == code, exc.value
    return exc.value


# --- load_csr -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["p256", "p384", "rsa2048", "ed25519"])
def test_load_csr_round_trips_valid_csrs(kind):
    csr = make_csr(kind)
    loaded = load_csr(b64(csr))
    assert loaded.public_bytes(DER) == csr.public_bytes(DER)
    assert loaded.is_signature_valid


def test_load_csr_accepts_client_body_with_crlf_wrapping():
    csr = make_csr("rsa2048")
    body = build_csr_request_body(csr)
    assert body.count(b"\r\n") > 2 and max(len(line) for line in body.split(b"\r\n")) == 64
    assert load_csr(body).public_bytes(DER) == csr.public_bytes(DER)


@pytest.mark.parametrize("label", [b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST"])
def test_load_csr_tolerates_pem(label):
    csr = make_csr()
    pem = csr.public_bytes(serialization.Encoding.PEM)
    if label != b"CERTIFICATE REQUEST":
        pem = pem.replace(b"CERTIFICATE REQUEST", label)
    assert load_csr(b"\r\n" + pem.replace(b"\n", b"\r\n")).public_bytes(DER) == csr.public_bytes(DER)


def test_load_csr_refuses_pem_with_other_label():
    pem = make_csr().public_bytes(serialization.Encoding.PEM).replace(b"CERTIFICATE REQUEST", b"CERTIFICATE")
    err = raises(errors.BadRequest, "bad_pem", load_csr, pem)
    assert "CERTIFICATE" in err.message


def test_load_csr_refuses_flipped_signature_byte():
    csr = make_csr()
    der = bytearray(csr.public_bytes(DER))
    assert der.endswith(csr.signature)
    der[-1] ^= 0x01  # last byte of ECDSA s
    err = raises(errors.BadRequest, "bad_csr_signature", load_csr, base64.b64encode(bytes(der)))
    assert err.status == 400


@pytest.mark.parametrize("version", [1, 2, 5, 0x7f])
def test_load_csr_refuses_other_versions_as_bad_request(version):
    """PKCS#10 has version 0 only; cryptography raises InvalidVersion (not a ValueError) for the others, which
    once escaped as a 500 from simpleenroll."""
    der = make_csr().public_bytes(DER)
    at = der.index(b"\x02\x01\x00")  # CertificationRequestInfo.version INTEGER 0, the first INTEGER
    flipped = der[:at + 2] + bytes([version]) + der[at + 3:]
    err = raises(errors.BadRequest, "bad_csr", load_csr, base64.b64encode(flipped))
    assert err.status == 400 and "version" in str(err)


def test_load_csr_refuses_tampered_subject():
    csr = make_csr("rsa2048", cn="dev-0001")
    der = csr.public_bytes(DER).replace(b"dev-0001", b"dev-0002")
    raises(errors.BadRequest, "bad_csr_signature", load_csr, base64.b64encode(der))


@pytest.mark.parametrize(
    "der",
    [b"\x30\x03\x02\x01\x05", b"not a csr at all", b"\x30\x82\xff\xff"],
)
def test_load_csr_refuses_non_csr_der(der):
    err = raises(errors.BadRequest, "bad_csr", load_csr, base64.b64encode(der))
    assert err.status == 400


def test_load_csr_refuses_trailing_data():
    raises(errors.BadRequest, "bad_csr", load_csr, base64.b64encode(make_csr().public_bytes(DER) + b"\x00"))


def test_load_csr_refuses_raw_der_body():
    # EST bodies are base64; raw DER is not silently accepted
    raises(errors.BadRequest, "bad_base64", load_csr, make_csr().public_bytes(DER))


def test_load_csr_refuses_malformed_base64():
    body = bytearray(b64(make_csr()))
    body[10:11] = b"!"
    err = raises(errors.BadRequest, "bad_base64", load_csr, bytes(body))
    assert "offset 10" in err.message


def test_load_csr_refuses_oversized_body():
    body = build_csr_request_body(make_csr())
    body += b"\r\n" * ((MAX_CSR_BODY - len(body)) // 2 + 1)
    err = raises(errors.PayloadTooLarge, "body_too_large", load_csr, body)
    assert err.status == 413
    assert load_csr(body, max_size=len(body)).is_signature_valid


# --- check_csr_key ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["p256", "p384", "rsa2048"])
def test_default_policy_accepts(kind):
    csr = make_csr(kind)
    assert check_csr_key(csr).public_bytes(DER, serialization.PublicFormat.SubjectPublicKeyInfo) == (
        csr.public_key().public_bytes(DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def test_rsa_1024_is_weak():
    err = raises(errors.BadRequest, "weak_key", check_csr_key, make_csr("rsa1024"))
    assert "1024" in err.message and "2048" in err.message


def test_ec_p224_is_weak():
    err = raises(errors.BadRequest, "weak_key", check_csr_key, make_csr("p224"))
    assert "secp224r1" in err.message


@pytest.mark.parametrize(("kind", "name"), [("p521", "secp521r1"), ("k256", "secp256k1")])
def test_other_ec_curves_unsupported(kind, name):
    err = raises(errors.BadRequest, "unsupported_key", check_csr_key, make_csr(kind))
    assert name in err.message and "secp256r1" in err.message


def test_ed25519_refused_by_default_and_allowed_by_policy():
    csr = make_csr("ed25519")
    err = raises(errors.BadRequest, "unsupported_key", check_csr_key, csr)
    assert "Ed25519" in err.message
    assert isinstance(check_csr_key(csr, KeyPolicy(allow_ed25519=True)), ed25519.Ed25519PublicKey)


def test_ed448_unsupported():
    err = raises(errors.BadRequest, "unsupported_key", check_csr_key, make_csr("ed448"))
    assert "Ed448" in err.message


def test_policy_can_refuse_rsa_and_cap_size_and_change_curves():
    csr = make_csr("rsa2048")
    raises(errors.BadRequest, "unsupported_key", check_csr_key, csr, KeyPolicy(allow_rsa=False))
    err = raises(errors.BadRequest, "unsupported_key", check_csr_key, csr, KeyPolicy(max_rsa_bits=1024 + 512))
    assert "2048" in err.message
    raises(errors.BadRequest, "weak_key", check_csr_key, csr, KeyPolicy(min_rsa_bits=3072))
    only_p384 = KeyPolicy(ec_curves=frozenset({"secp384r1"}))
    raises(errors.BadRequest, "unsupported_key", check_csr_key, make_csr("p256"), only_p384)
    check_csr_key(make_csr("p384"), only_p384)


def test_default_policy_values():
    assert DEFAULT_KEY_POLICY.ec_curves == {"secp256r1", "secp384r1"}
    assert DEFAULT_KEY_POLICY.min_rsa_bits == 2048 and not DEFAULT_KEY_POLICY.allow_ed25519


# --- check_csr_request --------------------------------------------------------


@pytest.mark.parametrize(
    "csr_kwargs",
    [
        {},
        {"cn": None},
        {"san": [x509.DNSName(DEVICE)]},
        {"cn": None, "san": [x509.DNSName(DEVICE), x509.UniformResourceIdentifier(DEVICE)]},
        {"extensions": [x509.BasicConstraints(ca=False, path_length=None)]},
    ],
)
def test_check_csr_request_accepts(csr_kwargs):
    check_csr_request(make_csr(**csr_kwargs), DEVICE)


def test_check_csr_request_ignores_other_subject_attributes():
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Evil Corp")])
    ).sign(key("p256"), hashes.SHA256())
    check_csr_request(csr, DEVICE)


def test_ca_true_refused():
    csr = make_csr(extensions=[x509.BasicConstraints(ca=True, path_length=0)])
    err = raises(errors.Forbidden, "ca_requested", check_csr_request, csr, DEVICE)
    assert err.status == 403 and "BasicConstraints" in err.message


def test_key_cert_sign_refused():
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=True, crl_sign=False, encipher_only=False, decipher_only=False,
    )
    raises(errors.Forbidden, "ca_requested", check_csr_request, make_csr(extensions=[usage]), DEVICE)


def test_cn_mismatch_refused():
    err = raises(errors.Forbidden, "name_mismatch", check_csr_request, make_csr(cn="dev-9999"), DEVICE)
    assert err.status == 403 and "dev-9999" in err.message and DEVICE in err.message


def test_second_cn_mismatch_refused():
    raises(errors.Forbidden, "name_mismatch", check_csr_request, make_csr(cn=[DEVICE, "dev-9999"]), DEVICE)


def test_cn_compare_is_exact():
    raises(errors.Forbidden, "name_mismatch", check_csr_request, make_csr(cn=DEVICE.upper()), DEVICE)


@pytest.mark.parametrize(
    "san",
    [
        [x509.DNSName("dev-9999")],
        [x509.DNSName(DEVICE), x509.DNSName("hub.example")],
        [x509.UniformResourceIdentifier("urn:dev:other")],
        [x509.RFC822Name("root@example.com")],
        [x509.IPAddress(ipaddress.ip_address("10.0.0.1"))],
        [x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)]))],
        [x509.RegisteredID(x509.ObjectIdentifier("1.2.3.4"))],
    ],
)
def test_san_naming_another_identity_refused(san):
    raises(errors.Forbidden, "name_mismatch", check_csr_request, make_csr(san=san), DEVICE)


def test_accepted_names_extend_san_matching():
    csr = make_csr(san=[x509.UniformResourceIdentifier(f"urn:tessera:device:{DEVICE}")])
    raises(errors.Forbidden, "name_mismatch", check_csr_request, csr, DEVICE)
    check_csr_request(csr, DEVICE, accepted_names={f"urn:tessera:device:{DEVICE}"})


def test_check_csr_request_requires_device_id():
    with pytest.raises(ValueError):
        check_csr_request(make_csr(), "")


# --- parse_enroll_request (server pipeline) -----------------------------------


def test_parse_enroll_request_happy_path():
    csr = make_csr()
    got = parse_enroll_request("application/pkcs10", build_csr_request_body(csr), DEVICE)
    assert got.public_bytes(DER) == csr.public_bytes(DER)


@pytest.mark.parametrize(
    ("content_type", "body_fn", "status", "code"),
    [
        ("text/plain", lambda: b"*", 415, "bad_content_type"),
        ("application/pkcs10", lambda: b"A" * (MAX_CSR_BODY + 4), 413, "body_too_large"),
        ("application/pkcs10", lambda: b"@@@@", 400, "bad_base64"),
        ("application/pkcs10", lambda: b64(make_csr("rsa1024")), 400, "weak_key"),
        ("application/pkcs10", lambda: b64(make_csr(cn="dev-1")), 403, "name_mismatch"),
    ],
)
def test_parse_enroll_request_error_order(content_type, body_fn, status, code):
    with pytest.raises(errors.EstError) as exc:
        parse_enroll_request(content_type, body_fn(), DEVICE)
    assert (exc.value.status, exc.value.code) == (status, code)


def test_weak_key_reported_before_name_mismatch():
    with pytest.raises(errors.EstError) as exc:
        parse_enroll_request("application/pkcs10", b64(make_csr("rsa1024", cn="dev-1")), DEVICE)
    assert exc.value.code == "weak_key"
