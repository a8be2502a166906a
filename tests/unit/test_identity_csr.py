"""POST /identities' CSR check (hub/api/identityroutes.py): every malformed request is a 400, never a 500."""

from __future__ import annotations

import base64

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hub.api.identityroutes import _public_key_of
from hub.api.queries import BadRequest


def csr_der() -> bytearray:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "svc.alice")])).sign(key, hashes.SHA256())
    return bytearray(csr.public_bytes(serialization.Encoding.DER))


def pem(der: bytes) -> str:
    return ("-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(der).decode()
            + "-----END CERTIFICATE REQUEST-----\n")


def test_a_good_csr_gives_its_key():
    assert isinstance(_public_key_of(pem(bytes(csr_der()))), ec.EllipticCurvePublicKey)


@pytest.mark.parametrize("version", [1, 2, 5, 0x7f])
def test_a_csr_with_another_version_is_a_400(version):
    der = csr_der()
    at = der.index(b"\x02\x01\x00")  # the version INTEGER of CertificationRequestInfo
    der[at + 2] = version
    with pytest.raises(BadRequest, match="not a PEM certificate request"):
        _public_key_of(pem(bytes(der)))


@pytest.mark.parametrize("value", [None, 7, "", "x" * 20_000, "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"
                                   "-----END CERTIFICATE REQUEST-----\n", "ünïcode"])
def test_other_garbage_is_a_400(value):
    with pytest.raises(BadRequest):
        _public_key_of(value)
