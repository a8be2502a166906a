"""Interop: the RFC 7030 flow with stock tools only (openssl req, curl, base64, openssl pkcs7/verify).

The enrollment token reaches curl through a 0600 `-K` config file, never through argv.
"""

from __future__ import annotations

import shlex
import subprocess

import pytest
from cryptography import x509

from tests.integration.hubfixtures import (  # noqa: F401  (hub is a fixture)
    EST_PREFIX, FLEET, cn_of, eku_of, hub, openssl, org_of, write_secret_file,
)

pytestmark = pytest.mark.integration


def sh(script: str, cwd, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run a bash pipeline with pipefail (no secrets in it: they are in files)."""
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def curl_config(path, device_id: str, token: str):
    return write_secret_file(path, f'user = "{device_id}:{token}"\n')


@pytest.mark.parametrize("newkey", [["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
                                    ["-newkey", "rsa:2048"]], ids=["ec-p256", "rsa-2048"])
def test_curl_openssl_simpleenroll(hub, tmp_path, newkey):
    device_id = f"curl-{newkey[1].replace(':', '-')}"
    token = hub.add_device(device_id)
    cfg = curl_config(tmp_path / "curl.cfg", device_id, token)
    assert cfg.stat().st_mode & 0o777 == 0o600
    q = shlex.quote
    root, device_ca = q(str(hub.root_pem)), q(str(hub.device_ca_pem))
    url = f"https://127.0.0.1:{hub.port}{EST_PREFIX}/simpleenroll"

    script = " && ".join([
        f"openssl req -new {' '.join(map(q, newkey))} -nodes -keyout dev.key -subj /CN={device_id} "
        f"-outform DER | base64 > csr.b64",
        f"curl -sS --fail-with-body --max-time 30 --cacert {root} -K curl.cfg "
        f"-H 'Content-Type: application/pkcs10' --data-binary @csr.b64 -D headers.txt -o resp.b64 {q(url)}",
        "tr -d '\\r' < resp.b64 | base64 -d > resp.p7",
        "openssl pkcs7 -inform DER -print_certs -in resp.p7 -out chain.pem",
        # certs-only PKCS#7 holds a SET OF certificates (DER sorts it): pick the leaf by its subject
        f"awk '/^subject=.*CN = {device_id}$/{{f=1}} f&&/BEGIN CERT/{{p=1}} p{{print}} p&&/END CERT/{{exit}}' "
        "chain.pem > leaf.pem",
        f"openssl verify -CAfile {root} -untrusted {device_ca} -purpose sslclient leaf.pem",
    ])
    proc = sh(script, tmp_path)
    assert token not in script
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("leaf.pem: OK"), proc.stdout

    headers = (tmp_path / "headers.txt").read_text().lower()
    assert headers.startswith("http/1.1 200")
    assert "content-type: application/pkcs7-mime; smime-type=certs-only" in headers
    leaf = x509.load_pem_x509_certificate((tmp_path / "leaf.pem").read_bytes())
    assert cn_of(leaf) == device_id and org_of(leaf) == [FLEET]
    assert [e.dotted_string for e in eku_of(leaf)] == ["1.3.6.1.5.5.7.3.2"]
    # the certificate is for the key openssl generated
    pub_key = openssl("pkey", "-in", str(tmp_path / "dev.key"), "-pubout").stdout
    pub_cert = openssl("x509", "-in", str(tmp_path / "leaf.pem"), "-noout", "-pubkey").stdout
    assert pub_key and pub_key == pub_cert
    chain = (tmp_path / "chain.pem").read_text()
    assert chain.count("BEGIN CERTIFICATE") == 2 and f"CN = {FLEET} Device CA" in chain
    shown = hub.show(device_id)
    assert [c["status"] for c in shown["certificates"]] == ["active"]
    assert shown["certificates"][0]["serial"] == format(leaf.serial_number, "x")


def test_curl_cacerts_holds_root_device_ca_and_service_ca(hub, tmp_path):
    url = f"https://127.0.0.1:{hub.port}{EST_PREFIX}/cacerts"
    proc = sh(f"curl -sS --fail --max-time 30 --cacert {shlex.quote(str(hub.root_pem))} -D headers.txt "
              f"{shlex.quote(url)} | tr -d '\\r' | base64 -d | openssl pkcs7 -inform DER -print_certs", tmp_path)
    assert proc.returncode == 0, proc.stderr
    subjects = sorted(line for line in proc.stdout.splitlines() if line.startswith("subject="))
    assert subjects == [f"subject=O = {FLEET}, CN = {FLEET} {role} CA" for role in ("Device", "Root", "Service")]
    assert "content-type: application/pkcs7-mime; smime-type=certs-only" in (tmp_path / "headers.txt").read_text().lower()
    # the root in /cacerts is the one the fleet directory holds
    root_in_body = [b for b in proc.stdout.split("\n\n") if "Root CA" in b][0]
    pem = root_in_body[root_in_body.index("-----BEGIN"):]
    assert x509.load_pem_x509_certificate(pem.encode()) == x509.load_pem_x509_certificate(hub.root_pem.read_bytes())


def test_curl_with_a_wrong_token_gets_401_with_a_challenge(hub, tmp_path):
    device_id = "curl-wrong"
    hub.add_device(device_id)
    curl_config(tmp_path / "curl.cfg", device_id, "not-the-token-" + "x" * 20)
    url = f"https://127.0.0.1:{hub.port}{EST_PREFIX}/simpleenroll"
    proc = sh(f"openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout k -subj /CN={device_id} "
              f"-outform DER | base64 > csr.b64 && curl -sS --max-time 30 --cacert {shlex.quote(str(hub.root_pem))} "
              f"-K curl.cfg -H 'Content-Type: application/pkcs10' --data-binary @csr.b64 -D h.txt -o body.txt "
              f"-w '%{{http_code}}' {shlex.quote(url)}", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "401"
    assert (tmp_path / "body.txt").read_text().startswith("unauthorized:")  # the audit says unknown_token
    assert 'www-authenticate: basic realm="tessera-est"' in (tmp_path / "h.txt").read_text().lower()
    assert hub.cert_count(device_id) == 0


def test_curl_refuses_a_hub_it_cannot_verify(hub, tmp_path):
    """Control for the tests above: with the system store instead of the fleet root, curl fails TLS."""
    proc = subprocess.run(["curl", "-sS", "--max-time", "30", f"https://127.0.0.1:{hub.port}{EST_PREFIX}/cacerts"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 60, proc.stderr  # CURLE_PEER_FAILED_VERIFICATION
