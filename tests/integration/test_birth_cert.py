"""Birth-certificate enrollment (IEEE 802.1AR IDevID over EST mTLS, RFC 7030 3.3.2), end to end and refused.

Real parts: a `tessera-hub serve`; the manufacturer CA's key in its own SoftHSM2 token; a device token that holds
only its key and the birth certificate the factory tool (`python -m hub.manufacturer.factory`, the one
provisioning/factory/tessera-factory runs) wrote into it; `tessera-agent enroll --birth-cert` and `run`.
The refusals use file-key birth certificates signed by that same token CA (one spawned signature each) or by a CA
the hub does not trust, and check the generic answer, the precise audit reason and that nothing else changed.
"""

from __future__ import annotations

import csv
import json
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from hsm.softhsm import create_token
from hsm.worker import run_isolated
from hub.manufacturer import factory
from tests.helpers import PYTHON, ROOT, child_env
from tests.integration.agentfixtures import TOKEN_LABEL, Device, wait_until
from tests.integration.hubfixtures import (EST_PREFIX, LENIENT_LIMITS, ForeignCA, Hub, b64_body, make_csr, new_key,
                                           parse_pkcs7, request, running_hub, write_key, write_pem)

MAKER = "acme-devices"


def factory_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "hub.manufacturer.factory", *args], capture_output=True, text=True,
                          timeout=120, env=child_env(), cwd=ROOT)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with running_hub(tmp_path_factory.mktemp("hub"), **LENIENT_LIMITS) as h:
        yield h


@pytest.fixture(scope="module")
def maker(tmp_path_factory, hub: Hub):
    """The manufacturer CA (key in its own token, made by `factory init-ca`), trusted by the hub."""
    base = tmp_path_factory.mktemp("maker")
    token = create_token(base / "softhsm", label="maker-ca")
    ca_pem = base / "ca.pem"
    proc = factory_cli("init-ca", "--name", MAKER, "--out", str(ca_pem), "--token-label", token.label,
                       "--pin-source", f"file:{token.pin_file}", "--softhsm-conf", str(token.conf))
    assert proc.returncode == 0, proc.stderr
    out = hub.cli_ok("manufacturer", "add", MAKER, "--ca", str(ca_pem))
    assert MAKER in out
    try:
        yield factory.Signer(token.config, factory.CA_KEY_LABEL, ca_pem.read_bytes()), token, ca_pem
    finally:
        token.destroy()


def soft_birth(signer: factory.Signer, serial: str, directory: Path, key=None) -> tuple[Path, Path, x509.Certificate]:
    """A birth certificate for a file key, signed by the manufacturer's token CA (one spawned child)."""
    key = key or new_key()
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    der = run_isolated(factory._sign, signer, "birth", {"serial": serial, "public_key_pem": pem, "model": "",
                                                        "now": datetime.now(timezone.utc).isoformat(), "days": None})
    cert = x509.load_der_x509_certificate(der)
    return write_pem(directory / f"{serial}.pem", cert), write_key(directory / f"{serial}.key", key), cert


def import_rows(hub: Hub, directory: Path, name: str, rows: list[tuple[str, str, str]]) -> str:
    path = directory / f"{name}.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(factory.BATCH_FIELDS)
        w.writerows(rows)
    return hub.cli_ok("manufacturer", "import-batch", MAKER, str(path))


def post_enroll(hub: Hub, cert: Path, key: Path, csr_der: bytes, path: str = "simpleenroll",
                source: str | None = None):
    return request(hub, "POST", f"{EST_PREFIX}/{path}", b64_body(csr_der), {"Content-Type": "application/pkcs10"},
                   cert=cert, key=key, source=source)


