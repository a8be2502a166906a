"""Token key generation, attributes, URIs, export refusal, CSRs and certificates signed in a SoftHSM token."""

from __future__ import annotations

import subprocess

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from hsm import worker
from hsm.errors import ExportRefused, HsmError, KeyExists, UnsupportedKeyType
from hsm.keys import KEY_TYPES
from hsm.uri import parse
from tests.helpers import child_export_attempts, child_self_signed, child_sign, parse_objects, pkcs11_tool

pytestmark = pytest.mark.integration

ALL_TYPES = ["ec-p256", "ec-p384", "rsa-2048", "rsa-3072"]
EXPECTED_PUBLIC = {
    "ec-p256": (ec.EllipticCurvePublicKey, "secp256r1"),
    "ec-p384": (ec.EllipticCurvePublicKey, "secp384r1"),
    "rsa-2048": (rsa.RSAPublicKey, 2048),
    "rsa-3072": (rsa.RSAPublicKey, 3072),
}
PRIVATE_ACCESS = {"sensitive", "always sensitive", "never extractable", "local"}


def _public(info):
    return serialization.load_pem_public_key(info.public_key_pem.encode())


def _same_key(a, b) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_bytes(*fmt) == b.public_bytes(*fmt)


def _tpm_without_pss(token, mode: str, key_type: str, data: bytes | None = None, hash_name: str = "sha256") -> bool:
    """On the TPM test token an RSA-PSS signature is refused, with a message naming mechanism and key type.

    swtpm is not in FIPS mode, so its TPM2_Sign(RSAPSS) uses the maximum salt; tpm2-pkcs11 then makes PSS
    signatures from a raw RSA decryption, which a sign-only key cannot do (the TPM answers "inconsistent
    attributes"). A TPM in FIPS mode signs PSS itself. PKCS#1 v1.5 (hashed in the token) and ECDSA work.
    """
    if token.kind != "tpm" or mode != "rsa-pss":
        return False
    with pytest.raises(HsmError) as err:
        if data is None:
            worker.run_isolated(child_self_signed, token.config, "ca-key", mode, "Token Root")
        else:
            worker.run_isolated(child_sign, token.config, "signer", data, mode, hash_name)
    msg = str(err.value)
    assert "CKM_RSA_PKCS_PSS" in msg and key_type in msg and "\n" not in msg, msg
    return True


@pytest.mark.parametrize("key_type", ALL_TYPES)
def test_generated_key_attributes_as_pkcs11_tool_sees_them(token, key_type):
    info = worker.generate_key(token.config, f"dev-{key_type}", key_type)

    assert info.key_type == key_type
    assert info.label == f"dev-{key_type}"
    assert info.token_label == token.label
    public = _public(info)
    cls, param = EXPECTED_PUBLIC[key_type]
    assert isinstance(public, cls)
    assert (public.curve.name if isinstance(public, ec.EllipticCurvePublicKey) else public.key_size) == param

    rc, out = pkcs11_tool(token, "-O")
    assert rc == 0, out
    objects = [o for o in parse_objects(out) if o.label == info.label]
    private = [o for o in objects if o.kind.startswith("Private Key Object")]
    public_objs = [o for o in objects if o.kind.startswith("Public Key Object")]
    assert len(private) == 1 and len(public_objs) == 1, out
    family = "EC" if key_type.startswith("ec") else "RSA"
    assert private[0].kind.split(";")[1].split()[0] == family
    assert private[0].id == info.id.hex() == public_objs[0].id
    # The private key is sensitive / never extractable / generated on the token, and may only sign.
    assert private[0].flags("Access") == PRIVATE_ACCESS, out
    assert private[0].flags("Usage") == {"sign"}, out
    # The public half never wraps or derives. Its verify/encrypt flags are the token's (hsm.templates: tpm2-pkcs11
    # derives them from the TPM object and refuses any other value; SoftHSM's default is both).
    assert public_objs[0].flags("Usage") <= {"verify", "encrypt"}, out
    if family == "RSA":
        assert f"RSA {param} bits" in public_objs[0].kind
    else:
        assert public_objs[0].kind.endswith(f"EC_POINT {public.curve.key_size} bits")


