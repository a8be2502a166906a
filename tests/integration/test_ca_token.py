"""The fleet CA hierarchy with its three keys in a SoftHSM token (hub.ca.authority with token=..., hub.ca.crl).

All token work runs in spawned children (hsm.worker.run_isolated) running the child_* functions below: python-pkcs11
initialises the PKCS#11 module once per process with the SOFTHSM2_CONF it sees first. The children hand PEM/DER
bytes back and the parent checks them with `openssl verify` and hub.ca.crl.validate_crl.
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hsm.uri import parse
from hsm.worker import run_isolated
from hub.ca.authority import TOKEN_LABELS, CaError, load_ca
from hub.ca.crl import validate_crl

pytestmark = pytest.mark.integration

FLEET = "acme"
CRL_URL = "http://hub.acme.test:8080/crl/device.crl"
NOW = datetime.now(timezone.utc).replace(microsecond=0)


# --- run in the spawned child ------------------------------------------------------------------------------------

def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def child_create(cfg, ca_dir: str, now: datetime, key_type: str, device_pub: bytes) -> dict[str, bytes]:
    """Create a token-backed hierarchy, issue two device certs, revoke the first in a CRL written to ca_dir/crl."""
    from hub.ca.authority import create_hierarchy
    from hub.ca.crl import write_crl_atomically
    from hub.ca.policy import Policy

    pub = serialization.load_pem_public_key(device_pub)
    with create_hierarchy(Path(ca_dir), FLEET, now, key_type=key_type, token=cfg) as ca:
        assert ca.token_backed
        policy = Policy(fleet=FLEET)
        revoked = ca.issue_device_cert(pub, "sensor-01", policy, now, CRL_URL)
        good = ca.issue_device_cert(pub, "sensor-02", policy, now, CRL_URL)
        server = ca.issue_server_cert(pub, ["hub.acme.test"], ["127.0.0.1"], now)
        crl = ca.build_crl([(revoked.serial_number, now, "keyCompromise")], now, crl_number=1)
        write_crl_atomically(crl, Path(ca_dir) / "crl", ca.device_ca, now)
        return {"revoked": _pem(revoked), "good": _pem(good), "server": _pem(server),
                "crl": crl.public_bytes(serialization.Encoding.DER)}


def child_load_and_issue(cfg, ca_dir: str, now: datetime, device_pub: bytes, threads: int) -> list[bytes]:
    """Load the token-backed hierarchy in a fresh process and issue device certs from several threads at once."""
    from hub.ca.authority import load_ca
    from hub.ca.policy import Policy

    pub = serialization.load_pem_public_key(device_pub)
    ca = load_ca(Path(ca_dir), token=cfg)
    try:
        with ThreadPoolExecutor(threads) as pool:
            certs = list(pool.map(lambda i: ca.issue_device_cert(pub, f"dev-{i}", Policy(fleet=FLEET), now, CRL_URL),
                                  range(threads * 4)))
        crls = [ca.build_crl([(c.serial_number, now, "superseded")], now, crl_number=2) for c in certs[:2]]
        return [_pem(c) for c in certs] + [c.public_bytes(serialization.Encoding.PEM) for c in crls]
    finally:
        ca.close()


def child_create_again(cfg, ca_dir: str, now: datetime) -> str:
    """Try to create a second hierarchy on the same token; return the error message."""
    from hub.ca.authority import CaError, create_hierarchy

    try:
        create_hierarchy(Path(ca_dir), FLEET, now, token=cfg).close()
    except CaError as exc:
        return str(exc)
    return ""


# --- the tests ---------------------------------------------------------------------------------------------------

def _device_pub() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _verify(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", "verify", "-attime", str(int(NOW.timestamp())), *map(str, args)],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("key_type", ["ec-p256", "ec-p384", "rsa-3072"])
def test_token_backed_hierarchy(softtoken, tmp_path, key_type):
    ca_dir = tmp_path / "ca"
    out = run_isolated(child_create, softtoken.config, str(ca_dir), NOW, key_type, _device_pub(), timeout=300)

    # no private key material in the CA directory; keys.json names the token keys without a PIN
    assert sorted(p.name for p in ca_dir.iterdir()) == ["crl", "device-ca.pem", "device-chain.pem", "keys.json",
                                                        "root.pem", "service-ca.pem", "service-chain.pem"]
    assert not list(ca_dir.rglob("*.key"))
    text = (ca_dir / "keys.json").read_text()
    assert softtoken.pin not in text and "pin" not in text.lower()
    record = json.loads(text)
    for role, label in TOKEN_LABELS.items():
        uri = parse(record["keys"][role])
        assert (uri.token, uri.object, uri.type) == (softtoken.label, label, "private") and uri.id

    # certificates signed in the token verify with OpenSSL
    root, device_ca = ca_dir / "root.pem", ca_dir / "device-ca.pem"
    for name in ("revoked", "good"):
        (tmp_path / f"{name}.pem").write_bytes(out[name])
        proc = _verify("-purpose", "sslclient", "-CAfile", root, "-untrusted", device_ca, tmp_path / f"{name}.pem")
        assert proc.returncode == 0, proc.stdout + proc.stderr
    (tmp_path / "server.pem").write_bytes(out["server"])
    proc = _verify("-purpose", "sslserver", "-verify_hostname", "hub.acme.test", "-CAfile", root,
                   "-untrusted", ca_dir / "service-ca.pem", tmp_path / "server.pem")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ca_cert = x509.load_pem_x509_certificate(device_ca.read_bytes())
    key_size = ca_cert.public_key().key_size if key_type == "rsa-3072" else ca_cert.public_key().curve.key_size
    assert key_size == {"ec-p256": 256, "ec-p384": 384, "rsa-3072": 3072}[key_type]

    # the CRL signed by the token's device CA key validates and revokes in OpenSSL
    crl = validate_crl(out["crl"], ca_cert, NOW)
    assert [e.serial_number for e in crl] == [x509.load_pem_x509_certificate(out["revoked"]).serial_number]
    assert (ca_dir / "crl/device.crl").read_bytes() == out["crl"]
    cas = tmp_path / "cas.pem"
    cas.write_bytes(root.read_bytes() + device_ca.read_bytes())
    for name, ok in (("revoked", False), ("good", True)):
        proc = _verify("-crl_check", "-CAfile", cas, "-CRLfile", ca_dir / "crl/device.crl.pem", tmp_path / f"{name}.pem")
        assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
        assert ok or "certificate revoked" in proc.stdout + proc.stderr


def test_token_backed_hierarchy_reloads_in_a_new_process(softtoken, tmp_path):
    ca_dir = tmp_path / "ca"
    run_isolated(child_create, softtoken.config, str(ca_dir), NOW, "ec-p256", _device_pub())
    pems = run_isolated(child_load_and_issue, softtoken.config, str(ca_dir), NOW, _device_pub(), 6)
    *certs, crl1, crl2 = pems
    assert len(certs) == 24
    assert len({x509.load_pem_x509_certificate(c).serial_number for c in certs}) == 24
    for i, pem in enumerate(certs):
        leaf = tmp_path / f"dev-{i}.pem"
        leaf.write_bytes(pem)
        proc = _verify("-CAfile", ca_dir / "root.pem", "-untrusted", ca_dir / "device-ca.pem", leaf)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    device_ca = x509.load_pem_x509_certificate((ca_dir / "device-ca.pem").read_bytes())
    for crl in (crl1, crl2):
        validate_crl(crl, device_ca, NOW)


def test_token_hierarchy_needs_the_token_and_fresh_labels(softtoken, tmp_path):
    ca_dir = tmp_path / "ca"
    run_isolated(child_create, softtoken.config, str(ca_dir), NOW, "ec-p256", _device_pub())
    with pytest.raises(CaError, match="PKCS#11 token"):
        load_ca(ca_dir)  # no token configured: refused before any PKCS#11 work, so safe in this process
    message = run_isolated(child_create_again, softtoken.config, str(tmp_path / "second"), NOW)
    assert "tessera-root-ca" in message and "refusing" in message
    assert not (tmp_path / "second").exists() or not list((tmp_path / "second").iterdir())
