"""mTLS with the client key in a token (hsm.tls.client_context), on each token type (`token`: SoftHSM, TPM) and
each TLS route (`tls_route`: pkcs11-provider, the libp11 engine; $TESSERA_TEST_ROUTES selects): ids [softhsm-provider].

Every TLS client runs in its own `python -m tests.helpers` process (each route initialises PKCS#11 once per
process), its route given explicitly (TESSERA_TLS_ROUTE). Servers listen on 127.0.0.1 only, run under `timeout`,
and are stopped in teardown.
"""

from __future__ import annotations

import glob
import re
import secrets
import shutil
import subprocess
import time

import pytest

from hsm import worker
from hsm.softhsm import write_secret
from hsm.tls import available_routes, provider_path
from tests.helpers import (
    child_env, free_port, one_tls_route, run_tls_child, selected_routes, start_server, stop_process, token_dict,
    wait_for_text,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def device(token, tls_route, ca):
    """A token key 'device' (EC P-256) with a clientAuth certificate from `ca` for CN=device-<random>, used on
    route `tls_route`."""
    cn = f"device-{secrets.token_hex(4)}"
    info = worker.generate_key(token.config, "device", "ec-p256")
    cert = ca.issue_client(worker.make_csr(token.config, "device", common_name=cn), name="device")
    return {"cn": cn, "info": info, "cert": cert, "token": token, "route": tls_route}


def tls_child(req: dict, device: dict) -> dict:
    """run_tls_child on the device's route."""
    return run_tls_child(req, route=device["route"])


def _request(op: str, ca, device, **extra) -> dict:
    return {"op": op, "cafile": str(ca.cert_path), "cert": str(device["cert"]), "key_uri": device["info"].uri,
            "token": token_dict(device["token"].config), **extra}


@pytest.fixture
def s_server(ca, tmp_path):
    """`openssl s_server -www` on 127.0.0.1 requiring a client certificate from `ca`; yields (port, log path)."""
    cert, key = ca.issue_server("s_server")
    port = free_port()
    log = tmp_path / "s_server.log"
    proc = start_server(["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(cert), "-key", str(key),
                         "-CAfile", str(ca.cert_path), "-Verify", "1", "-verify_return_error", "-www",
                         "-naccept", "5"], log, lifetime=90)
    try:
        wait_for_text(log, "ACCEPT", 15, proc)
        yield port, log
    finally:
        stop_process(proc)


@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
def test_https_get_against_openssl_s_server(device, ca, s_server, version):
    """The token key signs the handshake on each route, in TLS 1.3 and in TLS 1.2 (its own signature schemes)."""
    port, log = s_server
    answer = tls_child(_request("https_get", ca, device, host="127.0.0.1", port=port, max_tls=version), device)
    assert answer["ok"], answer
    assert answer["status"] == 200 and answer["route"] == device["route"], answer
    assert answer["tls_version"] == version, answer
    body = answer["body"]
    # s_server -www prints the verified client certificate it received: it must be ours
    assert "Verify return code: 0 (ok)" in body
    assert "Client certificate" in body
    assert f"Subject: CN = {device['cn']}" in body or f"Subject: CN={device['cn']}" in body, body[-3000:]
    assert "Peer signature type: ECDSA" in body
    text = wait_for_text(log, f"depth=0 CN = {device['cn']}", 10)
    assert "verify error" not in text


def test_s_server_refuses_a_client_without_certificate(ca, s_server, tmp_path):
    """Control: the server really requires a client certificate (so the test above proves the token key was used)."""
    port, _ = s_server
    proc = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(ca.cert_path),
                           "-verify_return_error", "-brief"], input="GET / HTTP/1.0\r\n\r\n", capture_output=True,
                          text=True, timeout=30)
    assert "Client certificate" not in proc.stdout
    assert "HTTP/1.0 200" not in proc.stdout


# --- Mosquitto ---------------------------------------------------------------------------------------------------

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


@pytest.fixture
def mosquitto(ca, tmp_path):
    """A Mosquitto broker on a free 127.0.0.1 port: mTLS required, username = certificate CN."""
    cert, key = ca.issue_server("broker")
    port = free_port()
    log = tmp_path / "mosquitto.log"  # written by mosquitto itself (its stdout is block-buffered)
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        "per_listener_settings false\n"
        "persistence false\n"
        "user root\n"
        f"log_dest file {log}\n"
        "log_type all\n"
        "connection_messages true\n"
        "log_timestamp false\n"
        "allow_anonymous false\n"
        "set_tcp_nodelay true\n"
        f"listener {port} 127.0.0.1\n"
        f"cafile {ca.cert_path}\n"
        f"certfile {cert}\n"
        f"keyfile {key}\n"
        "require_certificate true\n"
        "use_identity_as_username true\n"
        "tls_version tlsv1.2\n"
    )
    proc = start_server([MOSQUITTO, "-c", str(conf)], tmp_path / "mosquitto.out", lifetime=90)
    try:
        wait_for_text(log, f"Opening ipv4 listen socket on port {port}", 15, proc)
        yield port, log
    finally:
        stop_process(proc)


