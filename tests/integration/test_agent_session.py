"""`tessera-agent run` / `status`: connect over mTLS with the token key, publish telemetry, answer commands.

The hub logs every device message to logs/device-messages.jsonl (telemetry_log = true); commands go through
`tessera-hub device send`, which prints the device's JSON acknowledgement.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from datetime import datetime, timezone

import pytest

from tests.integration.agentfixtures import (  # noqa: F401  (hub, make_device, make_token_device are fixtures)
    device_messages, hub, make_device, make_token_device, one_line, run_agent_cli, telemetry, wait_until,
)

pytestmark = pytest.mark.integration

STATUS_FIELDS = {"device_id", "enrolled", "cert_serial", "cert_not_after", "cert_expired", "key_uri", "connection",
                 "since", "last_error", "spool_depth", "pid", "broker", "mqtt_protocol"}


def send(hub, device_id: str, command: str, *args: str):
    proc = hub.cli("device", "send", device_id, command, *args, "--wait", "15")
    ack = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else None
    return proc, ack


def test_connect_publish_and_answer_commands(hub, make_token_device):
    """On each token type (SoftHSM2, TPM 2.0 through tpm2-pkcs11): every handshake signs with the token key."""
    dev, token = make_token_device("sess-1", interval=0.2)
    dev.enroll_ok(token)
    dev.start()
    dev.wait_state("online", 30)

    # the hub's registry shows the device online (retained status message seen by the hub)
    wait_until(lambda: hub.device_list()[dev.id]["online"], 15, f"device list shows {dev.id} online")

    # telemetry arrives: the device's envelope, seq counting from 1 without gaps
    tel = wait_until(lambda: (t := telemetry(hub, dev.id)) and len(t) >= 5 and t, 15, "5 telemetry messages")
    seqs = [t["seq"] for t in tel]
    assert sorted(set(seqs)) == list(range(1, max(seqs) + 1)), seqs
    first = tel[0]
    assert first["device"] == dev.id and set(first) == {"device", "ts", "seq", "readings"}
    ts = datetime.fromisoformat(first["ts"].replace("Z", "+00:00"))
    assert abs((datetime.now(timezone.utc) - ts).total_seconds()) < 60
    assert "load_1" in first["readings"] and "mem_total_kb" in first["readings"]

    # commands: ping, report, and an unknown one (refused in the ack, exit 1)
    proc, ack = send(hub, dev.id, "ping")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ack["ok"] is True and ack["result"] == {"pong": True}
    proc, ack = send(hub, dev.id, "report")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ack["result"]["device"] == dev.id and ack["result"]["state"] == "online"
    assert ack["result"]["pid"] == dev.proc.pid
    assert ack["result"]["cert_not_after"] == dev.identity()["not_after"]
    proc, ack = send(hub, dev.id, "selfdestruct")
    assert proc.returncode == 1 and ack["ok"] is False and "unknown command" in ack["error"], proc.stdout
    # the acks travelled as device messages too
    acks = [r for r in device_messages(hub, dev.id) if r["kind"] == "commands/ack"]
    assert len(acks) >= 3

    # the running agent's view
    st = dev.status()
    assert st["connection"] == "online" and st["enrolled"] is True and st["last_error"] is None

    # SIGTERM: clean exit 0, status 'stopped', the hub sees it go offline
    started = time.monotonic()
    assert dev.stop() == 0, dev.log_text()
    assert time.monotonic() - started < 5
    assert dev.status()["connection"] == "stopped"
    wait_until(lambda: not hub.device_list()[dev.id]["online"], 15, f"device list shows {dev.id} offline")
    assert "Traceback" not in dev.log_text(), dev.log_text()


def test_status_json_fields(hub, make_device):
    dev, token = make_device("sess-2", interval=0.5)
    # before enrollment
    st = dev.status()
    assert set(st) == STATUS_FIELDS
    assert st["enrolled"] is False and st["cert_serial"] is None and st["key_uri"] is None
    assert st["device_id"] == "sess-2" and st["connection"] == "not running"

    dev.enroll_ok(token)
    ident = dev.identity()
    st = dev.status()
    assert set(st) == STATUS_FIELDS
    assert st["enrolled"] is True and st["cert_expired"] is False
    assert st["cert_serial"] == ident["serial"] and st["cert_not_after"] == ident["not_after"]
    assert st["key_uri"] == ident["key_uri"]
    assert st["connection"] == "not running" and st["spool_depth"] is None

    dev.start()
    dev.wait_state("online", 30)
    time.sleep(1)
    assert dev.stop() == 0
    st = dev.status()
    assert set(st) == STATUS_FIELDS
    assert st["connection"] == "stopped" and st["last_error"] is None
    assert st["spool_depth"] == 0
    assert st["mqtt_protocol"] == "5" and st["broker"] == f"localhost:{hub.mqtt_port}"  # Mosquitto speaks 5
    since = datetime.fromisoformat(st["since"])
    assert abs((datetime.now(timezone.utc) - since).total_seconds()) < 60
    # the plain (rich) form shows the same keys
    proc = dev.cli("status")
    assert proc.returncode == 0
    for key in STATUS_FIELDS:
        assert key in proc.stdout


def test_status_reports_spool_depth_while_running(hub, make_device):
    dev, token = make_device("sess-3", interval=0.5)
    dev.enroll_ok(token)
    dev.start()
    dev.wait_state("online", 30)
    try:
        st = dev.status()
        assert st["connection"] == "online"
        assert isinstance(st["spool_depth"], int), st
    finally:
        assert dev.stop() == 0


def test_status_does_not_claim_online_after_the_agent_died(hub, make_device):
    dev, token = make_device("sess-4", interval=0.5)
    dev.enroll_ok(token)
    dev.start()
    dev.wait_state("online", 30)
    pid = dev.proc.pid
    dev.kill9()
    assert not os.path.exists(f"/proc/{pid}"), "the agent should be gone"
    st = dev.status()
    assert st["connection"] != "online", st


def test_run_on_a_state_dir_that_is_not_enrolled_exits_1(hub, make_device):
    dev, _ = make_device("sess-5")
    proc = dev.cli("run", timeout=30)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = one_line(proc.stderr)
    assert "not enrolled" in err and "tessera-agent enroll" in err, err
    assert "Traceback" not in proc.stderr
    assert not (dev.state / "status.json").exists()


def test_run_with_a_missing_config_file_exits_1(tmp_path):
    proc = run_agent_cli("run", "-c", str(tmp_path / "nope.toml"), timeout=30)
    assert proc.returncode == 1
    assert "does not exist" in one_line(proc.stderr), proc.stderr


def _clean_error(proc) -> str:
    """One `error: ...` message, no traceback."""
    err = one_line(proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr[-1500:]
    assert err.startswith("error:"), err
    return err


_ids = itertools.count(1)


@pytest.fixture
def enrolled(make_device):
    dev, token = make_device(f"sess-x{next(_ids)}", interval=0.2)
    dev.enroll_ok(token)
    return dev


def test_bad_spool_policy_is_a_clean_error(enrolled):
    """Control for the cases below: a setting agent/config.py validates gives one clean error line."""
    proc = enrolled.cli("run", "--set", "spool.drop_policy=sometimes", timeout=30)
    assert proc.returncode == 1
    assert "drop_policy" in _clean_error(proc)


@pytest.mark.parametrize("setting, words", [
    ("telemetry.source=/nonexistent/telemetry-prog", "not an executable"),
    ("spool.max_messages=0", "max_messages"),
])
def test_bad_settings_are_clean_errors(enrolled, setting, words):
    proc = enrolled.cli("run", "--set", setting, timeout=30)
    assert proc.returncode == 1
    assert words in _clean_error(proc)


def test_second_run_on_the_same_state_dir_is_refused(enrolled, hub):
    dev = enrolled
    dev.start()
    dev.wait_state("online", 30)
    proc = dev.cli("run", timeout=30)
    assert proc.returncode == 1
    assert "in use by another process" in one_line(proc.stdout + proc.stderr)
    # the first agent is undisturbed: still the owner of status.json, still online, still publishing
    n = len(telemetry(hub, dev.id))
    time.sleep(1.0)
    assert dev.proc.poll() is None
    st = dev.status_file()
    assert st["state"] == "online" and st["pid"] == dev.proc.pid
    assert len(telemetry(hub, dev.id)) > n
    assert dev.stop() == 0


def test_second_run_error_is_one_clean_line(enrolled):
    dev = enrolled
    dev.start()
    dev.wait_state("online", 30)
    try:
        proc = dev.cli("run", timeout=30)
        assert proc.returncode == 1
        assert "in use by another process" in _clean_error(proc)
    finally:
        assert dev.stop() == 0
