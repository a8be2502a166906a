"""Interop: Mosquitto's own client (`mosquitto_pub`) publishes as the device with the device's token key.

What works with mosquitto-clients 2.0.11 on Debian 12 (libp11 engine, libengine-pkcs11-openssl):

    mosquitto_pub --cafile ROOT --cert STATE/cert.pem \\
                  --tls-engine pkcs11 --keyform engine --key 'pkcs11:token=...;object=...;type=private;id=...'

with two workarounds:

1. libmosquitto's mosquitto_tls_set() fopen()s the --key value even with --keyform engine ("Problem setting TLS
   options: File not found"); an empty placeholder file named exactly like the URI in the working directory
   satisfies that check (a PKCS#11 URI has no '/'), after which libmosquitto hands the string to
   ENGINE_load_private_key(), where libp11 parses it as a URI.
2. The PIN must not be in argv (so not --tls-engine-kpass-sha1, which libp11 does not support anyway): an
   OPENSSL_CONF file (0600) configures the engine with ``engine_id = pkcs11``, ``MODULE_PATH``, ``PIN`` and
   ``init = 1``, and SOFTHSM2_CONF points at the device's token. The engine section must NOT have a
   ``dynamic_path`` line: mosquitto_pub's ENGINE_by_id("pkcs11") has already loaded the engine before libmosquitto
   loads the OpenSSL config, so a dynamic_path load fails ("already exists") and OpenSSL silently drops the whole
   config; the engine then runs unconfigured (p11-kit proxy module, PIN prompt: "No PIN code was entered").
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.integration.agentfixtures import (  # noqa: F401  (hub, make_device are fixtures)
    agent_env, broker_log, device_messages, hub, make_device, wait_until, write_secret,
)

pytestmark = pytest.mark.integration


def openssl_conf(path, token, with_pin: bool = True):
    lines = ["openssl_conf = openssl_init", "", "[openssl_init]", "engines = engine_section", "",
             "[engine_section]", "pkcs11 = pkcs11_section", "", "[pkcs11_section]", "engine_id = pkcs11",
             f"MODULE_PATH = {token.module}"]
    if with_pin:
        lines.append(f"PIN = {token.pin}")
    lines += ["init = 1", ""]
    return write_secret(path, "\n".join(lines))


def mosquitto_pub(hub, dev, workdir, conf, payload: str) -> subprocess.CompletedProcess:
    key_uri = dev.identity()["key_uri"]
    workdir.mkdir(exist_ok=True)
    assert "/" not in key_uri
    (workdir / key_uri).touch()                       # workaround 1: libmosquitto fopen()s --key
    argv = ["mosquitto_pub", "-h", "localhost", "-p", str(hub.mqtt_port), "--cafile", str(hub.root_pem),
            "--cert", str(dev.state / "cert.pem"), "--tls-engine", "pkcs11", "--keyform", "engine",
            "--key", key_uri, "-i", dev.id, "-q", "1", "-t", f"devices/{dev.id}/events", "-m", payload, "-d"]
    assert dev.token.pin not in " ".join(argv)
    env = dict(agent_env(), OPENSSL_CONF=str(conf), SOFTHSM2_CONF=str(dev.token.conf))
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env, cwd=workdir,
                          stdin=subprocess.DEVNULL)


def test_mosquitto_pub_with_the_token_key_publishes_as_the_device(hub, make_device, tmp_path):
    dev, token = make_device("interop-1")
    dev.enroll_ok(token)
    conf = openssl_conf(tmp_path / "openssl-pkcs11.cnf", dev.token)
    payload = json.dumps({"via": "mosquitto_pub", "n": 1})
    proc = mosquitto_pub(hub, dev, tmp_path / "work", conf, payload)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "received CONNACK (0)" in out and "received PUBACK" in out, out
    rows = wait_until(lambda: [r for r in device_messages(hub, "interop-1", "events") if r["payload"] == payload],
                      10, "the event in device-messages.jsonl")
    assert rows[0]["device"] == "interop-1"
    # the broker authenticated it by the token-backed certificate: username = CN
    assert re.search(r"New client connected from 127\.0\.0\.1:\d+ as interop-1 \(.*u'interop-1'\)", broker_log(hub))
    assert dev.token.pin not in out


def test_mosquitto_pub_without_the_pin_cannot_use_the_key(hub, make_device, tmp_path):
    """Control: the same command with an engine config lacking the PIN fails: the key really is in the token."""
    dev, token = make_device("interop-2")
    dev.enroll_ok(token)
    conf = openssl_conf(tmp_path / "openssl-nopin.cnf", dev.token, with_pin=False)
    proc = mosquitto_pub(hub, dev, tmp_path / "work", conf, "should-not-arrive")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Unable to load engine private key" in proc.stdout + proc.stderr
    assert device_messages(hub, "interop-2") == []
