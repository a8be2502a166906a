"""Enrollment and re-enrollment against a real `tessera-hub serve`, through the agent's EST client.

Keys: a SoftHSM token key (CSR signed in the token by hsm.worker.make_csr, mTLS through hsm.tls in a child
process) and plain file keys. Every issued certificate is checked by `openssl verify` against the fleet chain.
"""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.estclient import EstClient, EstClientError
from hsm import worker
from tests.integration.hubfixtures import (  # noqa: F401  (hub, module_token are fixtures)
    EST_PREFIX, FLEET, ForeignCA, b64_body, cn_of, eku_of, hub, make_csr, module_token, new_key, openssl_verify,
    org_of, request, spki, token_reenroll_child, write_key, write_pem,
)

pytestmark = pytest.mark.integration


def est_client(hub, context=None) -> EstClient:
    return EstClient(hub.url, cafile=str(hub.root_pem), context=context)


def mtls_client(hub, cert, key) -> EstClient:
    from agent.estclient import client_context

    ctx = client_context(str(hub.root_pem))
    ctx.load_cert_chain(str(cert), str(key))
    return est_client(hub, ctx)


def check_leaf(hub, leaf: x509.Certificate, device_id: str, public_key, tmp_path) -> None:
    """CN=device id, O=fleet, EKU clientAuth only, not a CA, our key; `openssl verify -purpose sslclient` OK."""
    assert cn_of(leaf) == device_id
    assert org_of(leaf) == [FLEET]
    assert eku_of(leaf) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert spki(leaf.public_key()) == spki(public_key)
    assert leaf.issuer == x509.load_pem_x509_certificate(hub.device_ca_pem.read_bytes()).subject
    path = write_pem(tmp_path / f"{device_id}-{leaf.serial_number:x}.pem", leaf)
    proc = openssl_verify(hub, path, "-purpose", "sslclient")
    assert proc.returncode == 0 and proc.stdout.decode().strip().endswith(": OK"), proc.stdout + proc.stderr


def enroll_file_key(hub, device_id: str, tmp_path) -> tuple[x509.Certificate, object, object]:
    """Register, enroll with a fresh file key; returns (leaf, cert path, key path)."""
    token = hub.add_device(device_id)
    key = new_key()
    certs = est_client(hub).simpleenroll(make_csr(key, device_id), device_id, token)
    return certs[0], write_pem(tmp_path / f"{device_id}.pem", *certs), write_key(tmp_path / f"{device_id}.key", key)


def registry_cert(hub, device_id: str, leaf: x509.Certificate) -> dict:
    rows = {c["serial"]: c for c in hub.show(device_id)["certificates"]}
    return rows[format(leaf.serial_number, "x")]


# --- 1. enrollment through the EST client ------------------------------------------------------------------------

def test_cacerts_through_the_est_client(hub):
    certs = est_client(hub).cacerts()
    names = sorted(cn_of(c) for c in certs)
    assert names == [f"{FLEET} Device CA", f"{FLEET} Root CA", f"{FLEET} Service CA"]
    root = x509.load_pem_x509_certificate(hub.root_pem.read_bytes())
    assert root in certs


def test_enroll_with_a_token_key(hub, module_token, tmp_path):
    device_id = "enr-token-1"
    info = worker.generate_key(module_token.config, "enr-token-1", "ec-p256")
    csr = worker.make_csr(module_token.config, "enr-token-1", common_name=device_id)
    token = hub.add_device(device_id)
    before = hub.device_list()[device_id]
    assert before["cert_expires"] is None and before["status"] == "pending"

    certs = est_client(hub).simpleenroll(csr, device_id, token)

    leaf = certs[0]
    token_public = serialization.load_pem_public_key(info.public_key_pem.encode())
    check_leaf(hub, leaf, device_id, token_public, tmp_path)
    assert [cn_of(c) for c in certs[1:]] == [f"{FLEET} Device CA"]
    listed = hub.device_list()[device_id]
    assert dt.datetime.fromisoformat(listed["cert_expires"]) == leaf.not_valid_after_utc
    row = registry_cert(hub, device_id, leaf)
    assert row["status"] == "active"
    assert row["fingerprint_sha256"] == leaf.fingerprint(hashes.SHA256()).hex()


