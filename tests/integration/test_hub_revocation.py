"""Revocation: `tessera-hub device revoke` puts the device's certificate on the CRL the hub serves over HTTPS,
`openssl verify -crl_check` rejects it (and accepts another device's), and the device can never enroll again.

The broker decides from the registry; the CRL is for third parties and is published in the background soon after
the change (hub.serve.live.CrlPublisher), so the tests poll the served CRL for the entry. Each case runs against
a hub of either broker (`target`, brokerkinds.py: this module's Mosquitto hub and the session's RabbitMQ cluster
hub, whose listeners also read their CRLs from the hub)."""

from __future__ import annotations

import time

import pytest
from cryptography import x509

from agent.estclient import EstClient, EstClientError
from tests.integration.brokerkinds import broker_kind, rabbit_cluster_hub, target  # noqa: F401  (fixtures)
from tests.integration.hubfixtures import (  # noqa: F401  (hub is a fixture: the Mosquitto one)
    hub, make_csr, new_key, one_line, openssl, request, write_pem,
)

pytestmark = pytest.mark.integration


def enroll_new(hub, device_id: str, tmp_path) -> tuple[x509.Certificate, object]:
    token = hub.add_device(device_id)
    certs = EstClient(hub.url, cafile=str(hub.root_pem)).simpleenroll(make_csr(new_key(), device_id), device_id,
                                                                        token)
    return certs[0], write_pem(tmp_path / f"{device_id}.pem", certs[0])


def fetch_crl(hub, tmp_path, name: str) -> tuple[x509.CertificateRevocationList, object]:
    """GET /crl/device.crl over HTTPS (DER), converted to PEM with openssl; returns (crl, pem path)."""
    resp = request(hub, "GET", "/crl/device.crl")
    assert resp.status == 200, resp.text
    assert resp.headers["content-type"] == "application/pkix-crl"
    der = tmp_path / f"{name}.der"
    der.write_bytes(resp.body)
    pem = tmp_path / f"{name}.pem"
    proc = openssl("crl", "-inform", "DER", "-in", str(der), "-out", str(pem))
    assert proc.returncode == 0, proc.stderr
    return x509.load_der_x509_crl(resp.body), pem


def wait_crl(hub, tmp_path, name: str, *serials: int, timeout: float = 15.0):
    """Poll the served CRL until it lists every serial in `serials`; returns (crl, pem path)."""
    deadline = time.monotonic() + timeout
    while True:
        crl, pem = fetch_crl(hub, tmp_path, name)
        missing = [s for s in serials if crl.get_revoked_certificate_by_serial_number(s) is None]
        if not missing:
            return crl, pem
        assert time.monotonic() < deadline, f"serials {missing} not on the served CRL within {timeout} s"
        time.sleep(0.2)


def crl_verify(hub, tmp_path, crl_pem, cert) -> tuple[int, str]:
    bundle = tmp_path / "root+device-ca.pem"
    bundle.write_bytes(hub.root_pem.read_bytes() + hub.device_ca_pem.read_bytes())
    proc = openssl("verify", "-crl_check", "-CAfile", str(bundle), "-CRLfile", str(crl_pem), str(cert))
    return proc.returncode, (proc.stdout + proc.stderr).decode()


