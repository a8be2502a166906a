#!/usr/bin/env python3
"""(Re)generate the seed corpus fuzz/corpus/est/ for fuzz/est_fuzz.py.

    .venv/bin/python fuzz/make_corpus.py [OUTDIR]

Each file is ``<selector byte><input>``: one valid input per decoder (CSRs with P-256, P-384, RSA-2048 and
Ed25519 keys, base64 / PEM / DER; certs-only with 1 and 3 certificates; csrattrs; Content-Type, path and
Basic headers).  Keys and ECDSA signatures are random, so a rerun changes the bytes, not the shapes; the
directory is rewritten whole.
"""

from __future__ import annotations

import base64
import datetime
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import est_fuzz  # noqa: E402  (puts the repository on sys.path)
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from est import csrattrs, messages, pkcs7  # noqa: E402
from est.auth import basic_auth_header  # noqa: E402
from est.csr import build_csr_request_body  # noqa: E402

DEVICE = est_fuzz.DEVICE
DER = serialization.Encoding.DER


def _csr(key, cn: str = DEVICE, san: bool = True) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(DEVICE)]), critical=False)
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm)


def _cert(cn: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def seeds() -> dict[str, tuple[str, bytes]]:
    """``{file name: (entry point, input)}``."""
    p256 = _csr(ec.generate_private_key(ec.SECP256R1()))
    p384 = _csr(ec.generate_private_key(ec.SECP384R1()), san=False)
    rsa2048 = _csr(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    ed = _csr(ed25519.Ed25519PrivateKey.generate())
    pem = p256.public_bytes(serialization.Encoding.PEM)
    certs = [_cert(f"Tessera Seed CA {i}") for i in range(3)]
    attrs = (
        *csrattrs.DEFAULT_CSRATTRS,
        csrattrs.CsrAttribute(csrattrs.OID_EXTENSION_REQUEST, (b"\x04\x02\x30\x00", csrattrs.OID_SECP384R1)),
        csrattrs.OID_CHALLENGE_PASSWORD,
    )
    # near cryptography's OID limits (63 bytes, 128-bit arcs): one changed byte crosses them
    big = [str(2**63 + i) for i in range(5)]
    long_oids = (x509.ObjectIdentifier(".".join(["1.3.6.1.4.1", *big])),  # 57 bytes
                 csrattrs.CsrAttribute(x509.ObjectIdentifier(".".join(["2", str(2**100), *big[:3]])),
                                       (csrattrs.OID_SECP256R1,)))
    # csr_signed: <subject length><subject><attributes>, an extensionRequest with a subjectAltName and basicConstraints
    tlv = csrattrs._tlv
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)]).public_bytes()
    san = x509.SubjectAlternativeName([x509.DNSName(DEVICE)]).public_bytes()
    extensions = tlv(0x30, tlv(0x30, tlv(0x06, bytes.fromhex("551d11")) + tlv(0x04, san))
                     + tlv(0x30, tlv(0x06, bytes.fromhex("551d13")) + b"\x01\x01\xff" + tlv(0x04, b"\x30\x00")))
    attributes = tlv(0x30, tlv(0x06, bytes.fromhex("2a864886f70d01090e")) + tlv(0x31, extensions))
    return {
        "csr-signed-p256": ("csr_signed", bytes([len(subject)]) + subject + attributes),
        "csr-signed-empty": ("csr_signed", b"\x02\x30\x00"),
        "base64-crlf": ("base64", messages.encode_base64_body(b"\x30\x03\x02\x01\x00" * 20)),
        "base64-spaces": ("base64", b" TUlJ\tQ0Fn \r\nPT0=\n"),
        "base64-pem": ("base64_pem", pem),
        "content-type-pkcs10": ("content_type", messages.CT_PKCS10.encode()),
        "content-type-pkcs7": ("content_type", messages.CT_PKCS7_CERTS_ONLY.encode()),
        "content-type-quoted": ("content_type", b'Application/PKCS7-MIME ; smime-type="certs-only"; x="a\\"b";'),
        "path-simpleenroll": ("path", messages.PATH_SIMPLEENROLL.encode()),
        "path-label": ("path", b"/.well-known/est/fleet-a.1/cacerts"),
        "csr-p256-b64": ("csr", base64.b64encode(p256.public_bytes(DER))),
        "csr-p256-pem": ("csr", pem),
        "csr-p384-crlf": ("csr", messages.encode_base64_body(p384.public_bytes(DER))),
        "csr-rsa2048": ("csr", messages.encode_base64_body(rsa2048.public_bytes(DER))),
        "csr-ed25519": ("csr", messages.encode_base64_body(ed.public_bytes(DER))),
        "csr-der-p256": ("csr_der", p256.public_bytes(DER)),
        "csr-der-ed25519": ("csr_der", ed.public_bytes(DER)),
        "enroll-p256": ("enroll", messages.CT_PKCS10.encode() + b"\n" + build_csr_request_body(p256)),
        "certs-only-1": ("certs_only", pkcs7.certs_only_response(certs[:1])),
        "certs-only-3": ("certs_only", pkcs7.certs_only_response(certs)),
        "certs-only-der": ("certs_only", pkcs7.certs_only_der(certs[:2])),
        "certs-only-pem": ("certs_only", pkcs7.pkcs7.serialize_certificates(certs[:1], serialization.Encoding.PEM)),
        "csrattrs-default": ("csrattrs", csrattrs.csrattrs_response()),
        "csrattrs-der": ("csrattrs", csrattrs.build_csrattrs(attrs)),
        "csrattrs-long-oids": ("csrattrs", csrattrs.build_csrattrs(long_oids)),
        "basic-ascii": ("basic", basic_auth_header(DEVICE, "s3cret:with:colons").encode()),
        "basic-utf8": ("basic", basic_auth_header("gerät-7", "pässwörd").encode()),
    }


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else HERE / "corpus" / "est"
    made = seeds()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        old.unlink()
    for name, (entry, data) in made.items():
        (out / name).write_bytes(bytes([est_fuzz.SELECTOR[entry]]) + data)
    print(f"wrote {len(list(out.iterdir()))} seeds to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