def test_device_with_only_its_birth_certificate_enrolls_runs_and_enrolls_once(hub, maker, tmp_path):
    signer, ca_token, ca_pem = maker
    base = tmp_path / "idev-0001"
    base.mkdir()
    token = create_token(base / "softhsm", label=TOKEN_LABEL)
    batch = tmp_path / "line-7.csv"
    proc = factory_cli("birth", "--serial", "SN-0001", "--batch", str(batch), "--device-id", "idev-0001",
                       "--ca", str(ca_pem), "--ca-token-label", ca_token.label,
                       "--ca-pin-source", f"file:{ca_token.pin_file}", "--ca-softhsm-conf", str(ca_token.conf),
                       "--token-label", token.label, "--pin-source", f"file:{token.pin_file}",
                       "--softhsm-conf", str(token.conf), "--model", "sensor-x")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(batch.read_text().splitlines()))
    assert [(r["serial"], r["device_id"]) for r in rows] == [("SN-0001", "idev-0001")]
    assert "imported 1 birth certificates" in hub.cli_ok("manufacturer", "import-batch", MAKER, str(batch))
    assert hub.show("idev-0001")["device"]["status"] == "pending"

    dev = Device("idev-0001", base, hub, token)
    dev.write_config(device_id="")  # the hub names the device
    audit_from = hub.last_audit_id()
    try:
        proc = dev.cli("enroll", "--birth-cert", "--ca-file", str(hub.root_pem))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "enrolled idev-0001 with its birth certificate" in proc.stdout
        ident = dev.identity()
        assert ident["device_id"] == "idev-0001"
        leaf = x509.load_pem_x509_certificate((dev.state / "cert.pem").read_bytes())
        assert leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "idev-0001"
        birth = x509.load_pem_x509_certificate((dev.state / "birth-cert.pem").read_bytes())
        assert leaf.public_key() == birth.public_key()  # the hub required the birth certificate's key
        enrolled = [r for r in hub.audit_since(audit_from) if r["action"] == "enroll"]
        assert [r["outcome"] for r in enrolled] == ["ok"]
        assert f"birth certificate {MAKER} serial SN-0001" in enrolled[0]["detail"]

        dev.start()
        dev.wait_state("online", timeout=30)
        wait_until(lambda: hub.show("idev-0001")["device"]["online"], 10, "the hub to see idev-0001 online")
        dev.stop()
        # a key rotation renews onto a fresh key and keeps the birth key (the re-provisioning below needs it)
        proc = dev.cli("renew", "--rotate-key")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert dev.identity()["key_label"] != "device-key"
        assert dev.key_show("device-key").returncode == 0

        # a second enrollment with the same birth certificate (a fresh state, as after a factory reset): refused
        before, audit_from = hub.state(), hub.last_audit_id()
        dev.write_config(device_id="", state_dir=str(base / "state-2"))
        proc = dev.cli("enroll", "--birth-cert", "--ca-file", str(hub.root_pem))
        assert proc.returncode == 1
        assert "403" in proc.stderr and "birth_rejected" in proc.stderr, proc.stderr
        assert hub.state() == before
        rows = hub.wait_audit(audit_from, lambda r: r["outcome"] == "denied")
        assert any(r["detail"].startswith("birth_used:") and r["device_id"] == "idev-0001" for r in rows), rows

        # the operator allows one re-provisioning: it enrolls, the old certificate is superseded, and only once
        hub.cli_ok("manufacturer", "allow-reprovision", "idev-0001")
        proc = dev.cli("enroll", "--birth-cert", "--ca-file", str(hub.root_pem))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        statuses = sorted(c["status"] for c in hub.show("idev-0001")["certificates"])
        assert statuses == ["active", "superseded", "superseded"]  # enrolled, renewed, re-provisioned
        dev.write_config(device_id="", state_dir=str(base / "state-3"))
        assert dev.cli("enroll", "--birth-cert", "--ca-file", str(hub.root_pem)).returncode == 1
        assert hub.cert_count("idev-0001") == 3
    finally:
        dev.destroy()