def test_revoked_certificate_is_on_the_served_crl(target, tmp_path):
    hub = target.hub
    revoked_leaf, revoked_pem = enroll_new(hub, "rev-1", tmp_path)
    other_leaf, other_pem = enroll_new(hub, "rev-ok-1", tmp_path)
    crl_before, crl_before_pem = fetch_crl(hub, tmp_path, "before")
    # control: before the revocation both certificates pass the CRL check
    assert crl_verify(hub, tmp_path, crl_before_pem, revoked_pem)[0] == 0
    assert crl_before.get_revoked_certificate_by_serial_number(revoked_leaf.serial_number) is None

    proc = hub.cli("device", "revoke", "rev-1", "--reason", "keyCompromise")
    assert proc.returncode == 0, proc.stderr
    assert "rev-1: revoked" in proc.stdout and "1 certificate(s) revoked" in one_line(proc.stdout)

    crl, crl_pem = wait_crl(hub, tmp_path, "after", revoked_leaf.serial_number)
    entry = crl.get_revoked_certificate_by_serial_number(revoked_leaf.serial_number)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    assert crl.get_revoked_certificate_by_serial_number(other_leaf.serial_number) is None
    device_ca = x509.load_pem_x509_certificate(hub.device_ca_pem.read_bytes())
    assert crl.issuer == device_ca.subject and crl.is_signature_valid(device_ca.public_key())
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number > crl_before.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number

    rc, out = crl_verify(hub, tmp_path, crl_pem, revoked_pem)
    assert rc != 0 and "certificate revoked" in out, out
    rc, out = crl_verify(hub, tmp_path, crl_pem, other_pem)
    assert rc == 0 and out.strip().endswith(": OK"), out

    shown = hub.show("rev-1")
    assert shown["device"]["status"] == "revoked"
    assert [(c["status"], c["revocation_reason"]) for c in shown["certificates"]] == [("revoked", "keyCompromise")]
    assert hub.show("rev-ok-1")["certificates"][0]["status"] == "active"
    assert hub.device_list()["rev-1"]["status"] == "revoked"


def test_revoked_device_can_never_enroll_again(target, tmp_path):
    hub = target.hub
    enroll_new(hub, "rev-2", tmp_path)
    spare = hub.new_token("rev-2")  # an unused token issued before the revocation
    hub.cli_ok("device", "revoke", "rev-2", "--reason", "cessationOfOperation")
    certs_before = hub.cert_count("rev-2")

    proc = hub.cli("device", "token", "rev-2")
    assert proc.returncode != 0
    assert proc.stdout == ""  # no token printed
    message = one_line(proc.stderr)
    assert message.startswith("error:") and "revoked" in message, proc.stderr

    with pytest.raises(EstClientError) as err:
        EstClient(hub.url, cafile=str(hub.root_pem)).simpleenroll(make_csr(new_key(), "rev-2"), "rev-2", spare)
    assert (err.value.status, err.value.code) == (403, "device_not_active")
    assert hub.cert_count("rev-2") == certs_before

    proc = hub.cli("device", "resume", "rev-2")
    assert proc.returncode != 0
    assert hub.show("rev-2")["device"]["status"] == "revoked"


def test_resuming_a_revoked_device_is_a_clean_error(target, tmp_path):
    hub = target.hub
    hub.add_device("rev-4")
    hub.cli_ok("device", "revoke", "rev-4", "--reason", "keyCompromise")
    proc = hub.cli("device", "resume", "rev-4")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    message = one_line(proc.stderr)
    assert message.startswith("error: ") and "revocation is final" in message, proc.stderr


def test_revoking_a_device_without_certificate(target, tmp_path):
    hub = target.hub
    hub.add_device("rev-3")
    proc = hub.cli("device", "revoke", "rev-3", "--reason", "affiliationChanged")
    assert proc.returncode == 0, proc.stderr
    assert "rev-3: revoked" in proc.stdout
    assert hub.show("rev-3")["device"]["status"] == "revoked"
    assert hub.cli("device", "token", "rev-3").returncode != 0


def test_a_burst_of_revocations_all_reach_the_crl(target, tmp_path):
    hub = target.hub
    leaves = [enroll_new(hub, f"rev-burst-{i}", tmp_path)[0] for i in range(3)]
    keep, _ = enroll_new(hub, "rev-burst-keep", tmp_path)
    for i in range(3):
        hub.cli_ok("device", "revoke", f"rev-burst-{i}", "--reason", "keyCompromise")
    crl, _ = wait_crl(hub, tmp_path, "burst", *(leaf.serial_number for leaf in leaves))
    assert crl.get_revoked_certificate_by_serial_number(keep.serial_number) is None
    device_ca = x509.load_pem_x509_certificate(hub.device_ca_pem.read_bytes())
    assert crl.is_signature_valid(device_ca.public_key())
