"""A TLS scan with sslyze of every listener of a running hub (EST, the fleet API, Mosquitto's MQTT listener),
asserting the posture of hub/tlsposture.py with a tool that shares no TLS code with the hub.

test_tls_posture.py checks the same posture with Python's ssl (the hub's own OpenSSL); here sslyze (nassl's
OpenSSL builds, including a 1.0.2 one that still speaks SSL 2.0/3.0) offers every suite it knows, version by
version, and reports what the server took. Asserted, per listener:
- SSL 2.0, SSL 3.0, TLS 1.0 and 1.1: nothing accepted, every suite refused by the server (not timed out);
- TLS 1.2 (as tlsposture.MIN_VERSION says: accepted at 1.2): only ECDHE key exchange with an AEAD cipher (AES-GCM,
  ChaCha20-Poly1305), the same suites on every listener; TLS 1.3: accepted, AEAD suites only;
- no client-initiated renegotiation, secure renegotiation only (RFC 5746), no compression (CRIME); not vulnerable
  to Heartbleed, OpenSSL CCS injection or ROBOT (no RSA key exchange at all); TLS_FALLBACK_SCSV honoured; no TLS
  1.3 early data (0-RTT, replayable) on the HTTPS listeners;
- the server certificate: the chain sent verifies against the fleet root (and only against it, not a public
  store), in order, without the anchor, no SHA-1, the scanned address in the SAN;
- without a client certificate: EST asks for one optionally, MQTT and the API require one.

Client certificates: the API is scanned as an operator, MQTT as a telemetry reader (`tessera-hub identity add`,
file keys). sslyze's SSL 2.0 probe runs on OpenSSL 1.0.2, whose SSL 2.0 context cannot load a certificate file
holding a chain (an identity's file is certificate + service CA), so that probe of the two mTLS listeners uses a
lone certificate signed by the fleet root (the server refuses SSL 2.0 at the ClientHello, before any certificate).

sslyze runs in its own venv (`.venv-tlsscan`, `./dev.sh setup`): see tests/integration/sslyze_scan.py. Cost: one
hub, two identities and one scan of seven requests run concurrently, about 20 s; the EST scan's 5 s is sslyze
waiting out its network timeout to tell an optional client certificate from a required one.
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hub.tlsposture import CIPHERS, MIN_VERSION
from tests.helpers import ROOT, free_port
from tests.integration.hubfixtures import new_key, running_hub, write_key, write_pem

SCANNER = ROOT / ".venv-tlsscan" / "bin" / "python"
RUNNER = ROOT / "tests" / "integration" / "sslyze_scan.py"
LISTENERS = ("est", "api", "mqtt")
OLD = ("ssl_2_0_cipher_suites", "ssl_3_0_cipher_suites", "tls_1_0_cipher_suites", "tls_1_1_cipher_suites")
COMMON = ("ssl_3_0_cipher_suites", "tls_1_0_cipher_suites", "tls_1_1_cipher_suites", "tls_1_2_cipher_suites",
          "tls_1_3_cipher_suites", "session_renegotiation", "tls_compression", "heartbleed", "robot",
          "openssl_ccs_injection", "tls_fallback_scsv", "certificate_info")
#: IANA names: ECDHE key exchange, AES-GCM or ChaCha20-Poly1305 (written out here, not taken from tlsposture)
TLS12_OK = re.compile(r"TLS_ECDHE_(ECDSA|RSA)_WITH_(AES_128_GCM_SHA256|AES_256_GCM_SHA384|CHACHA20_POLY1305_SHA256)")
#: the posture's floor decides TLS 1.2 (accepted at 1.2, today; refused everywhere if it is raised to 1.3)
TLS12_ON = MIN_VERSION <= ssl.TLSVersion.TLSv1_2
TLS13_OK = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}
SCAN_TIMEOUT = 300.0


def _root_signed_leaf(hub, base) -> dict[str, str]:
    """A clientAuth certificate signed by the fleet root itself, in a file of its own (no chain): the one client
    certificate nassl's SSL 2.0 context can load (OpenSSL 1.0.2 refuses a chain file there) that both mTLS
    listeners still accept at the handshake. Made for the scan only; the hub never issues or registers it."""
    root = x509.load_pem_x509_certificate(hub.root_pem.read_bytes())
    root_key = serialization.load_pem_private_key((hub.dir / "ca" / "root.key").read_bytes(), password=None)
    key, now = new_key(), datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sslyze ssl2 probe")]))
            .issuer_name(root.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(root_key, hashes.SHA256()))
    return {"cert": str(write_pem(base / "ssl2-probe.pem", cert)), "key": str(write_key(base / "ssl2-probe.key", key))}


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """One sslyze run over every listener of one hub: {request name: sslyze's JSON of that scan}."""
    assert SCANNER.exists(), f"{SCANNER} is missing: ./dev.sh setup makes the sslyze venv"
    base = tmp_path_factory.mktemp("tlsscan")
    with running_hub(base, api_port=free_port()) as hub:
        creds = {}
        for name, role in (("alice", "operator"), ("reader", "telemetry-reader")):
            hub.cli_ok("identity", "add", name, "--role", role)
            d = hub.dir / "identities" / name
            creds[name] = {"cert": str(d / f"{name}.pem"), "key": str(d / f"{name}.key")}
        creds["leaf"] = _root_signed_leaf(hub, base)
        root = {"ca_file": str(hub.root_pem)}
        request = [
            {"name": "est", "port": hub.port, "commands": [*COMMON, "ssl_2_0_cipher_suites", "tls_1_3_early_data"],
             **root},
            {"name": "api", "port": hub.api_port, "commands": [*COMMON, "tls_1_3_early_data"], **root,
             **creds["alice"]},
            # early data: sslyze's probe sends an HTTP request to earn a session ticket; Mosquitto drops it
            {"name": "mqtt", "port": hub.mqtt_port, "commands": list(COMMON), **root, **creds["reader"]},
            {"name": "api-ssl2", "port": hub.api_port, "commands": ["ssl_2_0_cipher_suites"], **creds["leaf"]},
            {"name": "mqtt-ssl2", "port": hub.mqtt_port, "commands": ["ssl_2_0_cipher_suites"], **creds["leaf"]},
            {"name": "api-nocert", "port": hub.api_port, "commands": []},
            {"name": "mqtt-nocert", "port": hub.mqtt_port, "commands": []},
        ]
        proc = subprocess.run([str(SCANNER), str(RUNNER)], input=json.dumps(request), capture_output=True,
                              text=True, timeout=SCAN_TIMEOUT, cwd=base)
        assert proc.returncode == 0, f"sslyze_scan.py exited {proc.returncode}:\n{proc.stderr[-4000:]}"
        out = json.loads(proc.stdout)
    assert set(out) == {r["name"] for r in request}
    return out


def _result(scan, name: str, command: str) -> dict:
    """The result of one scan command; it must have run to completion (an error would pass every check)."""
    server = scan[name]
    assert server["connectivity_status"] == "COMPLETED", server["connectivity_error_trace"]
    attempt = server["scan_result"][command]
    assert attempt["status"] == "COMPLETED", f"{name} {command}: {attempt['error_reason']}\n{attempt['error_trace']}"
    return attempt["result"]


def _old_version_result(scan, name: str, command: str) -> dict:
    return _result(scan, f"{name}-ssl2" if command == "ssl_2_0_cipher_suites" and name != "est" else name, command)


@pytest.mark.parametrize("command", OLD)
@pytest.mark.parametrize("name", LISTENERS)
def test_ssl_and_tls_below_1_2_are_refused(scan, name, command):
    result = _old_version_result(scan, name, command)
    assert result["is_tls_version_supported"] is False
    assert result["accepted_cipher_suites"] == []
    assert result["rejected_cipher_suites"], "sslyze offered no suite"
    timed_out = [r for r in result["rejected_cipher_suites"] if "timed out" in r["error_message"]]
    assert not timed_out, f"{len(timed_out)} suites timed out instead of being refused: {timed_out[0]}"


@pytest.mark.parametrize("name", LISTENERS)
def test_tls12_accepts_only_ecdhe_with_aead(scan, name):
    result = _result(scan, name, "tls_1_2_cipher_suites")
    assert result["is_tls_version_supported"] is TLS12_ON, f"{name}: TLS 1.2 against a minimum of {MIN_VERSION.name}"
    accepted = [s["cipher_suite"] for s in result["accepted_cipher_suites"]]
    assert bool(accepted) is TLS12_ON
    weak = [s["name"] for s in accepted if not TLS12_OK.fullmatch(s["name"])]
    assert not weak, f"{name} accepts TLS 1.2 suites outside ECDHE + AEAD: {weak}"
    assert {s["openssl_name"] for s in accepted} <= set(CIPHERS.split(":"))
    for s in result["accepted_cipher_suites"]:
        assert s["ephemeral_key"] and s["ephemeral_key"]["type_name"] == "ECDH", s
    assert not [r for r in result["rejected_cipher_suites"] if "timed out" in r["error_message"]]


def test_every_listener_offers_the_same_tls12_suites(scan):
    offered = {name: sorted(s["cipher_suite"]["name"] for s in
                            _result(scan, name, "tls_1_2_cipher_suites")["accepted_cipher_suites"])
               for name in LISTENERS}
    assert len({tuple(v) for v in offered.values()}) == 1, offered


@pytest.mark.parametrize("name", LISTENERS)
def test_tls13_is_accepted_with_aead_suites(scan, name):
    result = _result(scan, name, "tls_1_3_cipher_suites")
    assert result["is_tls_version_supported"] is True
    accepted = {s["cipher_suite"]["name"] for s in result["accepted_cipher_suites"]}
    assert accepted and accepted <= TLS13_OK, accepted


@pytest.mark.parametrize("name", LISTENERS)
def test_no_renegotiation_no_compression(scan, name):
    reneg = _result(scan, name, "session_renegotiation")
    assert reneg["is_vulnerable_to_client_renegotiation_dos"] is False
    assert reneg["client_renegotiations_success_count"] == 0
    assert reneg["supports_secure_renegotiation"] is True  # RFC 5746 only: no insecure legacy renegotiation
    assert _result(scan, name, "tls_compression")["supports_compression"] is False


@pytest.mark.parametrize("name", LISTENERS)
def test_not_vulnerable_to_known_attacks(scan, name):
    assert _result(scan, name, "heartbleed")["is_vulnerable_to_heartbleed"] is False
    assert _result(scan, name, "openssl_ccs_injection")["is_vulnerable_to_ccs_injection"] is False
    assert _result(scan, name, "robot")["robot_result"] == "NOT_VULNERABLE_RSA_NOT_SUPPORTED"
    assert _result(scan, name, "tls_fallback_scsv")["supports_fallback_scsv"] is True
    if name != "mqtt":
        assert _result(scan, name, "tls_1_3_early_data")["supports_early_data"] is False


@pytest.mark.parametrize("name", LISTENERS)
def test_server_certificate_chain(scan, name):
    info = _result(scan, name, "certificate_info")
    assert len(info["certificate_deployments"]) == 1
    dep = info["certificate_deployments"][0]
    assert dep["received_chain_has_valid_order"] is True
    assert dep["received_chain_contains_anchor_certificate"] is False
    assert dep["verified_chain_has_sha1_signature"] is False
    trusted = {p["trust_store"]["name"] for p in dep["path_validation_results"] if p["was_validation_successful"]}
    assert trusted == {"Supplied CA file"}, trusted  # the fleet root, and no public store
    chain = dep["verified_certificate_chain"]
    assert chain[-1]["subject"]["rfc4514_string"] == "CN=acme Root CA,O=acme", chain[-1]["subject"]
    leaf = dep["received_certificate_chain"][0]
    assert "127.0.0.1" in leaf["subject_alternative_name"]["ip_addresses"]
    assert leaf["signature_hash_algorithm"]["name"] in {"sha256", "sha384", "sha512"}


def test_client_certificate_optional_for_est_required_for_mqtt_and_api(scan):
    assert scan["est"]["connectivity_result"]["client_auth_requirement"] == "OPTIONAL"
    assert scan["mqtt-nocert"]["connectivity_result"]["client_auth_requirement"] == "REQUIRED"
    api = scan["api-nocert"]
    if api["connectivity_status"] == "COMPLETED":
        assert api["connectivity_result"]["client_auth_requirement"] == "REQUIRED"
    else:
        # asyncio (aiohttp) closes a failed handshake without sending OpenSSL's alert (CPython gh-98078), so
        # sslyze sees the refusal as the peer closing the connection before it could send data
        assert api["connectivity_status"] == "ERROR"
        assert "peer closed the connection" in api["connectivity_error_trace"], api["connectivity_error_trace"]
