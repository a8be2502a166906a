"""Fleet CA hierarchy with file keys and the device CRL, checked with `openssl verify` (hub.ca.authority, hub.ca.crl)."""

from __future__ import annotations

import ipaddress
import os
import shutil
import stat
import subprocess
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import hub.ca.crl
from hub.ca.authority import CaError, FleetCA, create_hierarchy, load_ca, load_key_file, new_file_key
from hub.ca.crl import (CrlError, crl_needs_refresh, current_crl, next_crl_number, reason_flag, validate_crl,
                     write_crl_atomically)
from hub.ca.policy import Policy, PolicyError

FLEET = "acme"
CRL_URL = "http://hub.acme.test:8080/crl/device.crl"
NOW = datetime.now(timezone.utc).replace(microsecond=0)
P256 = ec.generate_private_key(ec.SECP256R1())  # one device key is enough for most tests


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write(path: Path, *certs: x509.Certificate) -> Path:
    path.write_bytes(b"".join(pem(c) for c in certs))
    return path


def openssl_verify(*args: str | Path, at: datetime = NOW, strict: bool = True) -> subprocess.CompletedProcess:
    """`openssl verify` at time `at`, by default with -x509_strict (what Python 3.13's ssl defaults to)."""
    flags = ["-x509_strict"] if strict else []
    return subprocess.run(["openssl", "verify", *flags, "-attime", str(int(at.timestamp())), *map(str, args)],
                          capture_output=True, text=True, timeout=30)


def ext(cert, cls):
    return cert.extensions.get_extension_for_class(cls)


@pytest.fixture
def ca(tmp_path) -> FleetCA:
    return create_hierarchy(tmp_path / "ca", FLEET, NOW)


@pytest.fixture
def policy() -> Policy:
    return Policy(fleet=FLEET, validity=timedelta(days=30))


def device(ca: FleetCA, policy: Policy, device_id: str = "sensor-01", key=P256, now: datetime = NOW):
    return ca.issue_device_cert(key.public_key(), device_id, policy, now, CRL_URL)


# --- the hierarchy ---------------------------------------------------------------------------------------------

def test_hierarchy_files_modes_and_fields(ca, tmp_path):
    d = tmp_path / "ca"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for name in ("root.key", "device-ca.key", "service-ca.key"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name
        assert (d / name).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert not (d / "keys.json").exists()
    assert (d / "device-chain.pem").read_bytes() == pem(ca.device_ca) + pem(ca.root)
    assert (d / "service-chain.pem").read_bytes() == pem(ca.service_ca) + pem(ca.root)
    assert (d / "root.pem").read_bytes() == pem(ca.root)
    assert ca.trust_bundle_pem() == pem(ca.root) + pem(ca.device_ca) + pem(ca.service_ca)
    assert ca.fleet == FLEET and not ca.token_backed

    root, dev, svc = ca.root, ca.device_ca, ca.service_ca
    assert root.subject.rfc4514_string() == "CN=acme Root CA,O=acme"
    assert dev.subject.rfc4514_string() == "CN=acme Device CA,O=acme"
    assert svc.subject.rfc4514_string() == "CN=acme Service CA,O=acme"
    assert root.issuer == root.subject and dev.issuer == svc.issuer == root.subject
    assert ext(root, x509.BasicConstraints).value.path_length == 1
    for cert in (dev, svc):
        bc = ext(cert, x509.BasicConstraints)
        assert bc.critical and bc.value.ca and bc.value.path_length == 0
    for cert in (root, dev, svc):
        ku = ext(cert, x509.KeyUsage)
        assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert cert.public_key().curve.name == "secp256r1"
        # every CA certificate's AKI is the root's SKI (the root is its own issuer)
        assert (ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier
                == ext(root, x509.SubjectKeyIdentifier).value.digest)
    with pytest.raises(x509.ExtensionNotFound):
        ext(root, x509.ExtendedKeyUsage)
    assert list(ext(dev, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert set(ext(svc, x509.ExtendedKeyUsage).value) == {ExtendedKeyUsageOID.SERVER_AUTH,
                                                          ExtendedKeyUsageOID.CLIENT_AUTH}
    nc = ext(dev, x509.NameConstraints)
    assert nc.critical
    assert nc.value.permitted_subtrees == [x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME,
                                                                                            FLEET)]))]
    assert x509.DNSName("") in nc.value.excluded_subtrees
    assert x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")) in nc.value.excluded_subtrees
    assert x509.IPAddress(ipaddress.ip_network("::/0")) in nc.value.excluded_subtrees
    assert timedelta(days=3650) < root.not_valid_after_utc - NOW < timedelta(days=3660)
    assert timedelta(days=1825) < dev.not_valid_after_utc - NOW < timedelta(days=1830)
    assert root.not_valid_before_utc == NOW - timedelta(minutes=5)


