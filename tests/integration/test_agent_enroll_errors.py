"""`tessera-agent enroll` with a wrong trust anchor says what is wrong (issue 15): a malformed --ca-fingerprint is
refused before anything is fetched or generated, another fleet's root (--ca-file) is named as the likely cause
instead of a bare CERTIFICATE_VERIFY_FAILED; the one-time token is kept both times. Cost: one running hub (module)
and a SoftHSM token per device, ~25 s (measured on the loaded 2-core machine)."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration.agentfixtures import hub, make_device, one_line  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration


def foreign_root(path):
    """A self-signed CA certificate of another fleet (a valid root, just not this hub's)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "other-fleet"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "other-fleet root CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.mark.parametrize("fingerprint", ["deadbeef", "sha256:" + "g" * 64, "ab" * 33, "AB:CD"])
def test_a_malformed_ca_fingerprint_is_refused_before_anything_happens(hub, make_device, fingerprint):
    dev, token = make_device(f"fp-bad-{len(fingerprint)}-{fingerprint[:2].lower()}")
    path = dev.token_file(token)
    proc = dev.enroll(path, "--ca-fingerprint", fingerprint, ca=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    message = one_line(proc.stderr)
    assert "is not a SHA-256 fingerprint (64 hex digits" in message and repr(fingerprint) in message, message
    assert "Traceback" not in proc.stderr
    assert path.exists() and dev.private_keys() == []
    assert not (dev.state / "fleet-root.pem").exists()


def test_another_fleets_root_is_named_as_the_cause(hub, make_device, tmp_path):
    dev, token = make_device("fp-foreign-root")
    path = dev.token_file(token)
    proc = dev.enroll(path, "--ca-file", str(foreign_root(tmp_path / "other-root.pem")), ca=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    message = one_line(proc.stderr)
    assert "does not verify against the fleet root this device trusts" in message, message
    assert "another fleet's" in message and "ca/root.pem" in message, message
    assert "Traceback" not in proc.stderr
    assert path.exists() and hub.show(dev.id)["certificates"] == []
    # the right root then works with the same token
    proc = dev.enroll(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
