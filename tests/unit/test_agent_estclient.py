"""Tests for agent.estclient without a network: the DER extended-key-usage reader, the credential answer parsing,
and that the module stays free of cryptography (the running agent imports it)."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.estclient import CREDENTIAL_PATH, Credential, EstClient, EstClientError, has_server_auth_eku

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)


def cert_der(ekus: list | None = None, *, rsa_key: bool = False, many_exts: bool = False,
             critical: bool = False) -> bytes:
    key = rsa.generate_private_key(65537, 2048) if rsa_key else ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hub.example")])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(NOW).not_valid_after(NOW + dt.timedelta(days=1)))
    if many_exts:
        b = (b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.SubjectAlternativeName([x509.DNSName("hub.example")] * 40), critical=False)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if ekus is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(ekus), critical=critical)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


SERVER, CLIENT = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH


@pytest.mark.parametrize("kwargs, expected", [
    ({"ekus": [SERVER]}, True),
    ({"ekus": [CLIENT, SERVER]}, True),
    ({"ekus": [SERVER], "critical": True}, True),
    ({"ekus": [SERVER], "rsa_key": True, "many_exts": True}, True),   # long-form lengths everywhere
    ({"ekus": [CLIENT]}, False),                                      # a device certificate
    ({"ekus": [ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE]}, False),
    ({"ekus": None}, False),                                          # no EKU at all
    ({"ekus": None, "many_exts": True}, False),
])
def test_has_server_auth_eku(kwargs, expected) -> None:
    assert has_server_auth_eku(cert_der(**kwargs)) is expected


def test_has_server_auth_eku_fails_closed_on_garbage() -> None:
    good = cert_der([SERVER])
    for bad in (b"", b"\x30", b"\x30\x84\xff\xff\xff\xff", good[:len(good) // 2], good[:-1], b"\x04\x00",
                b"\x30\x03\x02\x01\x00", bytes(64)):
        assert has_server_auth_eku(bad) is False, bad[:8]
    # the serverAuth OID bytes outside an EKU extension do not count
    oid = bytes.fromhex("06082b06010505070301")
    assert has_server_auth_eku(b"\x30" + bytes([len(oid) + 2]) + b"\x30" + bytes([len(oid)]) + oid) is False


# -- credential(): the answer, with _request faked ------------------------------------------------------------------

def client_answering(monkeypatch, status: int, body: bytes) -> tuple[EstClient, list]:
    seen: list = []
    client = EstClient("https://hub.example:8443", cafile="unused", context=object())  # type: ignore[arg-type]

    def fake(method, path, body_=None, headers=None, limit=None):
        seen.append((method, path, limit))
        return status, "application/json", body

    monkeypatch.setattr(client, "_request", fake)
    return client, seen


@pytest.mark.parametrize("status", ["active", "suspended", "revoked", "superseded", "expired", "unknown"])
def test_credential(monkeypatch, status) -> None:
    device = None if status == "unknown" else "dev-1"
    client, seen = client_answering(monkeypatch, 200, json.dumps({"status": status, "device": device}).encode())
    assert client.credential() == Credential(status, device)
    assert seen == [("GET", CREDENTIAL_PATH, 4096)] and CREDENTIAL_PATH == "/tessera/v1/credential"


@pytest.mark.parametrize("status, body, message", [
    (401, b"client_cert_required: the credential status needs ...\n", "hub refused (401): client_cert_required"),
    (429, b"rate_limited: too many requests\n", "hub refused (429): rate_limited"),
    (200, b"<html>", "not JSON"),
    (200, b"\xff\xfe", "not JSON"),
    (200, b"[]", "unexpected credential answer"),
    (200, b'{"status": "banned", "device": "dev-1"}', "unexpected credential answer"),
    (200, b'{"status": ["active"], "device": "dev-1"}', "unexpected credential answer"),
    (200, b'{"status": "active", "device": 7}', "unexpected credential answer"),
    (200, b'{"device": "dev-1"}', "unexpected credential answer"),
])
def test_credential_errors(monkeypatch, status, body, message) -> None:
    client, _ = client_answering(monkeypatch, status, body)
    with pytest.raises(EstClientError, match=message.replace("(", r"\(").replace(")", r"\)")) as exc:
        client.credential()
    assert exc.value.status == status
    assert "\n" not in str(exc.value)


def test_estclient_import_stays_without_cryptography() -> None:
    code = "import sys, agent.estclient; print('cryptography' in sys.modules, 'est' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