def test_refuses_to_overwrite_an_existing_hierarchy(ca, tmp_path):
    before = {p.name: p.read_bytes() for p in (tmp_path / "ca").iterdir()}
    with pytest.raises(CaError, match="already holds a CA hierarchy"):
        create_hierarchy(tmp_path / "ca", FLEET, NOW)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ca").iterdir()} == before


@pytest.mark.parametrize("key_type,curve_or_size,hash_name",
                         [("ec-p384", "secp384r1", "sha384"), ("rsa-3072", 3072, "sha256")])
def test_other_key_types(tmp_path, policy, key_type, curve_or_size, hash_name):
    ca = create_hierarchy(tmp_path / "ca", FLEET, NOW, key_type=key_type)
    pub = ca.device_ca.public_key()
    assert (pub.curve.name if isinstance(pub, ec.EllipticCurvePublicKey) else pub.key_size) == curve_or_size
    cert = device(ca, policy)
    assert cert.signature_hash_algorithm.name == hash_name
    leaf = write(tmp_path / "dev.pem", cert)
    proc = openssl_verify("-purpose", "sslclient", "-CAfile", tmp_path / "ca/root.pem",
                          "-untrusted", tmp_path / "ca/device-ca.pem", leaf)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_unknown_ca_key_type_and_naive_time_refused(tmp_path):
    with pytest.raises(CaError, match="unsupported CA key type"):
        create_hierarchy(tmp_path / "a", FLEET, NOW, key_type="rsa-1024")
    with pytest.raises(ValueError, match="timezone-aware"):
        create_hierarchy(tmp_path / "b", FLEET, NOW.replace(tzinfo=None))


# --- device certificates -----------------------------------------------------------------------------------------

def test_device_cert_verifies_for_client_auth_only(ca, policy, tmp_path):
    leaf = write(tmp_path / "device.pem", device(ca, policy))
    base = ("-CAfile", tmp_path / "ca/root.pem", "-untrusted", tmp_path / "ca/device-ca.pem")
    for args in ((), ("-purpose", "sslclient")):
        proc = openssl_verify(*base, *args, leaf)
        assert proc.returncode == 0 and "device.pem: OK" in proc.stdout, proc.stdout + proc.stderr
    proc = openssl_verify(*base, "-purpose", "sslserver", leaf)
    assert proc.returncode != 0
    assert "unsuitable certificate purpose" in proc.stdout + proc.stderr
    # the device chain file works as the untrusted intermediates too
    proc = openssl_verify("-CAfile", tmp_path / "ca/root.pem", "-untrusted", tmp_path / "ca/device-chain.pem", leaf)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_device_cert_fields(ca, policy):
    cert = device(ca, policy, "sensor-01")
    assert cert.subject.rfc4514_string() == "CN=sensor-01,O=acme"
    assert cert.issuer == ca.device_ca.subject
    # one SAN: its own credential URI (issuer and serial, for brokers that pass the back end one name)
    assert ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier) == \
        [f"urn:tessera:cred:device:{cert.serial_number:x}"]
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical
    assert ku.value == x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    dp = ext(cert, x509.CRLDistributionPoints).value
    assert [n.value for n in dp[0].full_name] == [CRL_URL]
    assert 0 < cert.serial_number and cert.serial_number.bit_length() <= 159
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=5)
    assert cert.not_valid_after_utc - NOW == policy.validity
    assert (ext(cert, x509.SubjectKeyIdentifier).value
            == x509.SubjectKeyIdentifier.from_public_key(P256.public_key()))
    assert (ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier
            == ext(ca.device_ca, x509.SubjectKeyIdentifier).value.digest)
    cert.verify_directly_issued_by(ca.device_ca)
    other = device(ca, policy, "sensor-01")
    assert other.serial_number != cert.serial_number