@pytest.mark.parametrize("key_type", ["ec-p256", "rsa-2048"])
def test_key_uri_parses_back(token, key_type):
    info = worker.generate_key(token.config, "uri key;with/odd chars", key_type, key_id=b"\x00\x01\xfe;")
    uri = parse(info.uri)
    assert uri.token == token.label
    assert uri.object == "uri key;with/odd chars"
    assert uri.id == b"\x00\x01\xfe;" == info.id
    assert uri.type == "private"
    assert uri.pin_value is None and uri.pin_source is None  # the key URI never carries the PIN
    # describe_key finds the same key again and gives the same URI
    again = worker.describe_key(token.config, "uri key;with/odd chars")
    assert again.uri == info.uri
    assert again.public_key_pem == info.public_key_pem


def test_random_key_ids_are_distinct(token):
    a = worker.generate_key(token.config, "a")
    b = worker.generate_key(token.config, "b")
    assert len(a.id) >= 4 and a.id != b.id
    assert parse(a.uri).id == a.id and parse(b.uri).id == b.id


def test_duplicate_label_is_refused(token):
    first = worker.generate_key(token.config, "device", "ec-p256")
    with pytest.raises(KeyExists) as err:
        worker.generate_key(token.config, "device", "rsa-2048")
    msg = str(err.value)
    assert "'device'" in msg and "\n" not in msg
    # nothing was overwritten or added: exactly one key pair carries the label, and it is the first one
    rc, out = pkcs11_tool(token, "-O")
    assert rc == 0, out
    labelled = [o for o in parse_objects(out) if o.label == "device"]
    assert len(labelled) == 2, out  # one private + one public
    assert {o.id for o in labelled} == {first.id.hex()}
    assert worker.describe_key(token.config, "device").public_key_pem == first.public_key_pem


@pytest.mark.parametrize("bad", ["ed25519", "EC-P256", "rsa-1024", "ec-p521", ""])
def test_unknown_key_type_is_refused(token, bad):
    with pytest.raises(UnsupportedKeyType) as err:
        worker.generate_key(token.config, "k", bad)
    msg = str(err.value)
    assert "\n" not in msg
    assert repr(bad) in msg
    for choice in KEY_TYPES:
        assert choice in msg
    rc, out = pkcs11_tool(token, "-O")
    assert rc == 0
    assert not [o for o in parse_objects(out) if o.label == "k"], "a key was created anyway"


@pytest.mark.parametrize("key_type", ["ec-p256", "rsa-2048"])
def test_every_export_path_is_refused(token, key_type):
    worker.generate_key(token.config, "secret", key_type)
    results = worker.run_isolated(child_export_attempts, token.config, "secret")
    expected = {"private_bytes/PEM/PKCS8", "private_bytes/DER/PKCS8", "private_bytes/PEM/TraditionalOpenSSL",
                "private_numbers", "pickle", "deepcopy+private_bytes"}
    expected |= {"ecdh"} if key_type.startswith("ec") else {"rsa_decrypt_oaep", "rsa_decrypt_pkcs1"}
    assert set(results) == expected
    for attempt, (exc_type, message) in results.items():
        assert exc_type == ExportRefused.__name__, f"{attempt}: {exc_type or 'no exception'} {message}"
        assert message and "\n" not in message


