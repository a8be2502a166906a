"""Property-based tests (hypothesis) over every decoder in est/ and the CSR policy.

(1) totality: any input returns a value or raises EstError with a code and the documented status (4xx for the
server-side decoders, 502 BadResponse for the client-side ones), nothing else; (2) round trips; (3) mutated CSR
bodies never crash and are never accepted with a broken self-signature; (4) check_csr_key / check_csr_request
against an independent oracle.  CI runs derandomized (the "ci" profile in tests/conftest.py).
"""

from __future__ import annotations

import base64
import datetime
import functools
import ipaddress
import re
from email.utils import parseaddr

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from est import auth, csrattrs, messages, pkcs7
from est.csr import (
    DEFAULT_KEY_POLICY,
    PEM_CSR_LABELS,
    KeyPolicy,
    build_csr_request_body,
    check_csr_key,
    check_csr_request,
    load_csr,
    parse_enroll_request,
)
from est.errors import EstError

SERVER = range(400, 500)
CLIENT = (502,)
DEVICE = "dev-0042"
DER = serialization.Encoding.DER
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def outcome(statuses, fn, *args, **kwargs):
    """``fn(...)``'s value, or the EstError it raised after checking it is a documented one; others propagate."""
    try:
        return fn(*args, **kwargs)
    except EstError as exc:
        assert isinstance(exc.code, str) and exc.code, repr(exc)
        assert exc.status in statuses, repr(exc)
        return exc


# ---------------------------------------------------------------- keys, CSRs and certificates (cached: RSA is slow)

EC_CURVES = {c.name: c for c in (ec.SECP192R1, ec.SECP224R1, ec.SECP256R1, ec.SECP384R1, ec.SECP521R1,
                                 ec.SECP256K1, ec.BrainpoolP256R1, ec.BrainpoolP384R1, ec.BrainpoolP512R1)}
RSA_BITS = (1024, 1536, 2047, 2048, 3072)
KINDS = (*EC_CURVES, *(f"rsa{b}" for b in RSA_BITS), "ed25519", "ed448", "dsa")


@functools.cache
def private_key(kind: str):
    if kind in EC_CURVES:
        return ec.generate_private_key(EC_CURVES[kind]())
    if kind.startswith("rsa"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(kind[3:]))
    if kind == "dsa":
        return dsa.generate_private_key(1024)
    return {"ed25519": ed25519.Ed25519PrivateKey, "ed448": ed448.Ed448PrivateKey}[kind].generate()


def sign_csr(kind: str = "secp256r1", cns=(DEVICE,), san=(), extensions=()) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in cns])
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
    for ext in extensions:
        builder = builder.add_extension(ext, critical=True)
    algorithm = None if kind in ("ed25519", "ed448") else hashes.SHA256()
    return builder.sign(private_key(kind), algorithm)


@functools.cache
def csr_of(kind: str) -> x509.CertificateSigningRequest:
    return load_csr(build_csr_request_body(sign_csr(kind)))


@functools.cache
def seed_csr_der() -> bytes:
    return sign_csr(san=[x509.DNSName(DEVICE)]).public_bytes(DER)


@functools.cache
def certificate(i: int) -> x509.Certificate:
    key = private_key("secp256r1")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Tessera Test {i}")])
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1000 + i).not_valid_before(start).not_valid_after(start + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )


def verify_self_signature(csr: x509.CertificateSigningRequest) -> None:
    """Independent of load_csr's ``is_signature_valid``: raise InvalidSignature unless the signature verifies."""
    key, sig, tbs, alg = csr.public_key(), csr.signature, csr.tbs_certrequest_bytes, csr.signature_hash_algorithm
    if isinstance(key, rsa.RSAPublicKey):
        pad = csr.signature_algorithm_parameters
        key.verify(sig, tbs, pad if isinstance(pad, padding.AsymmetricPadding) else padding.PKCS1v15(), alg)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(sig, tbs, ec.ECDSA(alg))
    elif isinstance(key, dsa.DSAPublicKey):
        key.verify(sig, tbs, alg)
    else:
        key.verify(sig, tbs)


