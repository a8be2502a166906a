"""`GET /tessera/v1/credential` on the EST listener of a real `tessera-hub serve`: what the registry says about the
TLS client certificate a device presents (the broker refuses every connection with the same CONNACK code, so a
refused agent asks here). Read-only: never audited, but rate limited per source.

The first tests check hub.est.service.credential_status (pure) on registry rows.
"""

from __future__ import annotations

import datetime as dt
import json
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.estclient import Credential, EstClient, client_context
from hub.est.service import CREDENTIAL_PATH, credential_status
from tests.integration.hubfixtures import (  # noqa: F401  (hub is a fixture)
    EST_PREFIX, FLEET, ForeignCA, b64_body, enroll, hub, make_csr, new_key, parse_pkcs7, request, running_hub,
    write_key, write_pem,
)

pytestmark = pytest.mark.integration

NOW = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.timezone.utc)


def row(device_status="active", cert_status="active", not_before=NOW - dt.timedelta(days=1),
        not_after=NOW + dt.timedelta(days=1), grace_until=None, device="dev-1") -> dict:
    return {"cert_status": cert_status, "not_before": not_before.isoformat(timespec="microseconds"),
            "not_after": not_after.isoformat(timespec="microseconds"),
            "grace_until": grace_until and grace_until.isoformat(), "device_status": device_status, "id": device}


# --- credential_status on registry rows ------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, expected", [
    ({}, "active"),
    ({"device_status": "suspended"}, "suspended"),
    ({"device_status": "revoked"}, "revoked"),
    ({"device_status": "suspended", "cert_status": "revoked"}, "suspended"),   # the device's status wins
    ({"device_status": "revoked", "cert_status": "superseded"}, "revoked"),
    ({"device_status": "suspended", "not_after": NOW - dt.timedelta(hours=1)}, "suspended"),
    ({"cert_status": "revoked"}, "revoked"),
    ({"cert_status": "superseded"}, "superseded"),
    ({"cert_status": "superseded", "grace_until": NOW + dt.timedelta(minutes=4)}, "superseded"),  # in grace too
    ({"not_after": NOW - dt.timedelta(microseconds=1)}, "expired"),
    ({"not_after": NOW}, "expired"),
    ({"not_before": NOW + dt.timedelta(minutes=1)}, "expired"),               # not yet valid
    ({"device": "dev-2"}, "unknown"),                                         # not the CN's certificate
])
def test_credential_status(kwargs, expected):
    assert credential_status(row(**kwargs), "dev-1", NOW) == expected


def test_credential_status_of_an_unknown_serial():
    assert credential_status(None, "dev-1", NOW) == "unknown"


# --- against a running hub ---------------------------------------------------------------------------------------

def enroll_device(hub, device_id: str, tmp_path):
    """Register and enroll with a file key: (leaf, cert chain path, key path)."""
    token = hub.add_device(device_id)
    key = new_key()
    resp = enroll(hub, device_id, token, make_csr(key, device_id))
    assert resp.status == 200, resp.text
    certs = parse_pkcs7(resp.body)
    leaf = next(c for c in certs if c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device_id)
    return (leaf, write_pem(tmp_path / f"{device_id}-{leaf.serial_number:x}.pem", *certs),
            write_key(tmp_path / f"{device_id}-{leaf.serial_number:x}.key", key))


def credential(hub, cert, key, source: str | None = None) -> tuple[int, dict | str]:
    resp = request(hub, "GET", CREDENTIAL_PATH, cert=cert, key=key, source=source)
    if resp.status != 200:
        return resp.status, resp.code
    assert resp.headers["content-type"] == "application/json" and resp.headers["cache-control"] == "no-store"
    return 200, json.loads(resp.body)


def credential_rows(hub, after: int) -> list[dict]:
    return [r for r in hub.audit_since(after) if r["action"] == "credential"]


def test_active_suspended_resumed_revoked(hub, tmp_path):
    _, cert, key = enroll_device(hub, "cred-1", tmp_path)
    mark = hub.last_audit_id()
    assert credential(hub, cert, key) == (200, {"status": "active", "device": "cred-1"})
    assert credential(hub, cert, key) == (200, {"status": "active", "device": "cred-1"})
    assert hub.audit_since(mark) == [], "the credential status is read-only and never audited"
    hub.cli_ok("device", "suspend", "cred-1")
    assert credential(hub, cert, key) == (200, {"status": "suspended", "device": "cred-1"})
    hub.cli_ok("device", "resume", "cred-1")
    assert credential(hub, cert, key) == (200, {"status": "active", "device": "cred-1"})
    hub.cli_ok("device", "revoke", "cred-1", "--reason", "keyCompromise")
    assert credential(hub, cert, key) == (200, {"status": "revoked", "device": "cred-1"})
    assert credential_rows(hub, mark) == []


