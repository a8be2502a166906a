"""Interop: third-party OpenSSL tools (`mosquitto_pub`, `openssl s_client`) use the device's token key, on SoftHSM2
and on a TPM 2.0 (tpm2-pkcs11), through the route `tessera-agent tls-config` sets up, and through the other.

The pkcs11-provider route (what tls-config writes, agent/tlsconfig.py): an OPENSSL_CONF loading the provider with
the token's module and a file: PIN source, the key as a URI file (`--key device-key.pem`, a PEM block
``PKCS#11 PROVIDER URI`` the provider decodes; mosquitto 2.0.11 reads --key with SSL_CTX_use_PrivateKey_file) or as
the ``pkcs11:`` URI itself (openssl s_client opens -key through OSSL_STORE). Works with both token types.
``mosquitto_pub --key 'pkcs11:...'`` does not: libmosquitto fopen()s the --key value first ("Problem setting TLS
options: File not found") and then reads it as a PEM file, never through OSSL_STORE.

The libp11 engine route (`--tls-engine pkcs11 --keyform engine --key URI`, mosquitto-clients 2.0.11), two
workarounds needed even where it works:

1. libmosquitto's mosquitto_tls_set() fopen()s the --key value even with --keyform engine ("Problem setting TLS
   options: File not found"); an empty placeholder file named exactly like the URI in the working directory
   satisfies that check (a PKCS#11 URI has no '/'), after which libmosquitto hands the string to
   ENGINE_load_private_key(), where libp11 parses it as a URI.
2. The PIN must not be in argv (so not --tls-engine-kpass-sha1, which libp11 does not support anyway): an
   OPENSSL_CONF file (0600) configures the engine with ``engine_id = pkcs11``, ``MODULE_PATH``, ``PIN`` and
   ``init = 1``. The engine section must NOT have a ``dynamic_path`` line: mosquitto_pub's ENGINE_by_id("pkcs11")
   has already loaded the engine before libmosquitto loads the OpenSSL config, so a dynamic_path load fails
   ("already exists") and OpenSSL silently drops the whole config.

With a TPM key the engine route fails, and this is asserted, not skipped: libmosquitto makes the engine the
default for every algorithm (ENGINE_set_default(engine, ENGINE_METHOD_ALL)), so tpm2-tss's own crypto for the
TPM's salted auth session goes into the engine and fails ("Could not start Auth Session with the TPM", "Error
unsealing wrapping key"), the login fails and the key is "not found". Use the provider route with a TPM.

Routes follow the run's selection ($TESSERA_TEST_ROUTES, tests/helpers.py): a test of a route the run does not
select is skipped; a selected route that is not installed fails (./dev.sh setup installs both).

Cost: one enrolled device per token type (module scope), one short tool run per test.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess

import pytest

from tests.helpers import selected_routes
from tests.integration.agentfixtures import (  # noqa: F401  (hub is a fixture)
    agent_env, broker_log, device_messages, hub, new_device, wait_until, write_secret,
)

pytestmark = pytest.mark.integration

TPM_ENGINE_FAILURE = "Could not start Auth Session with the TPM"


def route(name: str) -> None:
    """Skip unless the run tests OpenSSL route `name`; fail if it does but the route is not installed."""
    from hsm.tls import available_routes

    if name not in selected_routes():
        pytest.skip(f"the {name} route is not selected ($TESSERA_TEST_ROUTES)")
    if name not in available_routes():
        pytest.fail(f"TLS route {name!r} is not installed here (./dev.sh setup installs it)")


@pytest.fixture(scope="module", params=["softhsm", "tpm"])
def tooldev(request, hub, tmp_path_factory):
    """(device, tls-config output) for an enrolled device on each token type; the token's env set meanwhile."""
    kind = request.param
    base = tmp_path_factory.mktemp(f"interop-{kind}")
    with pytest.MonkeyPatch.context() as mp:
        maker = None
        if kind == "tpm":
            from tests.integration.tpmfixtures import create_tpm_token

            stack = request.getfixturevalue("tpm_stack")
            store = base / "tpm-store"
            store.mkdir(mode=0o700)
            for name, value in dict(stack.env, TPM2_PKCS11_STORE=str(store)).items():
                mp.setenv(name, value)

            def maker(b, device_id):
                return create_tpm_token(stack, b / "tpm", label=device_id[:32], store=store)
        dev, token = new_device(hub, base, f"interop-{kind}", token_maker=maker)
        try:
            dev.enroll_ok(token)
            dev.kind = kind
            yield dev
        finally:
            dev.destroy()