def test_mqtt_publish_through_mosquitto(device, ca, mosquitto, tmp_path):
    port, log = mosquitto
    sub_cert, sub_key = ca.issue_file_client("subscriber")
    topic = f"tessera/test/{secrets.token_hex(4)}"
    payload = f"hello from the token {secrets.token_hex(8)}"
    out = tmp_path / "sub.out"
    with open(out, "wb") as fh:
        sub = subprocess.Popen(["timeout", "60", "mosquitto_sub", "-h", "127.0.0.1", "-p", str(port),
                                "--cafile", str(ca.cert_path), "--cert", str(sub_cert), "--key", str(sub_key),
                                "-i", "subscriber", "-t", topic, "-q", "1", "-C", "1", "-W", "45"],
                               stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_text(log, "Sending SUBACK to subscriber", 15)
        answer = tls_child(_request("mqtt_publish", ca, device, host="127.0.0.1", port=port,
                                    client_id=device["cn"], topic=topic, payload=payload), device)
        assert answer["ok"], answer
        assert answer["connect_failure"] is False, answer
        assert answer["published"] is True and answer["route"] == device["route"], answer
        assert sub.wait(timeout=30) == 0
    finally:
        stop_process(sub)
    assert out.read_text().strip() == payload
    text = log.read_text()
    # the broker authenticated the client by its certificate: username is the CN from the token-backed cert
    pattern = rf"New client connected from 127\.0\.0\.1:\d+ as {re.escape(device['cn'])} \(.*u'{re.escape(device['cn'])}'\)"
    assert re.search(pattern, text), text
    assert re.search(rf"Received PUBLISH from {re.escape(device['cn'])} .*'{re.escape(topic)}'", text), text


def test_mosquitto_refuses_a_client_without_certificate(ca, mosquitto):
    """Control: without a client certificate the broker does not accept the connection."""
    port, log = mosquitto
    proc = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "--cafile", str(ca.cert_path),
                           "-i", "anonymous-client", "-t", "t", "-m", "x"], capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    time.sleep(0.2)
    assert "as anonymous-client" not in log.read_text()


# --- failures ---------------------------------------------------------------------------------------------------

def _assert_one_line(answer: dict, *secrets_: str) -> str:
    msg = answer["error"]
    assert msg and "\n" not in msg and len(msg) < 400, msg
    for s in secrets_:
        assert s not in msg, "the PIN appears in the error message"
    return msg


def test_certificate_for_another_key_is_refused(token, tls_route, ca):
    worker.generate_key(token.config, "mine", "ec-p256")
    other = worker.generate_key(token.config, "other", "ec-p256")
    mine = worker.describe_key(token.config, "mine")
    cert = ca.issue_client(other.public_key_pem, cn="mismatch", name="other")
    answer = run_tls_child({"op": "context", "cafile": str(ca.cert_path), "cert": str(cert), "key_uri": mine.uri,
                            "token": token_dict(token.config)}, route=tls_route)
    assert not answer["ok"], answer
    assert "HsmError" in answer["error_mro"], answer
    msg = _assert_one_line(answer, token.pin)
    assert "match" in msg.lower(), msg  # "does not match" (hsm) or "key values mismatch" (OpenSSL)
    # control: the matching certificate is accepted
    good = ca.issue_client(mine.public_key_pem, cn="match", name="mine")
    ok = run_tls_child({"op": "context", "cafile": str(ca.cert_path), "cert": str(good), "key_uri": mine.uri,
                        "token": token_dict(token.config)}, route=tls_route)
    assert ok["ok"] and ok["route"] == tls_route, ok


@one_tls_route  # the message is hsm.tls's own; that each route's key is checked: the test above
def test_mismatch_message_names_certificate_and_key(token, tls_route, ca):
    worker.generate_key(token.config, "mine", "ec-p256")
    other = worker.generate_key(token.config, "other", "ec-p256")
    mine = worker.describe_key(token.config, "mine")
    cert = ca.issue_client(other.public_key_pem, cn="mismatch", name="other")
    answer = run_tls_child({"op": "context", "cafile": str(ca.cert_path), "cert": str(cert), "key_uri": mine.uri,
                            "token": token_dict(token.config)}, route=tls_route)
    assert not answer["ok"], answer
    msg = _assert_one_line(answer, token.pin)
    assert "does not match" in msg and str(cert) in msg and mine.uri in msg, msg