def _refused(hub: Hub, answer, code: str, before: dict, audit_from: int, action: str = "enroll") -> None:
    assert answer.status == 403, (answer.status, answer.text)
    rows = hub.wait_audit(audit_from, lambda r: r["detail"].startswith(f"{code}:"))
    assert any(r["action"] == action and r["outcome"] == "denied" for r in rows if r["detail"].startswith(code))
    assert hub.state() == before


def test_birth_certificate_not_on_the_allowlist_is_refused_audited_and_changes_nothing(hub, maker, tmp_path):
    signer = maker[0]
    cert, key, _ = soft_birth(signer, "SN-UNLISTED", tmp_path)
    before, audit_from = hub.state(), hub.last_audit_id()
    answer = post_enroll(hub, cert, key, make_csr(new_key(), None))
    assert answer.code == "birth_rejected"  # the device learns nothing more
    _refused(hub, answer, "birth_not_allowlisted", before, audit_from)


def test_birth_certificate_of_an_unknown_manufacturer_is_refused_audited_and_changes_nothing(hub, maker, tmp_path):
    other = ForeignCA(tmp_path / "other", subject_cn="Other Devices IDevID CA")
    key = new_key()
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(x509.NameOID.SERIAL_NUMBER,
                                                                                 "SN-0001")]))
            .issuer_name(other.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(factory.NO_EXPIRY).sign(other.key, hashes.SHA256()))
    cert_path, key_path = write_pem(tmp_path / "o.pem", cert), write_key(tmp_path / "o.key", key)
    before, audit_from = hub.state(), hub.last_audit_id()
    with pytest.raises(OSError):  # the listener does not trust that CA: the handshake fails
        post_enroll(hub, cert_path, key_path, make_csr(key, None))
    rows = hub.wait_audit(audit_from, lambda r: r["action"] == "tls")
    assert any(r["outcome"] == "denied" and r["detail"].startswith("bad_client_cert:")
               and "unable to get local issuer certificate" in r["detail"] for r in rows), rows
    assert hub.state() == before


def test_birth_key_fleet_certificate_and_paths_do_not_mix(hub, maker, tmp_path):
    signer = maker[0]
    key = new_key()
    cert, key_path, birth = soft_birth(signer, "SN-SOFT-1", tmp_path, key)
    digest = birth.fingerprint(hashes.SHA256()).hex()
    import_rows(hub, tmp_path, "soft", [("SN-SOFT-1", "idev-soft-1", digest), ("SN-PINNED", "idev-pinned", "0" * 64)])

    # the CSR must carry the birth certificate's key
    before, audit_from = hub.state(), hub.last_audit_id()
    _refused(hub, post_enroll(hub, cert, key_path, make_csr(new_key(), None)), "birth_key_mismatch", before,
             audit_from)
    # a birth certificate never renews (simplereenroll takes device CA certificates only)
    before, audit_from = hub.state(), hub.last_audit_id()
    _refused(hub, post_enroll(hub, cert, key_path, make_csr(key, "idev-soft-1"), "simplereenroll"),
             "not_device_cert", before, audit_from, action="reenroll")
    # nor reaches the broker (it trusts the device CA only): the TLS handshake fails
    from tests.integration.brokerfixtures import probe_cert

    probe = probe_cert(hub, cert, key_path, "1.2", client_id="idev-soft-1")
    assert not probe.got_connack and probe.stage == "tls", probe
    # the batch pinned another certificate for that serial
    other, other_key, _ = soft_birth(signer, "SN-PINNED", tmp_path)
    before, audit_from = hub.state(), hub.last_audit_id()
    _refused(hub, post_enroll(hub, other, other_key, make_csr(new_key(), None)), "birth_cert_mismatch", before,
             audit_from)

    # enrolled with its birth certificate: the operational (fleet) certificate is no birth certificate
    answer = post_enroll(hub, cert, key_path, make_csr(key, None))
    assert answer.status == 200, answer.text
    leaf = parse_pkcs7(answer.body)[0]  # end-entity first (the wire's SET OF is sorted by encoding)
    fleet_cert, fleet_key = write_pem(tmp_path / "fleet.pem", leaf), write_key(tmp_path / "fleet.key", key)
    before, audit_from = hub.state(), hub.last_audit_id()
    _refused(hub, post_enroll(hub, fleet_cert, fleet_key, make_csr(key, None)), "birth_not_manufacturer", before,
             audit_from)
    listed = json.loads(hub.cli_ok("manufacturer", "list", "--json"))
    assert [(m["name"], m["births"] >= 3, m["used"] >= 2) for m in listed] == [(MAKER, True, True)]


