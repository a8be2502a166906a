#!/usr/bin/env python3
"""Coverage-guided fuzz target (atheris / libFuzzer) over every decoder in ``est/``.

The first input byte picks the entry point (``ENTRY_POINTS[data[0] % len(ENTRY_POINTS)]``), the rest is its
input.  A run "crashes" on any exception other than ``est.errors.EstError`` (and on an EstError whose status is
not the documented one: 4xx for server-side decoders, 502 BadResponse for the client-side ones), and on a
broken invariant (an accepted CSR whose self-signature does not verify, a decoded value that does not survive
re-encoding).

    .venv/bin/python fuzz/est_fuzz.py -max_total_time=60 /tmp/est-corpus fuzz/corpus/est   # fuzz
    .venv/bin/python fuzz/est_fuzz.py crash-<sha1>                                          # reproduce

libFuzzer writes new inputs into the FIRST corpus directory: give it a scratch one, keep fuzz/corpus/est (the
seeds, made by fuzz/make_corpus.py) second.  fuzz/corpus/est-crashes keeps every crash found so far (a
crash-* file, renamed after what it hit, committed with its fix): pass it too, as the tests do.  Importing this module (not running it) needs no atheris:
``one_input`` is plain Python, used by tests/integration/test_est_fuzz.py on the seeds.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if __name__ == "__main__":
    import atheris

    _instrumented = atheris.instrument_imports(include=["est"])
else:
    _instrumented = contextlib.nullcontext()

with _instrumented:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa

    from est import auth, csr as est_csr, csrattrs, messages, pkcs7
    from est.errors import EstError

DEVICE = "dev-0042"
SERVER_SIDE = range(400, 500)
CLIENT_SIDE = (502,)


class Rejected(Exception):
    """An EstError of the documented kind: the decoder refused the input cleanly."""


def expect(statuses, fn, *args, **kwargs):
    """``fn(*args)``; an EstError with a code and one of ``statuses`` becomes Rejected, any other error propagates."""
    try:
        return fn(*args, **kwargs)
    except EstError as exc:
        if not (isinstance(exc.code, str) and exc.code and exc.status in statuses):
            raise AssertionError(f"{fn.__name__}: EstError outside the documented statuses: {exc!r}") from exc
        raise Rejected(exc.code) from None


def verify_self_signature(csr: x509.CertificateSigningRequest) -> None:
    """Check the CSR's signature with its public key directly (not via ``is_signature_valid``)."""
    key, sig, tbs, alg = csr.public_key(), csr.signature, csr.tbs_certrequest_bytes, csr.signature_hash_algorithm
    if isinstance(key, rsa.RSAPublicKey):
        pad = csr.signature_algorithm_parameters
        key.verify(sig, tbs, pad if isinstance(pad, padding.AsymmetricPadding) else padding.PKCS1v15(), alg)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(sig, tbs, ec.ECDSA(alg))
    elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        key.verify(sig, tbs)
    elif isinstance(key, dsa.DSAPublicKey):
        key.verify(sig, tbs, alg)
    else:  # pragma: no cover - load_csr only returns loadable keys
        raise AssertionError(f"accepted CSR with a key the harness does not know: {type(key).__name__}")


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def fuzz_base64(data: bytes) -> None:
    out = expect(SERVER_SIDE, messages.decode_base64_body, data)
    assert messages.decode_base64_body(messages.encode_base64_body(out)) == out


def fuzz_base64_pem(data: bytes) -> None:
    expect(SERVER_SIDE, messages.decode_base64_body, data, pem_labels=est_csr.PEM_CSR_LABELS)


def fuzz_content_type(data: bytes) -> None:
    messages.is_certs_only_content_type(data)
    messages.is_certs_only_content_type(_text(data))
    with contextlib.suppress(Rejected):
        expect(SERVER_SIDE, messages.check_request_content_type, _text(data))
    mime, params = expect(SERVER_SIDE, messages.parse_content_type, data)
    assert mime == mime.lower() and all(k == k.lower() for k in params)


def fuzz_path(data: bytes) -> None:
    _label, op = expect(SERVER_SIDE, messages.split_est_path, _text(data))
    assert op in messages.OPERATIONS


