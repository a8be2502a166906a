"""The first hour on a device (issue 15): the mistakes a new operator makes get one clear error and an exit code.

A real `tessera-hub serve` (module fixture), one SoftHSM token per device, the `tessera-agent` console script.
Cost: one hub (~10 s) and a few enrollments (~3 s each).
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.integration.agentfixtures import (  # noqa: F401  (hub, make_device are fixtures)
    hub, make_device, one_line,
)

pytestmark = pytest.mark.integration


def test_run_with_a_pin_file_others_can_read_exits_at_once(hub, make_device):  # noqa: F811
    dev, token = make_device("first-pin")
    dev.enroll_ok(token)
    os.chmod(dev.token.pin_file, 0o644)
    proc = dev.start()
    try:
        rc = proc.wait(timeout=30)  # it used to retry forever ("connect failed ... retrying in 1.3 s")
    except subprocess.TimeoutExpired:
        raise AssertionError(f"tessera-agent run kept retrying a configuration error:\n{dev.log_text()[-2000:]}")
    log = one_line(dev.log_text())
    assert rc == 1, log
    assert "error:" in log and "0644" in log and f"chmod 600 {dev.token.pin_file}" in log, log
    assert "retrying" not in log, log
    assert dev.status_file()["state"] == "failed"


def _pin(tmp_path):
    from tests.integration.agentfixtures import write_secret

    return write_secret(tmp_path / "pin", "4711-first-hour\n")


def test_token_init_creates_a_missing_softhsm_config_and_token_dir(tmp_path):
    from tests.integration.agentfixtures import run_agent_cli

    conf = tmp_path / "not" / "yet" / "softhsm2.conf"
    pin = _pin(tmp_path)
    proc = run_agent_cli("token", "init", "--token-label", "fresh", "--pin-source", f"file:{pin}",
                         "--softhsm-conf", str(conf))
    assert proc.returncode == 0, proc.stdout + proc.stderr  # it used to say "C_Initialize failed with CKR 0x5"
    assert "token fresh initialized" in one_line(proc.stdout), proc.stdout
    assert os.stat(conf).st_mode & 0o777 == 0o600
    assert os.stat(conf.parent / "tokens").st_mode & 0o777 == 0o700
    assert any((conf.parent / "tokens").iterdir()), "no token was written into the token directory"
    key = run_agent_cli("key", "generate", "--label", "k1", "--token-label", "fresh", "--pin-source", f"file:{pin}",
                        "--softhsm-conf", str(conf), "--json")
    assert key.returncode == 0, key.stderr
    again = run_agent_cli("token", "init", "--token-label", "fresh", "--pin-source", f"file:{pin}",
                          "--softhsm-conf", str(conf))
    assert again.returncode == 1 and "already exists" in again.stderr, again.stdout + again.stderr


@pytest.mark.parametrize("where", ["uncreatable", "tokendir-missing", "bad-pin-source"])
def test_token_init_with_an_unusable_softhsm_config_is_one_line_naming_the_path(tmp_path, where):
    from tests.integration.agentfixtures import run_agent_cli

    pin_source = f"file:{_pin(tmp_path)}"
    if where == "uncreatable":
        conf, named = "/proc/tessera-nosuch/softhsm2.conf", "/proc/tessera-nosuch/softhsm2.conf"
    elif where == "tokendir-missing":
        conf = tmp_path / "softhsm2.conf"
        conf.write_text(f"directories.tokendir = {tmp_path / 'gone'}\nobjectstore.backend = file\n")
        named = str(tmp_path / "gone")
    else:
        conf, pin_source, named = tmp_path / "new" / "softhsm2.conf", "env:TESSERA_NO_SUCH_PIN_VAR", "TESSERA_NO_SUCH"
    proc = run_agent_cli("token", "init", "--token-label", "t", "--pin-source", pin_source, "--softhsm-conf",
                         str(conf))
    err = one_line(proc.stderr)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert err.startswith("error:") and named in err, err
    assert "CKR" not in err, err
    if where == "bad-pin-source":
        assert not (tmp_path / "new").exists(), "a bad PIN source must create nothing"


def test_enrolling_another_device_id_with_a_token_holding_a_devices_key_is_refused(hub, make_device):  # noqa: F811
    first, token_a = make_device("first-owner")
    first.enroll_ok(token_a)
    from agent.keyowner import owner_of
    from hsm.uri import parse

    assert owner_of(parse(first.identity()["key_uri"]).id) == "first-owner", first.identity()["key_uri"]
    second, token_b = make_device("first-intruder")
    second.token = first.token  # the same token (and key label), its own state directory
    second.write_config()
    token_file = second.token_file(token_b)
    proc = second.enroll(token_file)
    err = one_line(proc.stderr)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # it used to say "reusing token key" and go ahead
    assert "belongs to device 'first-owner', not 'first-intruder'" in err, err
    assert "reusing" not in proc.stdout + proc.stderr
    assert hub.show("first-intruder")["certificates"] == []
    assert token_file.exists(), "the enrollment token must be kept for a retry with the right token"
    assert len(first.private_keys()) == 1
    # the owner's own session still works with its (marked) key through the TLS stack
    first.start()
    first.wait_state("online", timeout=30)
    first.stop()


def test_enroll_takes_a_pin_source_and_the_device_id_from_the_bundle(hub, make_device):  # noqa: F811
    from tests.integration.agentfixtures import agent_env, run_agent_cli, write_secret

    dev, token = make_device("first-bundle")
    dev.write_config(device_id="")
    dev.config.write_text(dev.config.read_text().replace(f"file:{dev.token.pin_file}", "file:/nonexistent/pin"))
    lone = dev.token_file(token, "lone-token")
    # no device id anywhere: one line saying what to give
    proc = dev.enroll(lone, "--pin-source", f"file:{dev.token.pin_file}")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert one_line(proc.stderr).startswith("error: no device id: give --device-id"), proc.stderr
    # a factory bundle names the device next to its token; the PIN comes from --pin-source (env:NAME here)
    bundle = dev.base / "bundle"
    bundle.mkdir()
    (bundle / "agent.toml").write_text('device_id = "first-bundle"\n')
    token_file = write_secret(bundle / "enroll-token", token + "\n")
    proc = dev.enroll(token_file)  # the configured PIN file does not exist
    assert proc.returncode == 1 and "/nonexistent/pin" in one_line(proc.stderr), proc.stdout + proc.stderr
    pin = dev.token.pin_file.read_text().strip()
    proc = run_agent_cli("enroll", "--token-file", str(token_file), "--ca-file", str(hub.root_pem), "--pin-source",
                         "env:TESSERA_TEST_TOKEN_PIN", "-c", str(dev.config),
                         env=agent_env(TESSERA_TEST_TOKEN_PIN=pin))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "enrolled first-bundle" in one_line(proc.stdout), proc.stdout
    assert pin not in proc.stdout + proc.stderr
    assert dev.identity()["device_id"] == "first-bundle"


def test_enroll_with_options_only_writes_the_configuration_run_and_status_use(hub, make_device):  # noqa: F811
    import json
    import tomllib

    from tests.integration.agentfixtures import run_agent_cli

    dev, token = make_device("first-options")
    dev.config.unlink()
    t = dev.token
    conf = dev.base / "etc" / "agent.toml"                 # not there yet, nor its directory
    proc = run_agent_cli("enroll", "-c", str(conf), "--token-file", str(dev.token_file(token)),
                         "--ca-file", str(hub.root_pem), "--hub", f"https://localhost:{hub.port}",
                         "--device-id", dev.id, "--pin-source", f"file:{t.pin_file}",
                         "--set", f"token.label={t.label}", "--set", f"token.softhsm_conf={t.conf}",
                         "--set", f"token.module={t.module}", "--set", f"state_dir={dev.state}",
                         "--set", f"mqtt_port={hub.mqtt_port}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"wrote {conf}" in one_line(proc.stdout), proc.stdout
    written = tomllib.loads(conf.read_text())
    assert written["device_id"] == dev.id and written["token"]["pin_source"] == f"file:{t.pin_file}"
    assert written["hub_url"] == f"https://localhost:{hub.port}"
    status = run_agent_cli("status", "-c", str(conf), "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["enrolled"] is True, status.stdout + status.stderr
    dev.config.write_text(conf.read_text())                # Device.start runs `run -c <base>/agent.toml`
    dev.start()
    dev.wait_state("online", 30)
    assert dev.stop() == 0
