"""`tessera-agent enroll` against a real `tessera-hub serve` (with its Mosquitto), one real SoftHSM token per device.

Covers: the state directory and its modes, the one-time token file destroyed, idempotent re-enrollment (no new
certificate at the hub), a failed enrollment that leaves no certificate or identity and is retried with the same
token key, and bootstrap by root CA fingerprint (right and wrong). The token tests run on each token type, on one
TLS route (enroll signs the CSR through python-pkcs11 and authenticates with the bootstrap token, never with the
token key in TLS: see agentfixtures.make_token_device).
"""

from __future__ import annotations

import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tests.helpers import one_tls_route
from tests.integration.agentfixtures import (  # noqa: F401  (hub, make_device, make_token_device are fixtures)
    KEY_LABEL, ca_fingerprint, hub, make_device, make_token_device, one_line,
)

pytestmark = pytest.mark.integration


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def hub_certs(hub, device_id: str) -> list[dict]:
    return hub.show(device_id)["certificates"]


@one_tls_route  # enroll never puts the token key into TLS (see make_token_device)
def test_enroll_writes_private_state_and_destroys_the_token(hub, make_token_device):
    dev, token = make_token_device("enroll-1")
    token_file = dev.token_file(token)
    proc = dev.enroll(token_file)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"enrolled {dev.id}" in one_line(proc.stdout), proc.stdout

    # state directory and file modes
    assert mode(dev.state) == 0o700
    assert mode(dev.state / "identity.json") == 0o600
    for name in ("cert.pem", "fleet-root.pem"):
        assert (dev.state / name).is_file(), name
        assert mode(dev.state / name) & 0o022 == 0, f"{name} is group/other writable"
    assert not token_file.exists(), "the one-time enrollment token file must be destroyed after success"

    # identity.json matches the stored certificate and the hub's registry
    ident = dev.identity()
    leaf = x509.load_pem_x509_certificates((dev.state / "cert.pem").read_bytes())[0]
    assert ident["device_id"] == dev.id
    assert ident["serial"] == format(leaf.serial_number, "x")
    assert ident["fingerprint_sha256"] == leaf.fingerprint(hashes.SHA256()).hex()
    assert ident["key_label"] == KEY_LABEL
    assert ident["key_uri"].startswith(f"pkcs11:token={dev.token.label};object={KEY_LABEL};")
    assert (dev.state / "fleet-root.pem").read_bytes() == hub.root_pem.read_bytes()
    certs = hub_certs(hub, dev.id)
    assert [(c["serial"], c["status"]) for c in certs] == [(ident["serial"], "active")]

    # the key is in the token, non-extractable, and it is the certificate's key
    keys = dev.private_keys()
    assert len(keys) == 1 and keys[0].label == KEY_LABEL
    assert "never extractable" in keys[0].fields["Access"], keys[0].fields
    shown = dev.key_show()
    assert shown.returncode == 0, shown.stderr
    import json

    info = json.loads(shown.stdout)
    assert info["uri"] == ident["key_uri"]
    pub = serialization.load_pem_public_key(info["public_key"].encode())
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert pub.public_bytes(serialization.Encoding.DER, spki) == \
        leaf.public_key().public_bytes(serialization.Encoding.DER, spki)


def test_second_enroll_says_already_enrolled_and_changes_nothing(hub, make_device):
    dev, token = make_device("enroll-2")
    dev.enroll_ok(token)
    before_ident = (dev.state / "identity.json").read_bytes()
    before_certs = hub_certs(hub, "enroll-2")
    fresh = hub.new_token("enroll-2")  # even with a valid new token, nothing is re-issued
    proc = dev.enroll(dev.token_file(fresh, "second-token"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = one_line(proc.stdout + proc.stderr)
    assert "enroll-2 is enrolled" in text and "tessera-agent renew" in text, text
    assert hub_certs(hub, "enroll-2") == before_certs
    assert (dev.state / "identity.json").read_bytes() == before_ident
    assert len(dev.private_keys()) == 1


@one_tls_route  # enroll never puts the token key into TLS (see make_token_device)
def test_failed_enrollment_leaves_nothing_and_retry_reuses_the_key(hub, make_token_device):
    dev, token = make_token_device("enroll-3")
    wrong = dev.token_file("A" * 43, "wrong-token")
    proc = dev.enroll(wrong)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = one_line(proc.stderr)
    assert "error:" in err and "hub refused" in err, err
    assert token not in proc.stdout + proc.stderr
    # nothing half-done: no certificate, no identity, nothing issued, token file kept for a retry
    assert not (dev.state / "cert.pem").exists()
    assert not (dev.state / "identity.json").exists()
    assert hub_certs(hub, dev.id) == []
    assert wrong.exists()
    status = dev.status()
    assert status["enrolled"] is False and status["cert_serial"] is None
    # the failed attempt created the token key; the retry must reuse it, not add a second one
    keys = dev.private_keys()
    assert len(keys) == 1, keys
    first_id = keys[0].id

    right = dev.token_file(token, "right-token")
    proc = dev.enroll(right, "-v")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reusing token key" in proc.stderr, proc.stderr
    keys = dev.private_keys()
    assert [k.id for k in keys] == [first_id]
    assert dev.identity()["key_uri"].endswith("id=" + "".join(f"%{b:02X}" for b in bytes.fromhex(first_id)))
    assert [c["status"] for c in hub_certs(hub, dev.id)] == ["active"]
    assert not right.exists()


def test_token_file_readable_by_others_is_refused(hub, make_device):
    dev, token = make_device("enroll-4")
    path = dev.token_file(token)
    path.chmod(0o644)
    proc = dev.enroll(path)
    assert proc.returncode == 1
    assert "must be 0600" in one_line(proc.stderr), proc.stderr
    assert hub_certs(hub, "enroll-4") == []
    assert dev.private_keys() == [], "nothing may touch the token before the token file is accepted"


@pytest.mark.parametrize("form", ["plain", "colons"])
def test_ca_fingerprint_pinning(hub, make_device, form):
    dev, token = make_device(f"enroll-fp-{form}")
    fp = ca_fingerprint(hub)
    if form == "colons":
        fp = "SHA256:" + ":".join(fp[i:i + 2] for i in range(0, len(fp), 2)).upper()
    proc = dev.enroll(dev.token_file(token), "--ca-fingerprint", fp, ca=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the pinned root, fetched from /cacerts, is the fleet root
    assert (dev.state / "fleet-root.pem").read_bytes().strip() == hub.root_pem.read_bytes().strip()
    assert [c["status"] for c in hub_certs(hub, dev.id)] == ["active"]


def test_wrong_ca_fingerprint_is_refused(hub, make_device):
    dev, token = make_device("enroll-fp-wrong")
    right = ca_fingerprint(hub)
    wrong = right[:-2] + ("00" if right[-2:] != "00" else "11")
    path = dev.token_file(token)
    proc = dev.enroll(path, "--ca-fingerprint", wrong, ca=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "refusing to enroll" in one_line(proc.stderr), proc.stderr
    assert not (dev.state / "identity.json").exists() and not (dev.state / "cert.pem").exists()
    assert hub_certs(hub, dev.id) == []
    assert path.exists(), "the token was not used, so it must be kept"
    # and the same device then enrolls with the right fingerprint
    proc = dev.enroll(path, "--ca-fingerprint", right, ca=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