def _check_accepted_csr(csr: x509.CertificateSigningRequest) -> None:
    verify_self_signature(csr)  # InvalidSignature here = load_csr accepted a forged/broken CSR
    with contextlib.suppress(Rejected):
        expect(SERVER_SIDE, est_csr.check_csr_key, csr)
    expect(SERVER_SIDE, est_csr.check_csr_request, csr, DEVICE)


def fuzz_csr(data: bytes) -> None:
    _check_accepted_csr(expect(SERVER_SIDE, est_csr.load_csr, data))


def fuzz_csr_der(data: bytes) -> None:
    """Raw DER, base64-wrapped by the harness: lets the fuzzer work on the ASN.1 directly."""
    _check_accepted_csr(expect(SERVER_SIDE, est_csr.load_csr, messages.encode_base64_body(data)))


def fuzz_enroll(data: bytes) -> None:
    """``<content type>\\n<body>``."""
    content_type, _, body = data.partition(b"\n")
    csr = expect(SERVER_SIDE, est_csr.parse_enroll_request, content_type, body, DEVICE)
    verify_self_signature(csr)


def fuzz_certs_only(data: bytes) -> None:
    certs = expect(CLIENT_SIDE, pkcs7.parse_certs_only, data)
    assert certs and all(isinstance(c, x509.Certificate) for c in certs)


def fuzz_csrattrs(data: bytes) -> None:
    items = expect(CLIENT_SIDE, csrattrs.parse_csrattrs, data)
    if not items:
        return
    der = csrattrs.build_csrattrs(items)
    assert csrattrs.build_csrattrs(csrattrs.parse_csrattrs(der)) == der, "csrattrs do not survive re-encoding"


def fuzz_basic(data: bytes) -> None:
    with contextlib.suppress(Rejected):
        _check_credentials(expect(SERVER_SIDE, auth.parse_basic_auth, _text(data)))
    _check_credentials(expect(SERVER_SIDE, auth.parse_basic_auth, data))


def _check_credentials(creds: auth.BasicCredentials) -> None:
    assert creds.user and ":" not in creds.user
    assert auth.parse_basic_auth(auth.basic_auth_header(*creds)) == creds


SIGNING_KEY = ec.derive_private_key(0x7E55E7A, ec.SECP256R1())


def signed_csr_der(subject: bytes, attributes: bytes) -> bytes:
    """A CertificationRequest around any subject / attributes DER, validly signed: gets past the signature check."""
    spki = SIGNING_KEY.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    info = csrattrs._tlv(0x30, b"\x02\x01\x00" + subject + spki + csrattrs._tlv(0xA0, attributes))
    signature = SIGNING_KEY.sign(info, ec.ECDSA(hashes.SHA256()))
    ecdsa_sha256 = bytes.fromhex("300a06082a8648ce3d040302")
    return csrattrs._tlv(0x30, info + ecdsa_sha256 + csrattrs._tlv(0x03, b"\x00" + signature))


def fuzz_csr_signed(data: bytes) -> None:
    """``<n><subject: n bytes><attributes>``, signed by the harness: fuzzes what the server checks after the signature."""
    if not data:
        return
    n = data[0]
    subject, attributes = data[1 : 1 + n], data[1 + n :]
    fuzz_enroll(messages.CT_PKCS10.encode() + b"\n" + messages.encode_base64_body(signed_csr_der(subject, attributes)))


ENTRY_POINTS = (
    ("base64", fuzz_base64),
    ("base64_pem", fuzz_base64_pem),
    ("content_type", fuzz_content_type),
    ("path", fuzz_path),
    ("csr", fuzz_csr),
    ("csr_der", fuzz_csr_der),
    ("enroll", fuzz_enroll),
    ("certs_only", fuzz_certs_only),
    ("csrattrs", fuzz_csrattrs),
    ("basic", fuzz_basic),
    ("csr_signed", fuzz_csr_signed),  # new entry points go last: the seeds' and crashes' selectors stay valid
)
SELECTOR = {name: index for index, (name, _) in enumerate(ENTRY_POINTS)}


def one_input(data: bytes) -> None:
    """The fuzz target: dispatch on the first byte; raises on a crash, returns otherwise."""
    if not data:
        return
    _, target = ENTRY_POINTS[data[0] % len(ENTRY_POINTS)]
    with contextlib.suppress(Rejected):
        target(bytes(data[1:]))


def main() -> None:
    import atheris

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