def test_device_cert_extra_ou_and_validity_clamped(ca):
    pol = Policy(fleet=FLEET, validity=timedelta(days=20 * 365), extra_ou=("floor-2", "hvac"))
    cert = device(ca, pol)
    assert cert.subject.rfc4514_string() == "CN=sensor-01,OU=hvac,OU=floor-2,O=acme"
    assert cert.not_valid_after_utc == ca.device_ca.not_valid_after_utc


@pytest.mark.parametrize("bad_id", ["Sensor-01", "", "-lead", "a" * 64, "dev_1", "dev.1", "tessera-hub", "admin"])
def test_invalid_device_id_refused(ca, policy, bad_id):
    with pytest.raises(PolicyError):
        device(ca, policy, bad_id)


@pytest.mark.parametrize("key", [rsa.generate_private_key(65537, 1024), ed25519.Ed25519PrivateKey.generate(),
                                 ec.generate_private_key(ec.SECP521R1()), ec.generate_private_key(ec.SECP256K1())],
                         ids=["rsa-1024", "ed25519", "p-521", "secp256k1"])
def test_unacceptable_device_keys_refused(ca, policy, key):
    with pytest.raises(CaError):
        device(ca, policy, key=key)


def test_policy_limits_and_settings_enforced(ca, policy):
    rsa2048 = rsa.generate_private_key(65537, 2048)
    assert isinstance(device(ca, policy, key=rsa2048), x509.Certificate)
    with pytest.raises(CaError, match="too small"):
        device(ca, Policy(fleet=FLEET, rsa_min_bits=3072), key=rsa2048)
    with pytest.raises(CaError, match="not accepted"):
        device(ca, Policy(fleet=FLEET, ec_curves=("secp384r1",)))
    with pytest.raises(CaError, match="fleet"):
        device(ca, Policy(fleet="other"))
    with pytest.raises(CaError, match="http"):
        ca.issue_device_cert(P256.public_key(), "sensor-01", policy, NOW, "file:///etc/passwd")
    with pytest.raises(CaError, match="expired"):
        device(ca, policy, now=ca.device_ca.not_valid_after_utc + timedelta(seconds=1))


def test_concurrent_issuance(ca, policy):
    with ThreadPoolExecutor(8) as pool:
        certs = list(pool.map(lambda i: device(ca, policy, f"dev-{i}"), range(40)))
    assert len({c.serial_number for c in certs}) == 40
    for cert in certs:
        cert.verify_directly_issued_by(ca.device_ca)


# --- the device CA's constraints ---------------------------------------------------------------------------------

def forge(ca: FleetCA, tmp_path: Path, subject: x509.Name, san=None, eku=ExtendedKeyUsageOID.CLIENT_AUTH) -> Path:
    """A certificate signed by hand with the device CA's key, bypassing FleetCA's policy."""
    key = load_key_file(tmp_path / "ca/device-ca.key")
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca.device_ca.subject)
               .public_key(P256.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW - timedelta(hours=1)).not_valid_after(NOW + timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([eku]), critical=False))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return write(tmp_path / "forged.pem", builder.sign(key, hashes.SHA256()))


def _name(*pairs):
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in pairs])


ACME_EVIL = _name((NameOID.ORGANIZATION_NAME, FLEET), (NameOID.COMMON_NAME, "evil"))