def test_superseded_after_renewal(hub, tmp_path):
    old, cert, key = enroll_device(hub, "cred-2", tmp_path)
    new_key_ = new_key()
    resp = request(hub, "POST", f"{EST_PREFIX}/simplereenroll", b64_body(make_csr(new_key_, "cred-2")),
                   {"Content-Type": "application/pkcs10"}, cert=cert, key=key)
    assert resp.status == 200, resp.text
    certs = parse_pkcs7(resp.body)
    new_cert = write_pem(tmp_path / "cred-2-new.pem", *certs)
    new_keyfile = write_key(tmp_path / "cred-2-new.key", new_key_)
    grace = hub.query("SELECT grace_until FROM certificates WHERE serial = ?", (format(old.serial_number, "x"),))
    assert dt.datetime.fromisoformat(grace[0]["grace_until"]) > dt.datetime.now(dt.timezone.utc)  # still in grace
    assert credential(hub, cert, key) == (200, {"status": "superseded", "device": "cred-2"})
    assert credential(hub, new_cert, new_keyfile) == (200, {"status": "active", "device": "cred-2"})


def test_the_agents_est_client_reads_it(hub, tmp_path):
    """EstClient.credential() over mTLS, with the server EKU check (agent.estclient's DER reader) on the hub's
    real certificate."""
    _, cert, key = enroll_device(hub, "cred-3", tmp_path)
    ctx = client_context(str(hub.root_pem))
    ctx.load_cert_chain(str(cert), str(key))
    assert EstClient(hub.url, str(hub.root_pem), context=ctx).credential() == Credential("active", "cred-3")
    hub.cli_ok("device", "suspend", "cred-3")
    assert EstClient(hub.url, str(hub.root_pem), context=ctx).credential() == Credential("suspended", "cred-3")


def test_unknown_certificate_from_the_device_ca(hub, tmp_path):
    """A certificate the device CA signed but the registry never recorded (e.g. a registry restored from a backup)."""
    ca_cert = x509.load_pem_x509_certificate((hub.dir / "ca" / "device-ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((hub.dir / "ca" / "device-ca.key").read_bytes(), None)
    key = new_key()
    now = dt.datetime.now(dt.timezone.utc)
    hub.add_device("cred-4")
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, FLEET),
                                     x509.NameAttribute(NameOID.COMMON_NAME, "cred-4")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert, keyfile = write_pem(tmp_path / "cred-4.pem", leaf), write_key(tmp_path / "cred-4.key", key)
    assert credential(hub, cert, keyfile) == (200, {"status": "unknown", "device": None})


def test_without_a_client_certificate_401(hub):
    mark = hub.last_audit_id()
    resp = request(hub, "GET", CREDENTIAL_PATH)
    assert (resp.status, resp.code) == (401, "client_cert_required"), resp.text
    assert "www-authenticate" in resp.headers
    assert hub.audit_since(mark) == []


def test_foreign_ca_certificate_fails_the_handshake(hub, tmp_path):
    cert, key = ForeignCA(tmp_path / "foreign").client("cred-5")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        request(hub, "GET", CREDENTIAL_PATH, cert=cert, key=key)


def test_other_methods_405(hub, tmp_path):
    _, cert, key = enroll_device(hub, "cred-6", tmp_path)
    resp = request(hub, "POST", CREDENTIAL_PATH, b"{}", {"Content-Type": "application/json"}, cert=cert, key=key)
    assert (resp.status, resp.code) == (405, "method_not_allowed"), resp.text


def test_rate_limited_per_source_and_not_audited(tmp_path):
    with running_hub(tmp_path, rate_per_source=0.01, rate_burst=4) as h:
        token = h.add_device("cred-rl")
        key = new_key()
        resp = enroll(h, "cred-rl", token, make_csr(key, "cred-rl"), source="127.0.0.3")  # spends 127.0.0.3's token
        assert resp.status == 200, resp.text
        cert = write_pem(tmp_path / "cred-rl.pem", *parse_pkcs7(resp.body))
        keyfile = write_key(tmp_path / "cred-rl.key", key)
        mark = h.last_audit_id()
        answers = [credential(h, cert, keyfile) for _ in range(5)]
        assert answers[:4] == [(200, {"status": "active", "device": "cred-rl"})] * 4
        assert answers[4] == (429, "rate_limited")
        assert credential(h, cert, keyfile, source="127.0.0.2") == (200, {"status": "active", "device": "cred-rl"})
        assert h.audit_since(mark) == []


def test_supersede_grace_from_fleet_toml(tmp_path):
    """The EST service hands fleet.toml's supersede_grace_seconds to the registry's reenroll (grace_until)."""
    with running_hub(tmp_path, supersede_grace_seconds=42) as h:
        old, cert, key = enroll_device(h, "cred-grace", tmp_path)
        resp = request(h, "POST", f"{EST_PREFIX}/simplereenroll", b64_body(make_csr(new_key(), "cred-grace")),
                       {"Content-Type": "application/pkcs10"}, cert=cert, key=key)
        assert resp.status == 200, resp.text
        (r,) = h.query("SELECT grace_until, issued_at FROM certificates WHERE serial = ?",
                       (format(old.serial_number, "x"),))
        new_issued = h.query("SELECT max(issued_at) AS t FROM certificates WHERE device_id = 'cred-grace'")[0]["t"]
        grace = dt.datetime.fromisoformat(r["grace_until"]) - dt.datetime.fromisoformat(new_issued)
        assert abs(grace.total_seconds() - 42) < 1, grace
        assert credential(h, cert, key) == (200, {"status": "superseded", "device": "cred-grace"})