# --- PIN attempts, counted by OpenSC's pkcs11-spy between OpenSSL and the token -----------------------------------

SPY = next(iter(sorted(glob.glob("/usr/lib/*/pkcs11/pkcs11-spy.so") + glob.glob("/usr/lib/pkcs11/pkcs11-spy.so"))), "")


def _spied(req: dict, token, log) -> dict:
    """Environment for a TLS child whose token module is pkcs11-spy in front of the token's (req changed to match).
    The spy logs every call, the PIN too: its log is made 0600 before the spy appends to it."""
    assert SPY, "pkcs11-spy.so (package opensc) not found"
    write_secret(log, "")
    req["token"]["module"] = SPY
    return {"PKCS11SPY": token.module, "PKCS11SPY_OUTPUT": str(log)}


PROVIDER_ROUTE = pytest.mark.skipif("provider" not in selected_routes(),
                                    reason="this run leaves the provider route out ($TESSERA_TEST_ROUTES)")
BOTH_ROUTES = pytest.mark.skipif(len(selected_routes()) < 2,
                                 reason="this run tests one TLS route only ($TESSERA_TEST_ROUTES)")


def _logins(log) -> list[str]:
    """The return value of each C_Login in a pkcs11-spy log, in order."""
    return re.findall(r"\bC_Login\n(?:.*\n)*?Returned:\s+\d+ (\w+)", log.read_text())


def test_one_wrong_pin_attempt_is_one_login(device, ca, tmp_path):
    """On each route, a wrong PIN is one clear PinError and reaches the token once: neither route tries it again
    (pkcs11-provider asks for the PIN once per slot and retry; hsm.tls answers the first request only), and a forced
    route never falls back."""
    wrong = secrets.token_hex(8)
    write_secret(tmp_path / "wrong-pin", wrong)
    req = _request("context", ca, device)
    req["token"]["pin_source"] = f"file:{tmp_path / 'wrong-pin'}"
    log = tmp_path / "spy-wrong.log"
    answer = run_tls_child(req, env=child_env(device["route"], **_spied(req, device["token"], log)))
    assert answer["error_type"] == "PinError", answer
    msg = _assert_one_line(answer, wrong, device["token"].pin)
    assert "wrong PIN" in msg, msg
    assert wrong not in answer["_stderr"] and device["token"].pin not in answer["_stderr"]
    assert _logins(log) == ["CKR_PIN_INCORRECT"], log.read_text()[-3000:]
    # control: the spy sees the one login of the right PIN, and the key loads through it on the same route
    req = _request("context", ca, device)
    log = tmp_path / "spy-right.log"
    answer = run_tls_child(req, env=child_env(device["route"], **_spied(req, device["token"], log)))
    assert answer["ok"] and answer["route"] == device["route"], answer
    assert _logins(log) == ["CKR_OK"], log.read_text()[-3000:]


@BOTH_ROUTES
@one_tls_route
def test_a_wrong_pin_is_not_retried_on_the_engine(device, ca, tmp_path):
    """The product's own choice (no route forced, both installed): the provider's wrong PIN is final, the engine
    does not try it again (it did: the provider leaves no error behind, which looked like 'provider unusable')."""
    if {"provider", "engine"} - set(available_routes()):
        pytest.fail(f"both routes must be installed here (./dev.sh setup installs them): {available_routes()}")
    write_secret(tmp_path / "wrong-pin", "not-" + device["token"].pin)
    req = _request("context", ca, device)
    req["token"]["pin_source"] = f"file:{tmp_path / 'wrong-pin'}"
    log = tmp_path / "spy.log"
    env = child_env(**_spied(req, device["token"], log))
    env.pop("TESSERA_TLS_ROUTE", None)
    answer = run_tls_child(req, env=env)
    assert answer["error_type"] == "PinError", answer
    assert "using the libp11 engine" not in answer["_stderr"], answer["_stderr"]
    assert _logins(log) == ["CKR_PIN_INCORRECT"], log.read_text()[-3000:]


@one_tls_route  # checked before either route is used
def test_missing_module(device, ca, tmp_path):
    missing = str(tmp_path / "libmissing-pkcs11.so")
    req = _request("context", ca, device)
    req["token"]["module"] = missing
    answer = tls_child(req, device)
    assert not answer["ok"], answer
    msg = _assert_one_line(answer, device["token"].pin)
    assert answer["error_type"] == "ModuleNotFound" and missing in msg, answer