@pytest.mark.parametrize("subject,san,error", [
    (ACME_EVIL, [x509.DNSName("hub.acme.test")], "excluded subtree violation"),
    (ACME_EVIL, [x509.DNSName("localhost")], "excluded subtree violation"),
    (ACME_EVIL, [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], "excluded subtree violation"),
    (ACME_EVIL, [x509.IPAddress(ipaddress.ip_address("::1"))], "excluded subtree violation"),
    (_name((NameOID.ORGANIZATION_NAME, "other"), (NameOID.COMMON_NAME, "evil")), None, "permitted subtree violation"),
    (_name((NameOID.COMMON_NAME, "evil")), None, "permitted subtree violation"),
], ids=["dns", "localhost", "ipv4", "ipv6", "other-org", "no-org"])
def test_device_ca_name_constraints(ca, tmp_path, subject, san, error):
    base = ("-CAfile", tmp_path / "ca/root.pem", "-untrusted", tmp_path / "ca/device-ca.pem")
    control = forge(ca, tmp_path, ACME_EVIL)  # the same forgery without the offending name verifies
    proc = openssl_verify(*base, "-purpose", "sslclient", control, strict=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = openssl_verify(*base, forge(ca, tmp_path, subject, san), strict=False)
    assert proc.returncode != 0
    assert error in proc.stdout + proc.stderr


def test_device_ca_cannot_issue_server_certs_even_without_names(ca, tmp_path):
    forged = forge(ca, tmp_path, ACME_EVIL, eku=ExtendedKeyUsageOID.SERVER_AUTH)
    proc = openssl_verify("-CAfile", tmp_path / "ca/root.pem", "-untrusted", tmp_path / "ca/device-ca.pem",
                          "-purpose", "sslserver", forged, strict=False)
    assert proc.returncode != 0 and "unsuitable certificate purpose" in proc.stdout + proc.stderr


# --- service CA: server and admin certificates -------------------------------------------------------------------

@pytest.mark.parametrize("key", [P256, rsa.generate_private_key(65537, 2048)], ids=["ec", "rsa"])
def test_server_cert(ca, tmp_path, key):
    cert = ca.issue_server_cert(key.public_key(), ["hub.acme.test", "localhost"], ["127.0.0.1", "::1"], NOW)
    leaf = write(tmp_path / "server.pem", cert)
    base = ("-CAfile", tmp_path / "ca/root.pem", "-untrusted", tmp_path / "ca/service-ca.pem")
    for extra in (("-verify_hostname", "hub.acme.test"), ("-verify_ip", "127.0.0.1"), ("-verify_ip", "::1")):
        proc = openssl_verify(*base, "-purpose", "sslserver", *extra, leaf)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert openssl_verify(*base, "-purpose", "sslserver", "-verify_hostname", "evil.test", leaf).returncode != 0
    assert openssl_verify(*base, "-purpose", "sslclient", leaf).returncode != 0
    assert cert.issuer == ca.service_ca.subject
    assert cert.subject.rfc4514_string() == "CN=hub.acme.test,O=acme"
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    ku = ext(cert, x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment == isinstance(key, rsa.RSAPrivateKey)
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["hub.acme.test", "localhost"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert cert.not_valid_after_utc - NOW == timedelta(days=90)


def test_server_cert_bad_names_refused(ca):
    for hosts, ips in (([], []), (["bad host"], []), ([], ["300.1.1.1"]), (["-x.test"], [])):
        with pytest.raises(CaError):
            ca.issue_server_cert(P256.public_key(), hosts, ips, NOW)


def test_admin_cert_comes_from_the_service_ca(ca, tmp_path):
    cert = ca.issue_admin_cert(P256.public_key(), NOW)
    assert cert.subject.rfc4514_string() == "CN=tessera-hub,O=acme"
    assert cert.issuer == ca.service_ca.subject
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    leaf = write(tmp_path / "admin.pem", cert)
    proc = openssl_verify("-CAfile", tmp_path / "ca/root.pem", "-untrusted", tmp_path / "ca/service-ca.pem",
                          "-purpose", "sslclient", leaf)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # a verifier that trusts only the device chain (the broker's device listener) does not accept it
    proc = openssl_verify("-CAfile", tmp_path / "ca/device-chain.pem", "-purpose", "sslclient", leaf)
    assert proc.returncode != 0


# --- loading, key files -----------------------------------------------------------------------------------------

def test_load_ca_round_trip(ca, tmp_path, policy):
    loaded = load_ca(tmp_path / "ca")
    assert loaded.root == ca.root and loaded.device_ca == ca.device_ca and loaded.service_ca == ca.service_ca
    leaf = write(tmp_path / "d.pem", device(loaded, policy))
    proc = openssl_verify("-CAfile", tmp_path / "ca/root.pem", "-untrusted", tmp_path / "ca/device-ca.pem", leaf)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    loaded.close()
    assert isinstance(device(loaded, policy), x509.Certificate)  # file keys do not need a session


@pytest.mark.parametrize("name", ["root.key", "device-ca.key", "service-ca.key"])
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_load_ca_refuses_wide_key_permissions(ca, tmp_path, name, mode):
    key = tmp_path / "ca" / name
    os.chmod(key, mode)
    with pytest.raises(CaError) as err:
        load_ca(tmp_path / "ca")
    msg = str(err.value)
    assert str(key) in msg and f"{mode:04o}" in msg and "0600" in msg and "refusing" in msg


def test_load_ca_refuses_a_key_that_does_not_match(ca, tmp_path):
    shutil.copy(tmp_path / "ca/service-ca.key", tmp_path / "ca/device-ca.key")
    os.chmod(tmp_path / "ca/device-ca.key", 0o600)
    with pytest.raises(CaError, match="device CA key does not match"):
        load_ca(tmp_path / "ca")


def test_load_ca_refuses_mixed_up_hierarchies(ca, tmp_path):
    other = create_hierarchy(tmp_path / "other", FLEET, NOW)
    for name in ("device-ca.pem", "device-ca.key"):
        shutil.copy(tmp_path / "other" / name, tmp_path / "ca" / name)
    del other
    with pytest.raises(CaError, match="not issued by this root"):
        load_ca(tmp_path / "ca")


def test_load_ca_errors(tmp_path, ca):
    with pytest.raises(CaError, match="cannot load CA certificate"):
        load_ca(tmp_path / "missing")
    with pytest.raises(CaError, match="file keys"):
        load_ca(tmp_path / "ca", session=object())


def test_new_file_key(tmp_path):
    for key_type in ("ec-p256", "ec-p384", "rsa-2048"):
        path = tmp_path / f"{key_type}.key"
        key = new_file_key(path, key_type)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        loaded = load_key_file(path)
        fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        assert loaded.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)
    with pytest.raises(CaError, match="already exists"):
        new_file_key(tmp_path / "ec-p256.key")
    with pytest.raises(CaError, match="unknown key type"):
        new_file_key(tmp_path / "x.key", "dsa")


# --- CRL -----------------------------------------------------------------------------------------------------------

def test_crl_revokes_in_openssl(ca, policy, tmp_path):
    revoked, good = device(ca, policy, "sensor-01"), device(ca, policy, "sensor-02")
    crl = ca.build_crl([(revoked.serial_number, NOW - timedelta(hours=1), "keyCompromise")], NOW, crl_number=1)
    crl_dir = tmp_path / "crl"
    der_path = write_crl_atomically(crl, crl_dir, ca.device_ca, NOW)
    assert der_path == crl_dir / "device.crl"
    assert der_path.read_bytes() == crl.public_bytes(serialization.Encoding.DER)
    assert (crl_dir / "device.crl.pem").read_bytes() == crl.public_bytes(serialization.Encoding.PEM)
    assert stat.S_IMODE(der_path.stat().st_mode) == 0o644
    cas = write(tmp_path / "cas.pem", ca.root, ca.device_ca)
    for cert, ok in ((revoked, False), (good, True)):
        leaf = write(tmp_path / "leaf.pem", cert)
        proc = openssl_verify("-crl_check", "-CAfile", cas, "-CRLfile", crl_dir / "device.crl.pem", leaf)
        out = proc.stdout + proc.stderr
        assert (proc.returncode == 0) == ok, out
        assert ok or "certificate revoked" in out
    text = subprocess.run(["openssl", "crl", "-inform", "DER", "-in", str(der_path), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    assert "Key Compromise" in text and "CRL Number" in text


def test_crl_contents(ca):
    entries = [(11, NOW, "keyCompromise"), (12, NOW, "superseded"), (13, NOW, "cessation_of_operation"),
               (14, NOW, "unspecified"), (15, NOW, "no such reason"), (11, NOW, "superseded")]
    crl = ca.build_crl(entries, NOW, crl_number=42, next_update=timedelta(days=3))
    assert crl.issuer == ca.device_ca.subject and crl.is_signature_valid(ca.device_ca.public_key())
    assert crl.last_update_utc == NOW and crl.next_update_utc == NOW + timedelta(days=3)
    assert ext(crl, x509.CRLNumber).value.crl_number == 42
    assert (ext(crl, x509.AuthorityKeyIdentifier).value.key_identifier
            == ext(ca.device_ca, x509.SubjectKeyIdentifier).value.digest)
    reasons = {}
    for entry in crl:
        try:
            reasons[entry.serial_number] = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        except x509.ExtensionNotFound:
            reasons[entry.serial_number] = None
    assert reasons == {11: x509.ReasonFlags.key_compromise, 12: x509.ReasonFlags.superseded,
                       13: x509.ReasonFlags.cessation_of_operation, 14: None, 15: None}
    assert reason_flag("KEY-COMPROMISE") is x509.ReasonFlags.key_compromise
    assert reason_flag("removeFromCRL") is x509.ReasonFlags.unspecified
    with pytest.raises(CrlError):
        ca.build_crl([], NOW, crl_number=0)


@pytest.mark.parametrize("entries", [0, 1, 3, 1000])  # DER lengths: short, 48-byte line edges, several KB
def test_pem_armor_is_exactly_cryptographys_pem(ca, entries):
    from hub.ca.crl import pem_armor

    crl = ca.build_crl([(100 + i, NOW, "keyCompromise") for i in range(entries)], NOW, crl_number=7)
    assert pem_armor(crl.public_bytes(serialization.Encoding.DER)) == crl.public_bytes(serialization.Encoding.PEM)
    assert x509.load_pem_x509_crl(pem_armor(crl.public_bytes(serialization.Encoding.DER))) == crl


def test_crl_builder_takes_entries_in_one_go_in_order(ca):
    entries = [(5000 - i, NOW - timedelta(minutes=i), "superseded") for i in range(2000)]
    crl = ca.build_crl(entries, NOW, crl_number=8)
    assert [e.serial_number for e in crl] == [serial for serial, _, _ in entries]


def _files(crl_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(crl_dir.iterdir())}


def _tampered(crl: x509.CertificateRevocationList) -> x509.CertificateRevocationList:
    der = bytearray(crl.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature value
    return x509.load_der_x509_crl(bytes(der))


def test_bad_crls_are_refused_and_old_files_kept(ca, tmp_path):
    crl_dir = tmp_path / "crl"
    write_crl_atomically(ca.build_crl([(7, NOW, "superseded")], NOW, crl_number=1), crl_dir, ca.device_ca, NOW)
    before = _files(crl_dir)
    other = create_hierarchy(tmp_path / "other", FLEET, NOW)  # same fleet, so the same issuer *name*
    bad = {
        "tampered": (_tampered(ca.build_crl([], NOW, crl_number=2)), "signature is not valid"),
        "foreign": (other.build_crl([], NOW, crl_number=2), "signature is not valid"),
        "expired": (ca.build_crl([], NOW - timedelta(days=10), crl_number=2), "expired"),
        "future": (ca.build_crl([], NOW + timedelta(days=1), crl_number=2), "not valid yet"),
        "wrong issuer": (_service_signed_crl(ca, tmp_path), "issuer"),
        "not increasing": (ca.build_crl([], NOW, crl_number=1), "must increase"),
    }
    for what, (crl, message) in bad.items():
        with pytest.raises(CrlError, match=message):
            write_crl_atomically(crl, crl_dir, ca.device_ca, NOW)
        assert _files(crl_dir) == before, what  # untouched, and no temp files left behind
    write_crl_atomically(ca.build_crl([], NOW, crl_number=2), crl_dir, ca.device_ca, NOW)
    assert _files(crl_dir) != before


def _service_signed_crl(ca: FleetCA, tmp_path: Path) -> x509.CertificateRevocationList:
    key = load_key_file(tmp_path / "ca/service-ca.key")
    return (x509.CertificateRevocationListBuilder().issuer_name(ca.service_ca.subject).last_update(NOW)
            .next_update(NOW + timedelta(days=1)).add_extension(x509.CRLNumber(9), critical=False)
            .sign(key, hashes.SHA256()))


def test_what_is_validated_is_what_is_on_disk(ca, tmp_path, monkeypatch):
    crl_dir = tmp_path / "crl"
    write_crl_atomically(ca.build_crl([], NOW, crl_number=1), crl_dir, ca.device_ca, NOW)
    before = _files(crl_dir)
    real = hub.ca.crl._encode
    monkeypatch.setattr(hub.ca.crl, "_encode", lambda crl, enc: real(crl, enc)[:-10])  # a short write
    with pytest.raises(CrlError):
        write_crl_atomically(ca.build_crl([], NOW, crl_number=2), crl_dir, ca.device_ca, NOW)
    assert _files(crl_dir) == before


def test_validate_crl(ca):
    crl = ca.build_crl([], NOW, crl_number=3, next_update=timedelta(days=7))
    der = crl.public_bytes(serialization.Encoding.DER)
    assert validate_crl(der, ca.device_ca, NOW) == crl
    assert validate_crl(crl.public_bytes(serialization.Encoding.PEM), ca.device_ca, NOW) == crl
    assert validate_crl(der, ca.device_ca, NOW - timedelta(minutes=4)) == crl  # within the clock skew
    for data, issuer, now, message in ((b"garbage", ca.device_ca, NOW, "does not parse"),
                                       (der[:-3], ca.device_ca, NOW, "does not parse"),
                                       (der, ca.service_ca, NOW, "issuer"),
                                       (der, ca.device_ca, NOW + timedelta(days=7), "expired"),
                                       (der, ca.device_ca, NOW - timedelta(minutes=6), "not valid yet")):
        with pytest.raises(CrlError, match=message):
            validate_crl(data, issuer, now)
    with pytest.raises(CrlError, match="expired"):
        validate_crl(der, ca.device_ca, NOW + timedelta(days=6), margin=timedelta(days=1))


def test_crl_needs_refresh_with_a_fake_clock(ca):
    crl = ca.build_crl([], NOW, crl_number=1, next_update=timedelta(days=8))
    assert not crl_needs_refresh(crl, NOW)
    assert not crl_needs_refresh(crl, NOW + timedelta(days=3, hours=23))
    assert crl_needs_refresh(crl, NOW + timedelta(days=4, seconds=1))
    assert crl_needs_refresh(crl, NOW + timedelta(days=30))
    assert not crl_needs_refresh(crl, NOW + timedelta(days=5), fraction=0.75)
    assert crl_needs_refresh(crl, NOW + timedelta(days=6, seconds=1), fraction=0.75)


def test_next_crl_number(ca, tmp_path):
    crl_dir = tmp_path / "crl"
    assert next_crl_number(crl_dir) == 1
    crl_dir.mkdir()
    assert next_crl_number(crl_dir) == 1
    write_crl_atomically(ca.build_crl([], NOW, crl_number=next_crl_number(crl_dir)), crl_dir, ca.device_ca, NOW)
    assert next_crl_number(crl_dir) == 2
    write_crl_atomically(ca.build_crl([], NOW, crl_number=41), crl_dir, ca.device_ca, NOW)
    assert next_crl_number(crl_dir) == 42
    assert current_crl(crl_dir, ca.device_ca).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 41
    (crl_dir / "device.crl").write_bytes(b"junk")
    assert next_crl_number(crl_dir) == 42  # the PEM copy still says 41
    (crl_dir / "device.crl.pem").write_bytes(b"junk")
    with pytest.raises(CrlError, match="cannot be read"):
        next_crl_number(crl_dir)