def test_enroll_with_a_file_key(hub, tmp_path):
    device_id = "enr-file-1"
    token = hub.add_device(device_id)
    key = new_key()
    certs = est_client(hub).simpleenroll(make_csr(key, device_id), device_id, token)
    leaf = certs[0]
    check_leaf(hub, leaf, device_id, key.public_key(), tmp_path)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= dt.timedelta(days=30, minutes=5)
    listed = hub.device_list()[device_id]
    assert dt.datetime.fromisoformat(listed["cert_expires"]) == leaf.not_valid_after_utc
    audit = hub.cli_json("audit", "--device", device_id)
    assert audit[0]["action"] == "enroll" and audit[0]["outcome"] == "ok"
    assert audit[0]["detail"] == f"serial {leaf.serial_number:x}"


def test_enroll_with_an_empty_subject_gets_the_device_id(hub, tmp_path):
    """The hub decides the subject: a CSR without CN still gets CN=<authenticated device id>."""
    device_id = "enr-nosubject"
    token = hub.add_device(device_id)
    key = new_key()
    leaf = est_client(hub).simpleenroll(make_csr(key, None), device_id, token)[0]
    check_leaf(hub, leaf, device_id, key.public_key(), tmp_path)


# --- 3. re-enrollment with key rotation ----------------------------------------------------------------------------

def test_reenroll_rotates_the_key_with_a_file_key(hub, tmp_path):
    device_id = "ren-file-1"
    old_leaf, old_cert, old_key = enroll_file_key(hub, device_id, tmp_path)

    new = new_key()
    certs = mtls_client(hub, old_cert, old_key).simplereenroll(make_csr(new, device_id))

    leaf = certs[0]
    check_leaf(hub, leaf, device_id, new.public_key(), tmp_path)
    assert leaf.subject == old_leaf.subject
    assert leaf.serial_number != old_leaf.serial_number
    assert spki(leaf.public_key()) != spki(old_leaf.public_key())
    assert registry_cert(hub, device_id, old_leaf)["status"] == "superseded"
    assert registry_cert(hub, device_id, leaf)["status"] == "active"
    assert hub.cert_count(device_id) == 2
    listed = hub.device_list()[device_id]
    assert dt.datetime.fromisoformat(listed["cert_expires"]) == leaf.not_valid_after_utc
    audit = hub.cli_json("audit", "--device", device_id)[0]
    assert (audit["action"], audit["outcome"]) == ("reenroll", "ok")
    assert audit["detail"] == f"serial {leaf.serial_number:x} supersedes {old_leaf.serial_number:x}"


def test_reenroll_with_a_superseded_certificate_is_refused(hub, tmp_path):
    device_id = "ren-file-2"
    _, old_cert, old_key = enroll_file_key(hub, device_id, tmp_path)
    mtls_client(hub, old_cert, old_key).simplereenroll(make_csr(new_key(), device_id))
    state, mark = hub.state(), hub.last_audit_id()

    with pytest.raises(EstClientError) as err:
        mtls_client(hub, old_cert, old_key).simplereenroll(make_csr(new_key(), device_id))

    assert (err.value.status, err.value.code) == (403, "cert_superseded")
    assert hub.state() == state
    rows = hub.audit_since(mark)
    assert [(r["action"], r["outcome"]) for r in rows] == [("reenroll", "denied")]
    assert rows[0]["detail"].startswith("cert_superseded:")


def test_reenroll_with_a_token_key_over_mtls(hub, module_token, tmp_path):
    """Current cert + token key in hsm.tls.client_context (child process); the CSR is for a new token key."""
    device_id = "ren-token-1"
    cfg = module_token.config
    worker.generate_key(cfg, "ren-token-1-a", "ec-p256")
    token = hub.add_device(device_id)
    certs = est_client(hub).simpleenroll(worker.make_csr(cfg, "ren-token-1-a", common_name=device_id),
                                         device_id, token)
    old_leaf = certs[0]
    chain = write_pem(tmp_path / "old.pem", *certs)
    old_uri = worker.describe_key(cfg, "ren-token-1-a").uri
    new_info = worker.generate_key(cfg, "ren-token-1-b", "ec-p256")
    new_csr = worker.make_csr(cfg, "ren-token-1-b", common_name=device_id)

    answer = token_reenroll_child(hub, chain, old_uri, cfg, new_csr)

    assert answer["ok"], answer
    leaf = x509.load_pem_x509_certificate(answer["pems"][0].encode())
    check_leaf(hub, leaf, device_id, serialization.load_pem_public_key(new_info.public_key_pem.encode()), tmp_path)
    assert leaf.subject == old_leaf.subject
    assert registry_cert(hub, device_id, old_leaf)["status"] == "superseded"
    assert registry_cert(hub, device_id, leaf)["status"] == "active"