@pytest.fixture(scope="module")
def provider_tools(tooldev):
    """(device, what `tessera-agent tls-config` printed) for the provider-route tests."""
    route("provider")
    proc = tooldev.cli("tls-config", "--out", str(tooldev.base.parent / "tools"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tooldev, proc.stdout


def tool_env(dev, **extra) -> dict[str, str]:
    env = agent_env(**extra)
    if getattr(dev.token, "conf", None):
        env["SOFTHSM2_CONF"] = str(dev.token.conf)
    return env


def printed(stdout: str, what: str) -> str:
    """The command line tls-config printed after `what:`."""
    return next(line.split(":", 1)[1].strip() for line in stdout.splitlines() if line.startswith(f"{what}:"))


def sent(hub, dev, payload: str) -> list[dict]:
    return wait_until(lambda: [r for r in device_messages(hub, dev.id, "events") if r["payload"] == payload],
                      10, f"{payload!r} in device-messages.jsonl")


def test_tls_config_writes_the_provider_files(provider_tools):
    dev, out = provider_tools
    tools = dev.base.parent / "tools"
    conf, key = tools / "openssl-pkcs11.cnf", tools / "device-key.pem"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    text = conf.read_text()
    assert f"pkcs11-module-path = {dev.token.module}" in text
    assert f"pkcs11-module-token-pin = file:{dev.token.pin_file}" in text
    assert dev.token.pin not in text and dev.token.pin not in out
    assert key.read_text().startswith("-----BEGIN PKCS#11 PROVIDER URI-----\n")
    assert f"OPENSSL_CONF={conf}" in printed(out, "publish")
    # the provider itself reads the URI file as the token key: its public key is the certificate's
    proc = subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout"], capture_output=True, text=True,
                          timeout=30, env=tool_env(dev, OPENSSL_CONF=str(conf)), stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    cert = subprocess.run(["openssl", "x509", "-in", str(dev.state / "cert.pem"), "-noout", "-pubkey"],
                          capture_output=True, text=True, timeout=30, check=True)
    assert proc.stdout == cert.stdout


def test_mosquitto_pub_through_the_provider_publishes_as_the_device(hub, provider_tools):
    """The command line tls-config printed, run as printed (only the message changed): CONNACK, PUBACK, and the
    broker named the client by its token-backed certificate."""
    dev, out = provider_tools
    payload = json.dumps({"via": "mosquitto_pub", "route": "provider", "token": dev.kind})
    line = printed(out, "publish").replace("-m hello", f"-m {payload!r}") + " -d"
    proc = subprocess.run(["sh", "-c", line], capture_output=True, text=True, timeout=30, env=tool_env(dev),
                          stdin=subprocess.DEVNULL)
    both = proc.stdout + proc.stderr
    assert proc.returncode == 0, both
    assert "received CONNACK (0)" in both and "received PUBACK" in both, both
    assert sent(hub, dev, payload)[0]["device"] == dev.id
    assert re.search(rf"New client connected from 127\.0\.0\.1:\d+ as {dev.id} \(.*u'{dev.id}'\)", broker_log(hub))
    assert dev.token.pin not in both


def mqtt_connect(client_id: str) -> bytes:
    """An MQTT 3.1.1 CONNECT (clean session, keepalive 60) followed by DISCONNECT: the broker answers CONNACK."""
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    return b"\x10" + bytes([len(body)]) + body + b"\xe0\x00"


def test_openssl_s_client_through_the_provider_authenticates_with_the_token_key(hub, provider_tools):
    """openssl s_client as printed (the key as its pkcs11: URI): the handshake verifies, the broker accepts the
    MQTT CONNECT of a client it authenticated by the token-backed certificate (CONNACK 0)."""
    dev, out = provider_tools
    argv = ["sh", "-c", printed(out, "handshake") + " -quiet"]
    proc = subprocess.run(argv, input=mqtt_connect(dev.id), capture_output=True, timeout=30, env=tool_env(dev))
    err = proc.stderr.decode(errors="replace")
    assert b"\x20\x02\x00\x00" in proc.stdout, (proc.stdout, err)
    assert dev.token.pin not in err


def engine_conf(path, token, with_pin: bool = True):
    lines = ["openssl_conf = openssl_init", "", "[openssl_init]", "engines = engine_section", "",
             "[engine_section]", "pkcs11 = pkcs11_section", "", "[pkcs11_section]", "engine_id = pkcs11",
             f"MODULE_PATH = {token.module}"]
    if with_pin:
        lines.append(f"PIN = {token.pin}")
    lines += ["init = 1", ""]
    return write_secret(path, "\n".join(lines))


def mosquitto_pub_engine(hub, dev, workdir, conf, payload: str) -> subprocess.CompletedProcess:
    key_uri = dev.identity()["key_uri"]
    workdir.mkdir(exist_ok=True)
    assert "/" not in key_uri
    (workdir / key_uri).touch()                       # workaround 1: libmosquitto fopen()s --key
    argv = ["mosquitto_pub", "-h", "localhost", "-p", str(hub.mqtt_port), "--cafile", str(hub.root_pem),
            "--cert", str(dev.state / "cert.pem"), "--tls-engine", "pkcs11", "--keyform", "engine",
            "--key", key_uri, "-i", dev.id, "-q", "1", "-t", f"devices/{dev.id}/events", "-m", payload, "-d"]
    assert dev.token.pin not in " ".join(argv)
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, env=tool_env(dev, OPENSSL_CONF=str(conf)),
                          cwd=workdir, stdin=subprocess.DEVNULL)


def test_mosquitto_pub_through_the_engine_works_on_softhsm_and_fails_on_a_tpm(hub, tooldev, tmp_path):
    route("engine")
    dev = tooldev
    conf = engine_conf(tmp_path / "openssl-engine.cnf", dev.token)
    payload = json.dumps({"via": "mosquitto_pub", "route": "engine", "token": dev.kind})
    proc = mosquitto_pub_engine(hub, dev, tmp_path / "work", conf, payload)
    out = proc.stdout + proc.stderr
    assert dev.token.pin not in out
    if dev.kind == "softhsm":
        assert proc.returncode == 0, out
        assert "received CONNACK (0)" in out and "received PUBACK" in out, out
        assert sent(hub, dev, payload)
    else:  # the documented failure (module docstring): the engine as default for all algorithms breaks tpm2-tss
        assert proc.returncode != 0, out
        assert TPM_ENGINE_FAILURE in out and "Unable to load engine private key" in out, out
        assert [r for r in device_messages(hub, dev.id, "events") if r["payload"] == payload] == []


def test_mosquitto_pub_through_the_engine_without_the_pin_cannot_use_the_key(hub, tooldev, tmp_path):
    """Control: an engine config lacking the PIN fails: the key really is in the token."""
    route("engine")
    dev = tooldev
    conf = engine_conf(tmp_path / "openssl-nopin.cnf", dev.token, with_pin=False)
    proc = mosquitto_pub_engine(hub, dev, tmp_path / "work", conf, "should-not-arrive")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Unable to load engine private key" in proc.stdout + proc.stderr
    assert [r for r in device_messages(hub, dev.id, "events") if r["payload"] == "should-not-arrive"] == []


def test_tls_config_refuses_an_env_pin_source(provider_tools, tmp_path):
    """pkcs11-provider reads the PIN itself, from a file: an env: PIN source is one clear error, nothing written."""
    dev, _ = provider_tools
    proc = dev.cli("tls-config", "--out", str(tmp_path / "t"), "--set", "token.pin_source=env:TOKEN_PIN")
    assert proc.returncode == 1
    assert "file: PIN source" in " ".join(proc.stderr.split()), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "t" / "openssl-pkcs11.cnf").exists()
    assert os.environ.get("TOKEN_PIN") is None