def test_manufacturer_commands_refuse_bad_input_in_one_line_and_change_nothing(hub, maker, tmp_path):
    _, _, ca_pem = maker
    before, audit_from = hub.state(), hub.last_audit_id()
    listed = hub.cli_ok("manufacturer", "list", "--json")
    for args, says in ((("add", "fleet-own", "--ca", str(hub.device_ca_pem)), "one of this fleet's own CAs"),
                       (("add", "again", "--ca", str(ca_pem)), "exists already"),
                       (("add", "Bad Name", "--ca", str(ca_pem)), "invalid manufacturer name"),
                       (("add", "nofile", "--ca", str(tmp_path / "missing.pem")), "cannot read the CA file"),
                       (("import-batch", "nobody", str(ca_pem)), "the first line must be the header")):
        proc = hub.cli("manufacturer", *args)
        assert proc.returncode == 1 and says in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    batch = tmp_path / "b.csv"
    batch.write_text("serial,device_id,cert_sha256\nSN-X1,idev-x1,\nSN-X1,idev-x2,\n")
    proc = hub.cli("manufacturer", "import-batch", MAKER, str(batch))
    assert proc.returncode == 1 and "appears twice" in proc.stderr, proc.stderr
    proc = hub.cli("manufacturer", "import-batch", "nobody", str(batch))
    assert proc.returncode == 1 and "no manufacturer 'nobody'" in proc.stderr, proc.stderr
    proc = hub.cli("manufacturer", "allow-reprovision", "no-such-device")
    assert proc.returncode == 1 and "no birth certificate" in proc.stderr, proc.stderr
    proc = hub.cli("manufacturer", "allow-reprovision", "--batch", "no-such-batch", "--manufacturer", MAKER)
    assert proc.returncode == 1 and "has no batch 'no-such-batch'" in proc.stderr, proc.stderr
    assert hub.state() == before and hub.cli_ok("manufacturer", "list", "--json") == listed
    assert [r for r in hub.audit_since(audit_from) if r["outcome"] == "ok"] == []


def test_factory_birth_refused_midway_leaves_the_device_token_as_it_was(maker, tmp_path):
    _, ca_token, ca_pem = maker
    wrong = write_pem(tmp_path / "wrong-ca.pem", ForeignCA(tmp_path / "wrong").cert)
    token = create_token(tmp_path / "softhsm", label=TOKEN_LABEL)
    batch = tmp_path / "batch.csv"

    def birth_with(ca: Path) -> subprocess.CompletedProcess:
        return factory_cli("birth", "--serial", "SN-F1", "--batch", str(batch), "--ca", str(ca),
                           "--ca-token-label", ca_token.label, "--ca-pin-source", f"file:{ca_token.pin_file}",
                           "--ca-softhsm-conf", str(ca_token.conf), "--token-label", token.label,
                           "--pin-source", f"file:{token.pin_file}", "--softhsm-conf", str(token.conf))
    try:
        proc = birth_with(wrong)  # not the certificate of the key in the CA token: found after signing
        assert proc.returncode == 1 and "is not the one whose key is in the CA token" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert batch.read_text() == ""
        proc = birth_with(ca_pem)  # the key made by the refused run is gone: a re-run starts clean
        assert proc.returncode == 0, proc.stderr
        assert [r["serial"] for r in csv.DictReader(batch.read_text().splitlines())] == ["SN-F1"]
    finally:
        token.destroy()