def test_reenroll_with_a_foreign_ca_certificate_fails_the_handshake(hub, tmp_path):
    device_id = "ren-foreign-1"
    enroll_file_key(hub, device_id, tmp_path)  # the device exists and has a real certificate
    foreign_cert, foreign_key = ForeignCA(tmp_path / "foreign").client(device_id)
    state, mark = hub.state(), hub.last_audit_id()

    with pytest.raises(EstClientError) as err:
        mtls_client(hub, foreign_cert, foreign_key).simplereenroll(make_csr(new_key(), device_id))

    assert err.value.status == 0  # a transport (TLS) error, not an HTTP answer
    rows = hub.wait_audit(mark, lambda r: r["action"] == "tls")
    tls = [r for r in rows if r["action"] == "tls"]
    assert [(r["outcome"], r["source"]) for r in tls] == [("denied", "127.0.0.1")]
    assert "client certificate refused" in tls[0]["detail"]
    assert not [r for r in rows if r["action"] == "reenroll"]
    assert hub.state() == state
    cli_rows = hub.cli_json("audit", "--limit", "5")
    assert any(r["id"] == tls[0]["id"] and r["outcome"] == "denied" for r in cli_rows)


def test_reenroll_with_the_hub_admin_certificate_fails_the_handshake(hub):
    """A service-CA certificate (the hub's own admin identity) is not a device certificate.

    From 127.0.0.2: the foreign-CA test above was a TLS denial from 127.0.0.1, and those are audited once per
    (source, reason) a minute (hub.est.denials)."""
    mark = hub.last_audit_id()
    with pytest.raises(OSError):  # ssl.SSLError or a reset: a transport (TLS) error, not an HTTP answer
        request(hub, "POST", f"{EST_PREFIX}/simplereenroll", b64_body(make_csr(new_key(), "tessera-hub")),
                {"Content-Type": "application/pkcs10"}, cert=hub.dir / "tls" / "admin.pem",
                key=hub.dir / "tls" / "admin.key", source="127.0.0.2")
    rows = hub.wait_audit(mark, lambda r: r["action"] == "tls")
    assert [(r["outcome"], r["source"]) for r in rows if r["action"] == "tls"] == [("denied", "127.0.0.2")]
    assert not [r for r in rows if r["action"] == "reenroll"]


def test_reenroll_with_a_revoked_certificate_is_forbidden(hub, tmp_path):
    device_id = "ren-revoked-1"
    leaf, cert, key = enroll_file_key(hub, device_id, tmp_path)
    out = hub.cli_ok("device", "revoke", device_id, "--reason", "keyCompromise")
    assert "revoked" in out
    assert registry_cert(hub, device_id, leaf)["status"] == "revoked"
    state, mark = hub.state(), hub.last_audit_id()

    with pytest.raises(EstClientError) as err:
        mtls_client(hub, cert, key).simplereenroll(make_csr(new_key(), device_id))

    assert (err.value.status, err.value.code) == (403, "cert_revoked")
    assert hub.state() == state
    rows = hub.audit_since(mark)
    assert [(r["action"], r["outcome"], r["device_id"]) for r in rows] == [("reenroll", "denied", device_id)]
    assert rows[0]["detail"].startswith("cert_revoked:")


def test_reenroll_without_a_client_certificate_is_unauthorized(hub):
    state, mark = hub.state(), hub.last_audit_id()
    resp = request(hub, "POST", f"{EST_PREFIX}/simplereenroll", b64_body(make_csr(new_key(), "ren-none")),
                   {"Content-Type": "application/pkcs10"})
    assert resp.status == 401
    assert resp.code == "client_cert_required"
    assert resp.headers.get("www-authenticate", "").startswith("Basic ")
    assert hub.state() == state
    rows = hub.audit_since(mark)
    assert [(r["action"], r["outcome"]) for r in rows] == [("reenroll", "denied")]
    assert rows[0]["detail"].startswith("client_cert_required:")


def test_reenroll_csr_for_another_device_is_forbidden(hub, tmp_path):
    """The mTLS identity decides: a CSR naming another device is refused and nothing is issued."""
    enroll_file_key(hub, "ren-other-a", tmp_path)
    hub.add_device("ren-other-b")
    _, cert, key = enroll_file_key(hub, "ren-other-c", tmp_path)
    state = hub.state()
    with pytest.raises(EstClientError) as err:
        mtls_client(hub, cert, key).simplereenroll(make_csr(new_key(), "ren-other-a"))
    assert (err.value.status, err.value.code) == (403, "name_mismatch")
    assert hub.state() == state
