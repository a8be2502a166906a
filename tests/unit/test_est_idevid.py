"""Birth certificates without a hub: hub.est.methods.idevid.identify (which CA, validity, serialNumber) and the
allowlist in hub.manufacturer.store (manufacturer CAs, all-or-nothing batches, first use, re-provisioning),
on a fresh registry of each dialect (SQLite file, PostgreSQL database) with file keys and a fixed clock."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from est.errors import Forbidden
from hub.est.methods.idevid import identify, is_birth_refusal
from hub.manufacturer import factory, store
from hub.registry.errors import DeviceExists
from hub.registry.store import Registry
from tests.integration.pgfixtures import any_registry, pg_server, pg_url, registry_target  # noqa: F401

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def make_ca(name: str = "maker"):
    key = _key()
    fields = factory.ca_fields(name, "", key.public_key(), T0 - timedelta(days=1), 3650)
    return _build(fields, key), key


def _build(fields: dict, key) -> x509.Certificate:
    builder = x509.CertificateBuilder(**fields["fields"]).public_key(fields["public_key"]).issuer_name(fields["issuer"])
    for ext, critical in fields["extensions"]:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(key, hashes.SHA256())


def birth(ca: x509.Certificate, ca_key, serial: str = "SN-1", days: int | None = None, key=None) -> x509.Certificate:
    key = key or _key()
    return _build(factory.birth_fields(ca, serial, key.public_key(), T0 - timedelta(days=1), "model-x", days), ca_key)


def der(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def maker():
    return make_ca("maker")


@pytest.fixture
def reg(any_registry: Registry) -> Registry:  # noqa: F811
    return any_registry


def test_identify_names_the_manufacturer_and_the_serial(maker):
    ca, key = maker
    other, _ = make_ca("other")
    cert = birth(ca, key, "SN-42")
    assert cert.not_valid_after_utc == factory.NO_EXPIRY  # 802.1AR: no well-defined expiry
    name, serial, _ = identify(der(cert), [("other", other), ("maker", ca)], T0)
    assert (name, serial) == ("maker", "SN-42")


@pytest.mark.parametrize("case,code", [("unknown_ca", "birth_not_manufacturer"), ("expired", "birth_expired"),
                                       ("no_serial", "birth_no_serial"), ("same_name_other_key", "birth_not_manufacturer")])
def test_identify_refusals_have_precise_codes_and_one_generic_answer(maker, case, code):
    ca, key = maker
    if case == "unknown_ca":
        other, other_key = make_ca("other")
        cert, cas = birth(other, other_key), [("maker", ca)]
    elif case == "expired":
        cert, cas = birth(ca, key, days=1), [("maker", ca)]
    elif case == "same_name_other_key":  # an impostor CA with the manufacturer's very subject
        impostor, impostor_key = make_ca("maker")
        cert, cas = birth(impostor, impostor_key), [("maker", ca)]
    else:
        fields = factory.birth_fields(ca, "SN-1", _key().public_key(), T0 - timedelta(days=1), "", None)
        fields["fields"]["subject_name"] = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "no serial")])
        cert, cas = _build(fields, key), [("maker", ca)]
    with pytest.raises(Forbidden) as info:
        identify(der(cert), cas, T0 + timedelta(days=3))
    assert info.value.code == code and is_birth_refusal(code)


def test_a_fleet_ca_or_a_leaf_is_refused_as_manufacturer_ca(maker):
    ca, key = maker
    with pytest.raises(store.ManufacturerError) as info:
        store.load_ca(_pem(ca), fleet_cas=[ca])
    assert info.value.code == "fleet_ca"
    with pytest.raises(store.ManufacturerError) as info:
        store.load_ca(_pem(birth(ca, key)))
    assert info.value.code == "bad_ca"
    with pytest.raises(store.ManufacturerError):
        store.load_ca("not a certificate")


def _pem(cert: x509.Certificate) -> str:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _issuer(ca, key, cert_key):
    def issue(device_id: str) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
        return (x509.CertificateBuilder().subject_name(name).issuer_name(ca.subject).public_key(cert_key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(T0)
                .not_valid_after(T0 + timedelta(days=30)).sign(key, hashes.SHA256()))
    return issue


def _tables(reg: Registry) -> dict:
    return {"devices": reg.query("SELECT * FROM devices ORDER BY id"),
            "certificates": reg.query("SELECT * FROM certificates ORDER BY serial"),
            "births": reg.query("SELECT * FROM births ORDER BY serial"),
            "manufacturers": reg.query("SELECT * FROM manufacturers ORDER BY name")}


def test_batches_are_all_or_nothing(reg, maker):
    ca, _ = maker
    store.add_manufacturer(reg, "maker", ca, T0, "test")
    with pytest.raises(store.ManufacturerError):
        store.add_manufacturer(reg, "maker-2", ca, T0, "test")  # the same CA twice
    store.import_batch(reg, "maker", "b1", [{"serial": "SN-1", "device_id": "dev-1"}], "acme", T0, "test")
    before = _tables(reg)
    for rows, err in (([{"serial": "SN-2"}, {"serial": "SN-2"}], store.ManufacturerError),   # twice in the batch
                      ([{"serial": "SN-3"}, {"serial": "SN-1"}], store.ManufacturerError),   # allowlisted already
                      ([{"serial": "SN-4", "device_id": "dev-1"}], DeviceExists),           # device id taken
                      ([{"serial": "SN-5", "cert_sha256": "xyz"}], store.ManufacturerError),
                      ([{"serial": "bad serial"}], store.ManufacturerError)):
        with pytest.raises(err):
            store.import_batch(reg, "maker", "b2", rows, "acme", T0, "test")
    with pytest.raises(store.ManufacturerError) as info:
        store.import_batch(reg, "nobody", "b2", [{"serial": "SN-6"}], "acme", T0, "test")
    assert info.value.code == "unknown"
    assert _tables(reg) == before
    assert reg.get_device("dev-1")["status"] == "pending"


def test_a_birth_certificate_enrolls_once_unless_reprovisioning_is_allowed(reg, maker):
    ca, key = maker
    store.add_manufacturer(reg, "maker", ca, T0, "test")
    cert = birth(ca, key, "SN-7")
    digest = store.fingerprint(cert)
    store.import_batch(reg, "maker", "b1", [{"serial": "SN-7", "cert_sha256": digest}], "acme", T0, "test")
    issue = _issuer(ca, key, _key())
    device_id, _ = store.enroll(reg, "maker", "SN-7", digest, T0, issue, source="10.0.0.7")
    assert device_id == "sn-7" and reg.get_device("sn-7")["status"] == "active"
    before = _tables(reg)
    with pytest.raises(store.BirthRejected) as info:
        store.enroll(reg, "maker", "SN-7", digest, T0, issue)
    assert (info.value.code, info.value.device_id) == ("birth_used", "sn-7")
    with pytest.raises(store.BirthRejected) as info:
        store.lookup(reg, "maker", "SN-7", "0" * 64)
    assert info.value.code == "birth_cert_mismatch"
    with pytest.raises(store.BirthRejected) as info:
        store.lookup(reg, "maker", "SN-8", digest)
    assert info.value.code == "birth_not_allowlisted"
    assert _tables(reg) == before

    assert store.allow_reprovision(reg, "sn-7", T0, "operator")["reprovision"] is True
    store.enroll(reg, "maker", "SN-7", digest, T0 + timedelta(hours=1), issue)
    assert sorted(c["status"] for c in reg.certificates_of("sn-7")) == ["active", "superseded"]
    with pytest.raises(store.BirthRejected):  # the permission was used up
        store.enroll(reg, "maker", "SN-7", digest, T0 + timedelta(hours=2), issue)

    reg.set_status("sn-7", "suspended", T0, "operator")
    store.allow_reprovision(reg, "sn-7", T0, "operator")
    with pytest.raises(store.BirthRejected) as info:
        store.lookup(reg, "maker", "SN-7", digest)
    assert info.value.code == "device_suspended"
    rows = reg.audit_log(limit=50)
    actions = [r["action"] for r in rows]
    assert "manufacturer.add" in actions and "manufacturer.import" in actions
    assert actions.count("manufacturer.allow_reprovision") == 2
    enrolls = [r for r in reversed(rows) if r["action"] == "enroll"]  # refusals audited as token enrollment's
    assert [(r["outcome"], r["detail"].partition(":")[0] if r["outcome"] == "denied" else "") for r in enrolls] == [
        ("ok", ""), ("denied", "birth_used"), ("ok", ""), ("denied", "birth_used")]
    assert all(r["device_id"] == "sn-7" for r in enrolls)


def test_two_enrollments_racing_with_one_birth_certificate_record_one(reg, maker):
    ca, key = maker
    store.add_manufacturer(reg, "maker", ca, T0, "test")
    cert = birth(ca, key, "SN-9")
    digest = store.fingerprint(cert)
    store.import_batch(reg, "maker", "b1", [{"serial": "SN-9"}], "acme", T0, "test")
    issue = _issuer(ca, key, _key())
    inner: list = []

    def racing_issue(device_id: str) -> x509.Certificate:
        if not inner:  # another request with the same birth certificate completes while this one signs
            inner.append(store.enroll(reg, "maker", "SN-9", digest, T0, issue))
        return issue(device_id)

    with pytest.raises(store.BirthRejected) as info:
        store.enroll(reg, "maker", "SN-9", digest, T0, racing_issue)
    assert info.value.code == "birth_used"
    assert [c["serial"] for c in reg.certificates_of("sn-9")] == [format(inner[0][1].serial_number, "x")]


def test_a_batch_may_be_allowed_to_reprovision_at_once(reg, maker):
    ca, key = maker
    store.add_manufacturer(reg, "maker", ca, T0, "test")
    store.import_batch(reg, "maker", "b1", [{"serial": "SN-A"}, {"serial": "SN-B"}], "acme", T0, "test")
    certs = {s: birth(ca, key, s) for s in ("SN-A", "SN-B")}
    store.enroll(reg, "maker", "SN-A", store.fingerprint(certs["SN-A"]), T0, _issuer(ca, key, _key()))
    with pytest.raises(store.ManufacturerError):
        store.allow_reprovision_batch(reg, "maker", "b2", T0, "operator")
    assert store.allow_reprovision_batch(reg, "maker", "b1", T0, "operator")["allowed"] == 1  # SN-B never enrolled
    store.enroll(reg, "maker", "SN-A", store.fingerprint(certs["SN-A"]), T0, _issuer(ca, key, _key()))
    assert len(reg.certificates_of("sn-a")) == 2


def test_an_issue_failure_during_birth_enrollment_is_audited_error_and_changes_nothing(reg, maker):
    ca, key = maker
    store.add_manufacturer(reg, "maker", ca, T0, "test")
    digest = store.fingerprint(birth(ca, key, "SN-E"))
    store.import_batch(reg, "maker", "b1", [{"serial": "SN-E", "cert_sha256": digest}], "acme", T0, "test")
    before, last = _tables(reg), reg.audit_log(limit=1)[0]["id"]

    def broken(device_id: str) -> x509.Certificate:
        raise RuntimeError("CKR_DEVICE_ERROR: signer offline")

    with pytest.raises(RuntimeError, match="signer offline"):
        store.enroll(reg, "maker", "SN-E", digest, T0, broken, source="10.0.0.9")
    assert _tables(reg) == before  # the birth certificate unspent, the device pending, no certificate
    rows = [r for r in reg.audit_log(limit=10) if r["id"] > last]
    assert [(r["action"], r["outcome"], r["device_id"], r["actor"], r["source"]) for r in rows] == [
        ("enroll", "error", "sn-e", "est", "10.0.0.9")]
    assert rows[0]["detail"] == "RuntimeError: CKR_DEVICE_ERROR: signer offline"
    store.enroll(reg, "maker", "SN-E", digest, T0, _issuer(ca, key, _key()))  # still usable once
    assert reg.get_device("sn-e")["status"] == "active" and len(reg.certificates_of("sn-e")) == 1
    assert reg.verify_audit().ok


def test_removing_a_manufacturer_refuses_its_births_at_once_and_keeps_enrolled_devices(reg, maker):
    from hub.est.methods.idevid import ManufacturerTrust

    ca, key = maker
    other, _ = make_ca("other")
    store.add_manufacturer(reg, "maker", ca, T0, "test")
    store.add_manufacturer(reg, "other", other, T0, "test")
    store.import_batch(reg, "maker", "b1", [{"serial": s} for s in ("SN-R1", "SN-R2", "SN-R3")], "acme", T0, "test")
    digests = {s: store.fingerprint(birth(ca, key, s)) for s in ("SN-R1", "SN-R2", "SN-R3")}
    issue = _issuer(ca, key, _key())
    store.enroll(reg, "maker", "SN-R1", digests["SN-R1"], T0, issue)
    enrolled = reg.certificates_of("sn-r1")
    trust = ManufacturerTrust(reg, lambda: 0.0)
    assert [n for n, _ in trust.cas()] == ["maker", "other"]
    assert [(m["name"], m["births"], m["used"]) for m in store.list_manufacturers(reg)] == [("maker", 3, 1),
                                                                                            ("other", 0, 0)]

    removed: list = []

    def issue_while_removed(device_id: str) -> x509.Certificate:  # the removal commits while this one signs
        removed.append(store.remove_manufacturer(reg, "maker", T0, "admin", source="10.0.0.1"))
        return issue(device_id)

    checked = store.lookup(reg, "maker", "SN-R2", digests["SN-R2"])
    with pytest.raises(store.BirthRejected) as info:
        store.enroll(reg, "maker", "SN-R2", digests["SN-R2"], T0, issue_while_removed, checked=checked)
    assert info.value.code == "birth_not_allowlisted"
    assert removed == [{"name": "maker", "subject": ca.subject.rfc4514_string(), "ca_sha256": store.fingerprint(ca),
                        "births": 3, "used": 1, "pending": 2}]
    assert [n for n, _ in trust.cas()] == ["other"]  # the EST workers' cache sees it on the next request
    assert [n for n, _ in store.trusted(reg)] == ["other"]
    for serial in ("SN-R1", "SN-R3"):
        with pytest.raises(store.BirthRejected) as info:
            store.lookup(reg, "maker", serial, digests[serial])
        assert info.value.code == "birth_not_allowlisted"
    assert reg.certificates_of("sn-r1") == enrolled and reg.get_device("sn-r1")["status"] == "active"
    assert reg.certificates_of("sn-r2") == [] and reg.get_device("sn-r2")["status"] == "pending"
    assert reg.query("SELECT COUNT(*) AS n FROM births")[0]["n"] == 0
    row = next(r for r in reg.audit_log(limit=10) if r["action"] == "manufacturer.remove")
    assert (row["actor"], row["outcome"], row["source"]) == ("admin", "ok", "10.0.0.1")
    assert row["detail"].startswith("maker: CA ") and "3 birth certificates dropped (1 enrolled, 2 devices" in row["detail"]

    before = _tables(reg)
    for name, code in (("maker", "unknown"), ("Bad Name", "bad_name")):
        with pytest.raises(store.ManufacturerError) as info:
            store.remove_manufacturer(reg, name, T0, "admin")
        assert info.value.code == code
    assert _tables(reg) == before
    store.add_manufacturer(reg, "maker", ca, T0 + timedelta(days=1), "test")  # the same CA may be trusted again
    assert [n for n, _ in trust.cas()] == ["maker", "other"]
    assert reg.verify_audit().ok


def test_birth_and_token_enrollments_queued_meanwhile_share_one_group_commit(tmp_path, maker, monkeypatch):
    """SQLite: birth enrollment is on the registry's issuing path, so it joins the group commit of concurrent
    issuings (hub/registry/groupcommit.py) like token enrollment: one transaction, one fsync for all of them."""
    import threading
    import time

    from hub.registry import groupcommit

    ca, key = maker
    reg = Registry(tmp_path / "registry.sqlite3")
    try:
        store.add_manufacturer(reg, "maker", ca, T0, "test")
        serials = ("SN-G1", "SN-G2", "SN-G3")
        store.import_batch(reg, "maker", "b1", [{"serial": s} for s in serials], "acme", T0, "test")
        reg.add_device("tok-1", "acme", T0)
        token = reg.create_token("tok-1", T0, timedelta(hours=1))
        batches: list[int] = []
        commit = groupcommit._commit
        monkeypatch.setattr(groupcommit, "_commit", lambda r, batch: (batches.append(len(batch)), commit(r, batch)))
        issue = _issuer(ca, key, _key())
        jobs = [lambda s=s: store.enroll(reg, "maker", s, store.fingerprint(birth(ca, key, s)), T0, issue)
                for s in serials] + [lambda: reg.enroll("tok-1", token, T0, lambda: issue("tok-1"))]
        with reg._write_lock:  # another writer holds the lock: the four queue up meanwhile
            threads = [threading.Thread(target=job) for job in jobs]
            for t in threads:
                t.start()
            queue = groupcommit._queue(reg)
            deadline = time.monotonic() + 10
            while len(queue.items) < len(jobs) and time.monotonic() < deadline:
                time.sleep(0.005)
            assert len(queue.items) == len(jobs)
        for t in threads:
            t.join(timeout=10)
        assert batches == [4]
        assert {d: reg.get_device(d)["status"] for d in ("sn-g1", "sn-g2", "sn-g3", "tok-1")} == dict.fromkeys(
            ("sn-g1", "sn-g2", "sn-g3", "tok-1"), "active")
        assert reg.verify_audit().ok
    finally:
        reg.close()


def test_postgresql_two_hubs_spending_one_birth_certificate_at_once_record_one(pg_url, tmp_path, maker):  # noqa: F811
    """PostgreSQL runs enrollment transactions at once (the write lock shared): two bodies that both passed the
    allowlist check queue on the births row, and the guarded UPDATE lets one spend it; the other is refused."""
    import threading
    import time

    ca, key = maker
    reg = Registry(pg_url, home=tmp_path)
    try:
        store.add_manufacturer(reg, "maker", ca, T0, "test")
        store.import_batch(reg, "maker", "b1", [{"serial": "SN-P"}], "acme", T0, "test")
        digest = store.fingerprint(birth(ca, key, "SN-P"))
        issue = _issuer(ca, key, _key())
        outcome: dict[int, object] = {}

        def enroll(n: int) -> None:
            try:
                outcome[n] = store.enroll(reg, "maker", "SN-P", digest, T0, issue)[1]
            except store.BirthRejected as exc:
                outcome[n] = exc.code

        db = reg._db()  # holds the births row while both enrollments check it and then queue on it
        db.execute("BEGIN")
        list(db.query("SELECT 1 FROM births WHERE serial = 'SN-P' FOR UPDATE"))
        threads = [threading.Thread(target=enroll, args=(n,)) for n in (1, 2)]
        for t in threads:
            t.start()
        with reg._engine.connect() as watch:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and watch.exec_driver_sql(
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND left(query, 13) = 'UPDATE births'").scalar() < 2:
                time.sleep(0.01)
        db.execute("COMMIT")
        for t in threads:
            t.join(timeout=20)
        assert len(outcome) == 2 and [v for v in outcome.values() if isinstance(v, str)] == ["birth_used"], outcome
        won = next(c for c in outcome.values() if isinstance(c, x509.Certificate))
        assert [c["serial"] for c in reg.certificates_of("sn-p")] == [format(won.serial_number, "x")]
        enrolls = [(r["outcome"], r["detail"].partition(":")[0]) for r in reg.audit_log(limit=10)
                   if r["action"] == "enroll"]
        assert sorted(o for o, _ in enrolls) == ["denied", "ok"] and ("denied", "birth_used") in enrolls
        assert reg.verify_audit().ok
    finally:
        reg.close()
