"""Tests for agent.tlsconfig: the pkcs11-provider URI file is the DER the provider decodes (checked with openssl
asn1parse, for URIs of every length form), the provider config, and the refusals."""

from __future__ import annotations

import base64
import subprocess

import pytest

from agent.tlsconfig import PEM_LABEL, provider_conf, uri_pem


@pytest.mark.parametrize("size", [10, 200, 400])   # short, one-byte and two-byte DER lengths
def test_uri_file_is_a_sequence_of_the_description_and_the_uri(size, tmp_path) -> None:
    uri = "pkcs11:token=dev;object=" + "k" * size + ";type=private"
    pem = uri_pem(uri)
    assert pem.startswith(f"-----BEGIN {PEM_LABEL}-----\n") and pem.endswith(f"-----END {PEM_LABEL}-----\n")
    assert all(len(line) <= 64 for line in pem.splitlines())
    der = base64.b64decode("".join(pem.splitlines()[1:-1]))
    (tmp_path / "k.der").write_bytes(der)
    out = subprocess.run(["openssl", "asn1parse", "-inform", "DER", "-in", str(tmp_path / "k.der")],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    lines = out.splitlines()
    assert "cons: SEQUENCE" in lines[0]
    assert "VISIBLESTRING" in lines[1] and lines[1].endswith(":PKCS#11 Provider URI v1.0")
    assert "UTF8STRING" in lines[2] and lines[2].endswith(":" + uri)


def test_uri_file_refuses_what_is_not_a_pkcs11_uri() -> None:
    with pytest.raises(ValueError, match="not a PKCS#11 URI"):
        uri_pem("/etc/tessera/key.pem")


def test_provider_conf_reads_the_pin_from_its_file_and_quiets_softhsm_at_exit() -> None:
    soft = provider_conf("/usr/lib/softhsm/libsofthsm2.so", "file:/etc/tessera/token-pin")
    assert "pkcs11-module-token-pin = file:/etc/tessera/token-pin" in soft
    assert "pkcs11-module-quirks = no-deinit" in soft
    tpm = provider_conf("/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so", "file:/p")
    assert "quirks" not in tpm and "activate = 1" in tpm
    with pytest.raises(ValueError, match="file: PIN source"):
        provider_conf("/m.so", "env:PIN")


def test_the_config_names_the_provider_file_found(tmp_path):
    # a tool loads the provider the agent found (hsm.tls.provider_path: $TESSERA_PKCS11_PROVIDER or the module
    # directories), not whatever "pkcs11" its own OpenSSL module directory holds
    text = provider_conf("/usr/lib/softhsm/libsofthsm2.so", f"file:{tmp_path / 'pin'}", "/opt/p11/pkcs11.so")
    section = text.split("[pkcs11_sect]", 1)[1]
    assert "\nmodule = /opt/p11/pkcs11.so\n" in section
    assert "module = " not in provider_conf("/usr/lib/softhsm/libsofthsm2.so", f"file:{tmp_path / 'pin'}")