def _file_signed(fields: dict, key) -> x509.Certificate:
    builder = x509.CertificateBuilder(**fields["fields"]).public_key(fields["public_key"]).issuer_name(fields["issuer"])
    for ext, critical in fields["extensions"]:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(key, hashes.SHA256())


def test_a_removed_manufacturer_births_are_refused_at_once_and_its_devices_keep_their_certificates(hub, tmp_path):
    """`manufacturer remove`: a second manufacturer (a file-key CA, no token) whose CA the listener already trusts
    at the TLS layer; after the removal its next birth certificate completes the handshake and is refused."""
    now = datetime.now(timezone.utc)
    ca_key = new_key()
    ca = _file_signed(factory.ca_fields("gone-devices", "", ca_key.public_key(), now, 30), ca_key)
    ca_pem = write_pem(tmp_path / "gone-ca.pem", ca)
    hub.cli_ok("manufacturer", "add", "gone-devices", "--ca", str(ca_pem))
    births = {}
    for serial in ("SN-G1", "SN-G2"):
        key = new_key()
        cert = _file_signed(factory.birth_fields(ca, serial, key.public_key(), now), ca_key)
        births[serial] = (write_pem(tmp_path / f"{serial}.pem", cert), write_key(tmp_path / f"{serial}.key", key), key)
    batch = tmp_path / "gone.csv"
    batch.write_text("serial,device_id,cert_sha256\nSN-G1,idev-g1,\nSN-G2,idev-g2,\n")
    hub.cli_ok("manufacturer", "import-batch", "gone-devices", str(batch))

    def enroll(serial: str, source: str | None = None):
        cert, key_path, key = births[serial]
        try:
            return post_enroll(hub, cert, key_path, make_csr(key, None), source=source)
        except OSError:  # the EST workers learn a new CA within about a second (ManufacturerTrust.refresh)
            return None
    assert wait_until(lambda: enroll("SN-G1"), 15, "the listener to trust gone-devices").status == 200
    kept = [c for c in hub.show("idev-g1")["certificates"] if c["status"] == "active"]
    assert len(kept) == 1

    audit_from = hub.last_audit_id()
    out = hub.cli_ok("manufacturer", "remove", "gone-devices")
    assert "manufacturer gone-devices removed: 2 birth certificates dropped (1 enrolled" in out, out
    assert "1 devices left pending" in out, out
    rows = [r for r in hub.audit_since(audit_from) if r["action"] == "manufacturer.remove"]
    assert [(r["outcome"], r["device_id"]) for r in rows] == [("ok", None)], rows
    assert rows[0]["detail"].startswith(f"gone-devices: CA {ca.subject.rfc4514_string()} sha256 ")
    assert all(m["name"] != "gone-devices" for m in json.loads(hub.cli_ok("manufacturer", "list", "--json")))

    before, audit_from = hub.state(), hub.last_audit_id()
    # the TLS store still has the CA: the registry's word refuses it (from a source of its own: the earlier
    # birth_not_manufacturer refusal from 127.0.0.1 would aggregate this one's audit row, hub/est/denials.py)
    answer = enroll("SN-G2", source="127.0.0.77")
    assert answer is not None and answer.code == "birth_rejected"
    _refused(hub, answer, "birth_not_manufacturer", before, audit_from)
    assert [c for c in hub.show("idev-g1")["certificates"] if c["status"] == "active"] == kept
    assert hub.show("idev-g1")["device"]["status"] == "active"
    assert hub.show("idev-g2")["device"]["status"] == "pending"
    proc = hub.cli("manufacturer", "remove", "gone-devices")
    assert proc.returncode == 1 and "no manufacturer 'gone-devices'" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