def test_missing_key(device, ca):
    req = _request("context", ca, device)
    req["key_uri"] = "pkcs11:token=tessera;object=no-such-key;type=private"
    answer = tls_child(req, device)
    assert not answer["ok"], answer
    assert answer["error_type"] == "HsmError", answer  # not a PinError: the PIN was right, the key is missing
    msg = _assert_one_line(answer, device["token"].pin)
    assert "no-such-key" in msg


def test_missing_token(device, ca, tmp_path):
    """No token matches: a plain HsmError (retried by the agent, a token may come back) naming the URI, no login."""
    req = _request("context", ca, device)
    req["key_uri"] = "pkcs11:token=no-such-token;object=device;type=private"
    log = tmp_path / "spy.log"
    answer = run_tls_child(req, env=child_env(device["route"], **_spied(req, device["token"], log)))
    assert answer["error_type"] == "HsmError", answer
    assert "no-such-token" in _assert_one_line(answer, device["token"].pin)
    assert _logins(log) == [], log.read_text()[-3000:]


@BOTH_ROUTES
@one_tls_route
def test_engine_takes_over_from_a_provider_that_does_not_load(device, ca, tmp_path):
    """The product's own choice, the provider failing before any PIN use: the engine loads the key (warned)."""
    broken = tmp_path / "pkcs11.so"
    broken.write_bytes(b"\x7fELF not a provider")
    env = child_env(TESSERA_PKCS11_PROVIDER=str(broken))
    env.pop("TESSERA_TLS_ROUTE", None)
    answer = run_tls_child(_request("context", ca, device), env=env)
    assert answer["ok"] and answer["route"] == "engine", answer
    assert "cannot load pkcs11-provider from" in answer["_stderr"] and "using the libp11 engine" in answer["_stderr"]
    # forced, the provider's failure is the answer
    answer = run_tls_child(_request("context", ca, device),
                           env=child_env("provider", TESSERA_PKCS11_PROVIDER=str(broken)))
    assert answer["error_type"] == "TlsRouteError" and str(broken) in answer["error"], answer


def test_pin_file_mode(device, ca, tmp_path):
    pin_file = tmp_path / "open-pin"
    write_secret(pin_file, device["token"].pin)
    pin_file.chmod(0o644)
    req = _request("context", ca, device)
    req["token"]["pin_source"] = f"file:{pin_file}"
    answer = tls_child(req, device)
    assert not answer["ok"], answer
    assert answer["error_type"] == "PinError", answer
    msg = _assert_one_line(answer, device["token"].pin)
    assert "0644" in msg


@one_tls_route
def test_provider_route_unavailable(device, ca, tmp_path):
    missing = tmp_path / "nowhere" / "pkcs11.so"
    answer = run_tls_child(_request("context", ca, device),
                           env=child_env("provider", TESSERA_PKCS11_PROVIDER=str(missing)))
    assert not answer["ok"], answer
    assert answer["error_type"] == "TlsRouteError", answer
    msg = _assert_one_line(answer, device["token"].pin)
    assert "provider" in msg and "not installed" in msg and "TESSERA_PKCS11_PROVIDER" in msg, msg


@PROVIDER_ROUTE
@one_tls_route
def test_provider_outside_openssls_module_directory(device, ca, tmp_path):
    """pkcs11-provider found outside OpenSSL's module directory is loaded by the path it was found at (by name,
    OpenSSL looks only in $OPENSSL_MODULES, here an empty directory, and fails with a DSO error)."""
    copy = tmp_path / "elsewhere" / "pkcs11.so"
    copy.parent.mkdir()
    shutil.copy2(provider_path() or pytest.fail("pkcs11-provider is not installed (./dev.sh setup installs it)"),
                 copy)
    (tmp_path / "empty").mkdir()
    answer = run_tls_child(_request("context", ca, device),
                           env=child_env("provider", TESSERA_PKCS11_PROVIDER=str(copy),
                                         OPENSSL_MODULES=str(tmp_path / "empty")))
    assert answer["ok"] and answer["route"] == "provider", answer


@one_tls_route
def test_unknown_route_name(device, ca):
    answer = run_tls_child(_request("context", ca, device), env=child_env(TESSERA_TLS_ROUTE="pkcs11"))
    assert not answer["ok"], answer
    assert answer["error_type"] == "TlsRouteError", answer
    msg = _assert_one_line(answer)
    assert "'pkcs11'" in msg



@pytest.mark.skip(reason="needs a Python whose ssl module statically links its own OpenSSL; not available here")
def test_statically_linked_python_is_refused():
    """hsm.tls refuses such a Python with TlsRouteError; this machine only has the Debian python3 (shared libssl)."""