# ---------------------------------------------------------------- input strategies

WS = [b" ", b"\t", b"\r", b"\n", b"\r\n"]
b64ish = st.text(alphabet="ABCMxyz0189+/=- \t\r\n", max_size=120).map(str.encode)
pem_ish = st.builds(
    lambda label, inner, end, tail: b"-----BEGIN %s-----\n%s-----END %s-----%s" % (label, inner, end, tail),
    st.sampled_from([b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST", b"PKCS7", b"CMS", b"X"]),
    b64ish, st.sampled_from([b"CERTIFICATE REQUEST", b"PKCS7", b"X"]), st.sampled_from([b"", b"\n", b"\nx"]),
)
der_ish = st.builds(lambda head, rest: head + rest, st.sampled_from([b"\x30", b"\x30\x82", b"\x30\x80", b"\x06"]),
                    st.binary(max_size=200))
# whole base64 quartets with '=' anywhere: the strict-mode errors (padding inside, data after padding)
quartets = st.lists(st.text(alphabet="AMz0+/=", min_size=4, max_size=4), min_size=1, max_size=8).map(
    lambda qs: "".join(qs).encode())
bodies = st.one_of(st.binary(max_size=300), b64ish, quartets, pem_ish, der_ish)
headers = st.one_of(st.none(), st.binary(max_size=200), st.text(max_size=200),
                    st.builds(lambda s, t: s + t, st.sampled_from(["Basic ", "basic  ", "application/", "a/b;"]),
                              st.text(max_size=100)))


def mime_wrap(data: st.DataObject, der: bytes) -> bytes:
    """base64 of ``der`` with any legal RFC 8951 whitespace: any line length, CRLF/LF/CR, spaces, tabs."""
    text = base64.b64encode(der)
    cut = max(data.draw(st.integers(1, 100), label="line length"), len(text) // 40)  # at most ~40 line breaks
    lines = [text[i : i + cut] for i in range(0, len(text), cut)]
    out = data.draw(st.sampled_from(WS + [b""]))
    for line in lines:
        out += line + b"".join(data.draw(st.lists(st.sampled_from(WS), max_size=3), label="separator"))
    return out


# ---------------------------------------------------------------- (1) totality


@FAST
@given(body=bodies, pem=st.booleans(), max_size=st.sampled_from([messages.MAX_CSR_BODY, 64]))
def test_decode_base64_body_is_total(body, pem, max_size):
    result = outcome(SERVER, messages.decode_base64_body, body, max_size=max_size,
                     pem_labels=PEM_CSR_LABELS if pem else ())
    if isinstance(result, bytes):
        assert result and len(body) <= max_size


@FAST
@given(header=headers)
@example(header='application/pkcs10; a="\\')
@example(header="Basic Og==")
def test_header_parsers_are_total(header):
    assert messages.is_certs_only_content_type(header) in (True, False)
    parsed = outcome(SERVER, messages.parse_content_type, header)
    if isinstance(parsed, tuple):
        assert parsed[0] == parsed[0].lower() and "/" in parsed[0]
    outcome(SERVER, messages.check_request_content_type, header)
    creds = outcome(SERVER, auth.parse_basic_auth, header)
    if isinstance(creds, auth.BasicCredentials):
        assert creds.user and ":" not in creds.user


segments = st.lists(st.sampled_from([*sorted(messages.OPERATIONS), "fleet-a.1", "a", "", ".", "-x", "a b", "é"]),
                    max_size=3)


@FAST
@given(path=st.one_of(st.text(max_size=80),
                      st.builds(lambda segs: messages.WELL_KNOWN_PREFIX + "/" + "/".join(segs), segments)))
def test_split_est_path_is_total(path):
    result = outcome((404,), messages.split_est_path, path)
    parts = path.removeprefix(messages.WELL_KNOWN_PREFIX + "/").split("/")
    ok = path.startswith(messages.WELL_KNOWN_PREFIX + "/") and parts[-1] in messages.OPERATIONS and (
        len(parts) == 1 or (len(parts) == 2 and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._~-]*", parts[0])))
    if ok:
        assert result == (parts[0] if len(parts) == 2 else None, parts[-1])
    else:
        assert isinstance(result, EstError) and result.code == "unknown_operation"


@FAST
@given(body=st.one_of(bodies, st.builds(base64.b64encode, der_ish)))
def test_csr_decoders_are_total(body):
    csr = outcome(SERVER, load_csr, body)
    if isinstance(csr, x509.CertificateSigningRequest):
        verify_self_signature(csr)
    outcome(SERVER, parse_enroll_request, messages.CT_PKCS10, body, DEVICE)


@FAST
@given(body=st.one_of(bodies, st.builds(base64.b64encode, der_ish)))
@example(body=bytes.fromhex("300f06092a864886f70d010701a0020400"))  # ContentInfo of type data, not signedData
def test_parse_certs_only_is_total(body):
    certs = outcome(CLIENT, pkcs7.parse_certs_only, body)
    if isinstance(certs, list):
        assert certs and all(isinstance(c, x509.Certificate) for c in certs)


def tlv(tag: int, content: bytes) -> bytes:
    return csrattrs._tlv(tag, content)


der_trees = st.recursive(
    st.builds(tlv, st.sampled_from([0x06, 0x02, 0x04, 0x05]), st.binary(max_size=70)),
    lambda inner: st.builds(lambda tag, kids: tlv(tag, b"".join(kids)), st.sampled_from([0x30, 0x31]),
                            st.lists(inner, max_size=4)),
    max_leaves=8,
)


@FAST
@given(body=st.one_of(bodies, der_trees, st.builds(base64.b64encode, der_trees)))
@example(body=bytes([0x30, 66, 0x06, 64]) + b"\x2a" * 64)  # OID longer than cryptography represents
@example(body=bytes([0x30, 23, 0x06, 21]) + b"\x2a" + b"\xff" * 19 + b"\x01")  # an arc past 128 bits
@example(body=bytes([0x30, 21, 0x06, 19]) + b"\x84" + b"\x80" * 17 + b"\x00")  # "2.<2**128 - 80>": a Rust panic
def test_parse_csrattrs_is_total(body):
    items = outcome(CLIENT, csrattrs.parse_csrattrs, body)
    if isinstance(items, list):
        assert csrattrs.parse_csrattrs(csrattrs.build_csrattrs(items)) == normalized(items)


# ---------------------------------------------------------------- (2) round trips


@FAST
@given(der=st.binary(min_size=1, max_size=400), data=st.data())
def test_base64_body_round_trip_with_any_legal_line_breaks(der, data):
    assert messages.decode_base64_body(messages.encode_base64_body(der)) == der
    assert messages.decode_base64_body(mime_wrap(data, der)) == der
    armored = b"-----BEGIN CERTIFICATE REQUEST-----\r\n" + mime_wrap(data, der) + b"-----END CERTIFICATE REQUEST-----\n"
    assert messages.decode_base64_body(armored, pem_labels=PEM_CSR_LABELS) == der


@SLOW
@given(picks=st.lists(st.integers(0, 5), min_size=1, max_size=5, unique=True), form=st.integers(0, 3), data=st.data())
def test_certs_only_round_trip_one_to_five_certificates(picks, form, data):
    certs = [certificate(i) for i in picks]
    der = pkcs7.certs_only_der(certs)
    body = [pkcs7.certs_only_response(certs), der, mime_wrap(data, der),
            pkcs7.pkcs7.serialize_certificates(certs, serialization.Encoding.PEM)][form]
    got = pkcs7.parse_certs_only(body)
    assert sorted(c.public_bytes(DER) for c in got) == sorted(c.public_bytes(DER) for c in certs)


oid_heads = st.one_of(st.tuples(st.integers(0, 1), st.integers(0, 39)), st.tuples(st.just(2), st.integers(0, 2**40)))
oid_strings = st.builds(lambda head, tail: ".".join(map(str, head + tuple(tail))),
                        oid_heads, st.lists(st.integers(0, 2**64), max_size=6))


def make_oid(dotted: str) -> x509.ObjectIdentifier:
    try:
        return x509.ObjectIdentifier(dotted)
    except ValueError:  # past cryptography's 63-byte limit
        assume(False)


oids = oid_strings.map(make_oid)
raw_values = st.builds(tlv, st.sampled_from([0x02, 0x04, 0x05, 0x0C, 0x13, 0x30, 0x31, 0xA0]), st.binary(max_size=300))
attributes = st.builds(csrattrs.CsrAttribute, oids,
                       st.lists(st.one_of(oids, raw_values), min_size=1, max_size=4).map(tuple))


def normalized(items):
    """What parse(build(items)) must give back: attribute values in DER SET order."""
    return [csrattrs.CsrAttribute(i.oid, tuple(sorted(i.values, key=csrattrs._encode_value)))
            if isinstance(i, csrattrs.CsrAttribute) else i for i in items]


@FAST
@given(items=st.lists(st.one_of(oids, attributes), max_size=6), data=st.data())
def test_csrattrs_round_trip(items, data):
    der = csrattrs.build_csrattrs(items)
    assert csrattrs.parse_csrattrs(der) == normalized(items)
    assert csrattrs.parse_csrattrs(csrattrs.csrattrs_response(items)) == normalized(items)
    assert csrattrs.parse_csrattrs(mime_wrap(data, der)) == normalized(items)


printable = st.characters(exclude_categories=("Cc", "Cs"))


@FAST
@given(user=st.text(printable, min_size=1, max_size=40).filter(lambda u: ":" not in u),
       password=st.text(printable, max_size=40), scheme=st.sampled_from(["Basic", "basic", "BASIC"]),
       pad=st.sampled_from(["", " ", "\t", "  "]))
def test_basic_credentials_round_trip(user, password, scheme, pad):
    header = auth.basic_auth_header(user, password)
    assert auth.parse_basic_auth(header) == (user, password)
    assert auth.parse_basic_auth(header.encode("ascii")) == (user, password)
    token = header.split(" ", 1)[1]
    assert auth.parse_basic_auth(f"{pad}{scheme}  {token}{pad}") == (user, password)
    assert repr(auth.parse_basic_auth(header)) == f"BasicCredentials(user={user!r}, password=<redacted>)"


@FAST
@given(user=st.text(printable, max_size=10), password=st.text(printable, max_size=10),
       ctl=st.characters(min_codepoint=0, max_codepoint=0x1F) | st.just("\x7f"), where=st.booleans())
def test_basic_credentials_with_control_characters_are_refused(user, password, ctl, where):
    user = "u" + user.replace(":", "")
    user, password = (user + ctl, password) if where else (user, password + ctl)
    with pytest.raises(ValueError):
        auth.basic_auth_header(user, password)
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    with pytest.raises(EstError) as err:
        auth.parse_basic_auth(f"Basic {token}")
    assert (err.value.status, err.value.code) == (401, "bad_auth_format")


# ---------------------------------------------------------------- (3) mutated CSR bodies

# positions biased to the first bytes: the outer lengths, the version and the subject live there
mutation = st.tuples(st.sampled_from(["flip", "insert", "delete"]), st.integers(0, 24) | st.integers(0, 10**6),
                     st.integers(1, 255))


def mutate(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for op, pos, value in ops:
        i = pos % (len(buf) + (op == "insert")) if buf or op == "insert" else 0
        if op == "flip" and buf:
            buf[i] ^= value
        elif op == "insert":
            buf.insert(i, value)
        elif op == "delete" and buf:
            del buf[i]
    return bytes(buf)


@FAST
@given(ops=st.lists(mutation, min_size=1, max_size=4), layer=st.sampled_from(["der", "base64"]))
def test_mutated_csr_never_crashes_nor_passes_a_broken_signature(ops, layer):
    der = seed_csr_der()
    if layer == "der":
        body = messages.encode_base64_body(mutate(der, ops))
    else:
        body = mutate(messages.encode_base64_body(der), ops)
    csr = outcome(SERVER, parse_enroll_request, messages.CT_PKCS10, body, DEVICE)
    if isinstance(csr, x509.CertificateSigningRequest):
        verify_self_signature(csr)
        # a forgery aside, an accepted mutant can only differ from the seed outside what the signature covers
        assert csr.tbs_certrequest_bytes == x509.load_der_x509_csr(der).tbs_certrequest_bytes


@FAST
@given(version=st.integers(1, 255))
def test_csr_version_other_than_v1_is_refused(version):
    """The historical crash: cryptography's InvalidVersion escaped load_csr as a 500."""
    der = seed_csr_der()
    at = der.index(b"\x02\x01\x00") + 2  # CertificationRequestInfo.version, the TBS's first field
    with pytest.raises(EstError) as err:
        load_csr(messages.encode_base64_body(der[:at] + bytes([version]) + der[at + 1 :]))
    assert (err.value.status, err.value.code) == (400, "bad_csr")


EXTENSION_OIDS = [x509.ExtensionOID.SUBJECT_ALTERNATIVE_NAME, x509.ExtensionOID.KEY_USAGE,
                  x509.ExtensionOID.BASIC_CONSTRAINTS, x509.ExtensionOID.EXTENDED_KEY_USAGE]


@FAST
@given(oid=st.sampled_from(EXTENSION_OIDS), value=st.one_of(der_trees, st.binary(max_size=40)))
@example(oid=x509.ExtensionOID.SUBJECT_ALTERNATIVE_NAME, value=b"\x30\x03\x02\x01\x00")  # not a GeneralName
@example(oid=x509.ExtensionOID.SUBJECT_ALTERNATIVE_NAME, value=b"\x30\x02\xa3\x00")  # x400Address: unsupported
def test_csr_with_any_requested_extension_value_is_handled(oid, value):
    """Correctly signed CSRs whose extension request holds anything: a value, or a 4xx (bad_csr when unparsable)."""
    csr = sign_csr(extensions=[x509.UnrecognizedExtension(oid, value)])
    result = outcome(SERVER, parse_enroll_request, messages.CT_PKCS10, build_csr_request_body(csr), DEVICE)
    try:
        csr.extensions
    except Exception:  # noqa: BLE001 - whatever cryptography raises, est must have answered bad_csr
        assert isinstance(result, EstError) and (result.status, result.code) == (400, "bad_csr")


def signed_csr_der(subject: bytes, attributes: bytes) -> bytes:
    """A CertificationRequest built by hand around any subject / attributes DER, validly signed (P-256)."""
    key = private_key("secp256r1")
    spki = key.public_key().public_bytes(DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    info = tlv(0x30, b"\x02\x01\x00" + subject + spki + tlv(0xA0, attributes))
    ecdsa_sha256 = tlv(0x30, tlv(0x06, bytes.fromhex("2a8648ce3d040302")))
    return tlv(0x30, info + ecdsa_sha256 + tlv(0x03, b"\x00" + key.sign(info, ec.ECDSA(hashes.SHA256()))))


STRING_TAGS = [0x0C, 0x13, 0x14, 0x16, 0x1E, 0x1C, 0x1A, 0x03, 0x04, 0x02, 0x05, 0x30]
name_oids = st.sampled_from([bytes.fromhex(h) for h in ("550403", "55040a", "550405", "2a864886f70d010901", "2a03")])
subjects = st.lists(
    st.builds(lambda oid, tag, value: tlv(0x31, tlv(0x30, tlv(0x06, oid) + tlv(tag, value))),
              name_oids, st.sampled_from(STRING_TAGS), st.one_of(st.just(DEVICE.encode()), st.binary(max_size=20))),
    max_size=3,
).map(lambda rdns: tlv(0x30, b"".join(rdns)))
extension_request = st.builds(  # Attribute { extensionRequest, SET { Extensions } } with any extension values
    lambda exts: tlv(0x30, tlv(0x06, bytes.fromhex("2a864886f70d01090e")) + tlv(0x31, tlv(0x30, b"".join(exts)))),
    st.lists(st.builds(lambda oid, crit, value: tlv(0x30, tlv(0x06, oid) + crit + tlv(0x04, value)),
                       st.sampled_from([bytes.fromhex(h) for h in ("551d11", "551d0f", "551d13", "551d25", "2a03")]),
                       st.sampled_from([b"", b"\x01\x01\xff", b"\x01\x01\x00"]),
                       st.one_of(der_trees, st.binary(max_size=20))),
             max_size=3),
)


@FAST
@given(subject=subjects, attributes=st.one_of(extension_request, der_trees, st.just(b"")))
def test_signed_csr_with_any_subject_and_attributes_is_handled(subject, attributes):
    """Past the signature check: whatever the subject and the extension request hold, a value or a 4xx."""
    body = messages.encode_base64_body(signed_csr_der(subject, attributes))
    csr = outcome(SERVER, parse_enroll_request, messages.CT_PKCS10, body, DEVICE)
    if isinstance(csr, x509.CertificateSigningRequest):
        assert all(a.value == DEVICE for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME))


@pytest.mark.parametrize("tag", [0x03, 0x02, 0x30])
def test_csr_whose_common_name_is_not_a_string_is_bad_csr(tag):
    """A commonName as BIT STRING made cryptography's Name raise TypeError, which escaped as a 500."""
    subject = tlv(0x30, tlv(0x31, tlv(0x30, tlv(0x06, bytes.fromhex("550403")) + tlv(tag, b"\x00dev"))))
    body = messages.encode_base64_body(signed_csr_der(subject, b""))
    with pytest.raises(EstError) as err:
        parse_enroll_request(messages.CT_PKCS10, body, DEVICE)
    assert (err.value.status, err.value.code) == (400, "bad_csr")


@FAST
@given(index=st.integers(0, len(DEVICE) - 1), char=st.sampled_from("abcxyz0123456789-"))
def test_csr_whose_signed_part_changed_is_refused(index, char):
    """A byte changed inside the CN keeps the DER valid but breaks the signature: 400 bad_csr_signature."""
    der = seed_csr_der()
    assume(DEVICE[index] != char)
    changed = DEVICE[:index] + char + DEVICE[index + 1 :]
    at = der.index(DEVICE.encode())
    tampered = der[:at] + changed.encode() + der[at + len(DEVICE) :]
    with pytest.raises(EstError) as err:
        load_csr(messages.encode_base64_body(tampered))
    assert (err.value.status, err.value.code) == (400, "bad_csr_signature")
    with pytest.raises(InvalidSignature):
        verify_self_signature(x509.load_der_x509_csr(tampered))


# ---------------------------------------------------------------- (4) the CSR policy

policies = st.builds(
    lambda curves, allow_rsa, lo, span, ed: KeyPolicy(frozenset(curves), allow_rsa, lo, lo + span, ed),
    st.sets(st.sampled_from(sorted(EC_CURVES))), st.booleans(), st.sampled_from([1024, 1536, 2047, 2048, 2049, 3072]),
    st.sampled_from([0, 1, 512, 1024, 8192]), st.booleans(),
)


def policy_oracle(kind: str, policy: KeyPolicy) -> str | None:
    """The error code check_csr_key must give (None: accepted), from the policy's documented meaning."""
    if kind in EC_CURVES:
        if kind in policy.ec_curves:
            return None
        return "weak_key" if EC_CURVES[kind].key_size < 256 else "unsupported_key"
    if kind.startswith("rsa"):
        bits = int(kind[3:])
        if not policy.allow_rsa or bits > policy.max_rsa_bits:
            return "unsupported_key"
        return "weak_key" if bits < policy.min_rsa_bits else None
    return None if kind == "ed25519" and policy.allow_ed25519 else "unsupported_key"


def check_key(kind: str, policy: KeyPolicy) -> None:
    csr, expected = csr_of(kind), policy_oracle(kind, policy)
    if expected is None:
        assert check_csr_key(csr, policy) == csr.public_key()
    else:
        with pytest.raises(EstError) as err:
            check_csr_key(csr, policy)
        assert (err.value.status, err.value.code) == (400, expected), (kind, policy)


@pytest.mark.parametrize("kind", KINDS)
def test_default_key_policy(kind):
    accepted = {"secp256r1", "secp384r1", "rsa2048", "rsa3072"}
    assert (policy_oracle(kind, DEFAULT_KEY_POLICY) is None) == (kind in accepted)
    check_key(kind, DEFAULT_KEY_POLICY)


@SLOW
@given(kind=st.sampled_from(KINDS), policy=policies)
def test_check_csr_key_accepts_exactly_what_the_policy_allows(kind, policy):
    check_key(kind, policy)


ids = st.text(st.sampled_from("abcdefXYZ0189-._@"), min_size=1, max_size=24)


def near_misses(device_id: str):
    return st.one_of(
        st.sampled_from([device_id.upper(), device_id.lower(), device_id + " ", " " + device_id, device_id[:-1] or "x",
                         device_id + ".", "x" + device_id]),
        ids,
    ).filter(lambda other: other != device_id)


@st.composite
def identity_cases(draw):
    device_id = draw(ids)
    accepted = draw(st.lists(ids, max_size=2))
    name = st.one_of(st.just(device_id), st.sampled_from(accepted or [device_id]), near_misses(device_id))
    cns = draw(st.lists(st.one_of(st.just(device_id), near_misses(device_id)), max_size=2))
    san = draw(st.lists(st.one_of(
        st.builds(x509.DNSName, name), st.builds(x509.UniformResourceIdentifier, name),
        name.filter(lambda v: parseaddr(v)[1] and not parseaddr(v)[0]).map(x509.RFC822Name),  # as RFC822Name checks
        st.just(x509.IPAddress(ipaddress.ip_address("192.0.2.7"))), st.just(x509.RegisteredID(NameOID.COMMON_NAME)),
        st.just(x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))),
    ), max_size=3, unique=True))
    ca = draw(st.sampled_from([None, x509.BasicConstraints(ca=False, path_length=None),
                               x509.BasicConstraints(ca=True, path_length=None)]))
    return device_id, accepted, cns, san, ca


@FAST
@given(case=identity_cases())
@example(case=(DEVICE, [], [DEVICE], [x509.DNSName(DEVICE.upper())], None))
@example(case=(DEVICE, ["dev-0042.local"], [], [x509.RFC822Name("DEV-0042.local")], None))
@example(case=(DEVICE, [], ["Dev-0042"], [], None))
def test_check_csr_request_refuses_any_other_identity(case):
    device_id, accepted, cns, san, ca = case
    csr = sign_csr(cns=cns, san=san, extensions=[ca] if ca else [])
    allowed = {device_id, *accepted}
    named = (x509.DNSName, x509.UniformResourceIdentifier, x509.RFC822Name)
    names_ok = all(cn == device_id for cn in cns) and all(isinstance(n, named) and n.value in allowed for n in san)
    expected = "ca_requested" if ca is not None and ca.ca else None if names_ok else "name_mismatch"
    body = build_csr_request_body(csr)
    if expected is None:
        assert check_csr_request(load_csr(body), device_id, accepted_names=accepted) is None
        parsed = parse_enroll_request(messages.CT_PKCS10, body, device_id, accepted_names=accepted)
        assert parsed.public_bytes(DER) == csr.public_bytes(DER)
        return
    with pytest.raises(EstError) as err:
        check_csr_request(load_csr(body), device_id, accepted_names=accepted)
    assert (err.value.status, err.value.code) == (403, expected)
    with pytest.raises(EstError) as err:  # the server's whole path answers the same
        parse_enroll_request(messages.CT_PKCS10, body, device_id, accepted_names=accepted)
    assert (err.value.status, err.value.code) == (403, expected)


# ---------------------------------------------------------------- crashes the fuzzer found (each a 502 now, not an escape)


@pytest.mark.parametrize("content_type_oid", ["2a864886f70d010701", "2a864886f70d010703", "2a03"])
def test_certs_only_of_another_content_type_is_bad_pkcs7(content_type_oid):
    """cryptography raises UnsupportedAlgorithm (not ValueError) for a ContentInfo that is not SignedData."""
    oid = bytes.fromhex(content_type_oid)
    body = tlv(0x30, tlv(0x06, oid) + tlv(0xA0, tlv(0x04, b"")))
    for form in (body, base64.b64encode(body)):
        with pytest.raises(EstError) as err:
            pkcs7.parse_certs_only(form)
        assert (err.value.status, err.value.code) == (502, "bad_pkcs7")


@pytest.mark.parametrize("version", [3, 6, 255])
def test_certs_only_with_a_certificate_of_an_invalid_version_is_bad_pkcs7(version):
    """cryptography raises InvalidVersion (no ValueError) for a certificate version other than v1-v3."""
    der = pkcs7.certs_only_der([certificate(0)])
    field = b"\xa0\x03\x02\x01\x02"  # [0] EXPLICIT INTEGER 2 (v3), the TBSCertificate's first field
    assert der.count(field) == 1
    body = der.replace(field, field[:-1] + bytes([version]))
    for form in (body, messages.encode_base64_body(body)):
        with pytest.raises(EstError) as err:
            pkcs7.parse_certs_only(form)
        assert (err.value.status, err.value.code) == (502, "bad_pkcs7")


@pytest.mark.parametrize("oid_content", [
    b"\x2a" * 64,  # 64 bytes: past cryptography's 63-byte OBJECT IDENTIFIER limit
    b"\x2a" + b"\xff" * 19 + b"\x01",  # one arc of 134 bits: past its 128-bit arcs
    b"\x84" + b"\x80" * 17 + b"\x00",  # a first subidentifier of 2**128: cryptography panicked (BaseException)
])
def test_csrattrs_oid_beyond_cryptography_is_bad_csrattrs(oid_content):
    for items in (tlv(0x06, oid_content), tlv(0x30, tlv(0x06, oid_content) + tlv(0x31, tlv(0x05, b"")))):
        with pytest.raises(EstError) as err:
            csrattrs.parse_csrattrs(tlv(0x30, items))
        assert (err.value.status, err.value.code) == (502, "bad_csrattrs")


@pytest.mark.parametrize("oid_content", [
    b"\x83" + b"\xff" * 17 + b"\x7f",  # first subidentifier 2**128 - 1: "2.<2**128 - 81>", the largest there is
    b"\x2a" * 63,  # 63 bytes
])
def test_csrattrs_oid_at_cryptography_limits_round_trips(oid_content):
    der = tlv(0x30, tlv(0x06, oid_content))
    assert csrattrs.build_csrattrs(csrattrs.parse_csrattrs(der)) == der