@pytest.mark.parametrize("key_type", ALL_TYPES)
def test_csr_signed_in_token_verifies(token, key_type, tmp_path):
    info = worker.generate_key(token.config, "csr-key", key_type)
    der = worker.make_csr(token.config, "csr-key", common_name="device-0042")
    csr = x509.load_der_x509_csr(der)
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "device-0042"
    assert _same_key(csr.public_key(), _public(info))
    assert isinstance(csr.signature_hash_algorithm, hashes.SHA256)

    path = tmp_path / "req.der"
    path.write_bytes(der)
    proc = subprocess.run(["openssl", "req", "-verify", "-inform", "DER", "-in", str(path), "-noout"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "verify OK" in proc.stdout + proc.stderr, proc.stdout + proc.stderr

    # control: a CSR whose signature is damaged must fail the same check
    bad = bytearray(der)
    bad[-3] ^= 0x01
    path.write_bytes(bytes(bad))
    proc = subprocess.run(["openssl", "req", "-verify", "-inform", "DER", "-in", str(path), "-noout"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 or "verify OK" not in proc.stdout + proc.stderr


@pytest.mark.parametrize(("key_type", "mode"), [
    ("ec-p256", "ec"), ("ec-p384", "ec"), ("rsa-2048", "rsa-pkcs1"), ("rsa-2048", "rsa-pss"), ("rsa-3072", "rsa-pss"),
])
def test_self_signed_certificate_from_token_key(token, key_type, mode, tmp_path):
    info = worker.generate_key(token.config, "ca-key", key_type)
    if _tpm_without_pss(token, mode, key_type):
        return
    der = worker.run_isolated(child_self_signed, token.config, "ca-key", mode, "Token Root")
    cert = x509.load_der_x509_certificate(der)
    assert _same_key(cert.public_key(), _public(info))
    cert.verify_directly_issued_by(cert)  # raises InvalidSignature on a bad signature
    public = cert.public_key()
    if mode == "ec":
        public.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    elif mode == "rsa-pkcs1":
        assert cert.signature_algorithm_parameters.__class__ is padding.PKCS1v15
        public.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm)
    else:
        assert isinstance(cert.signature_algorithm_parameters, padding.PSS)
        public.verify(cert.signature, cert.tbs_certificate_bytes,
                      padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH), hashes.SHA256())

    pem = tmp_path / "self.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    proc = subprocess.run(["openssl", "verify", "-CAfile", str(pem), str(pem)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout.strip() == f"{pem}: OK", proc.stdout + proc.stderr
    proc = subprocess.run(["openssl", "x509", "-in", str(pem), "-noout", "-text"], capture_output=True, text=True,
                          timeout=30)
    expected_alg = {"ec": "ecdsa-with-SHA256", "rsa-pkcs1": "sha256WithRSAEncryption", "rsa-pss": "rsassaPss"}[mode]
    assert f"Signature Algorithm: {expected_alg}" in proc.stdout


@pytest.mark.parametrize(("key_type", "mode", "hash_name"), [
    ("ec-p256", "ec", "sha256"), ("ec-p384", "ec", "sha384"), ("rsa-2048", "rsa-pkcs1", "sha256"),
    ("rsa-2048", "rsa-pss", "sha512"), ("rsa-3072", "rsa-pkcs1", "sha384"),
])
def test_token_signature_verifies_with_public_key(token, key_type, mode, hash_name):
    info = worker.generate_key(token.config, "signer", key_type)
    data = b"tessera firmware manifest v1\x00" * 50
    if _tpm_without_pss(token, mode, key_type, data, hash_name):
        return
    sig, session_pem = worker.run_isolated(child_sign, token.config, "signer", data, mode, hash_name)
    assert session_pem == info.public_key_pem
    public = _public(info)
    algorithm = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}[hash_name]
    if mode == "ec":
        args = (ec.ECDSA(algorithm),)
    elif mode == "rsa-pkcs1":
        args = (padding.PKCS1v15(), algorithm)
        assert len(sig) == public.key_size // 8
    else:
        args = (padding.PSS(padding.MGF1(algorithm), padding.PSS.AUTO), algorithm)
    public.verify(sig, data, *args)
    with pytest.raises(InvalidSignature):
        public.verify(sig, data + b"!", *args)
