"""`tessera-hub ca move-to-token`: file CA keys move into a SoftHSM token; the hub keeps issuing from there."""

from __future__ import annotations

import os
import subprocess

import pytest
from cryptography import x509

from agent.estclient import EstClient
from hsm.softhsm import create_token
from tests.integration.hubfixtures import init_hub, make_csr, new_key, run_cli

pytestmark = pytest.mark.integration

KEY_FILES = ("root.key", "device-ca.key", "service-ca.key")


def test_move_keys_then_enroll_from_the_token(tmp_path):
    hub = init_hub(tmp_path)
    before = {p.name: p.read_bytes() for p in (hub.dir / "ca").glob("*.pem")}
    token = create_token(tmp_path / "tok", label="fleet-ca")
    env = dict(os.environ, SOFTHSM2_CONF=str(token.conf))
    res = subprocess.run([str(hub_cli()), "ca", "move-to-token", "--token-label", "fleet-ca", "--pin-source",
                          f"file:{token.pin_file}", "--dir", str(hub.dir)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert token.pin not in res.stdout + res.stderr
    assert not any((hub.dir / "ca" / k).exists() for k in KEY_FILES)
    assert {p.name: p.read_bytes() for p in (hub.dir / "ca").glob("*.pem")} == before  # certificates unchanged
    assert 'store = "pkcs11"' in (hub.dir / "fleet.toml").read_text()
    hub.start()
    try:
        token_value = hub.add_device("moved-1")
        key = new_key()
        leaf = EstClient(hub.url, cafile=str(hub.root_pem)).simpleenroll(make_csr(key, "moved-1"), "moved-1",
                                                                        token_value)[0]
        device_ca = x509.load_pem_x509_certificate((hub.dir / "ca" / "device-ca.pem").read_bytes())
        leaf.verify_directly_issued_by(device_ca)  # signed in the token with the same device CA key
    finally:
        assert hub.stop() == 0


def test_a_failed_move_changes_nothing(tmp_path):
    hub = init_hub(tmp_path)
    token = create_token(tmp_path / "tok", label="fleet-ca")
    bad_pin = tmp_path / "bad-pin"
    bad_pin.write_text("00000000\n")
    bad_pin.chmod(0o600)
    env = dict(os.environ, SOFTHSM2_CONF=str(token.conf))
    res = subprocess.run([str(hub_cli()), "ca", "move-to-token", "--token-label", "fleet-ca", "--pin-source",
                          f"file:{bad_pin}", "--dir", str(hub.dir)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 1 and "wrong PIN" in res.stderr
    assert all((hub.dir / "ca" / k).exists() for k in KEY_FILES)
    assert not (hub.dir / "ca" / "keys.json").exists()
    assert 'store = "file"' in (hub.dir / "fleet.toml").read_text()
    assert run_cli("crl", "--dir", str(hub.dir)).returncode == 0  # still works from the files


def hub_cli():
    from tests.integration.hubfixtures import hub_binary

    return hub_binary()
