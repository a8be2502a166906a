"""Status changes bite at once on the broker: revoke / suspend drop the live session and refuse the reconnect,
other devices are not disturbed, resume lets the device back in; offline changes apply at the next start.

The operator's command runs as its own process (`tessera-hub device revoke ...`, through the admin socket), and
the 1 s budget is measured from that process's start to the device's on_disconnect.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.integration.brokerfixtures import (ConnectRefused, MqttSession, assert_no_broker_left, audit, broker_hub,
                                              enroll_device, exchange, probe_cert, restart, session, sessions,
                                              wait_ready)
from tests.integration.hubfixtures import LENIENT_LIMITS, cli_env, hub_binary, init_hub

BUDGET = 1.0  # seconds from the CLI's start to the session drop
ADMINISTRATIVE_ACTION = 0x98  # MQTT v5 DISCONNECT reason code the dynsec kick sends


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with broker_hub(tmp_path_factory.mktemp("broker-revoke")) as h:
        yield h


def timed_cli(hub, *args: str) -> tuple[float, str]:
    """Run `tessera-hub ARGS --dir D` as a separate process; returns (its start, monotonic) and its output."""
    t0 = time.monotonic()
    proc = subprocess.run([hub_binary(), *args, "--dir", str(hub.dir)], capture_output=True, text=True,
                          env=cli_env(), timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"tessera-hub {' '.join(args)}: {proc.stderr}"
    return t0, " ".join(proc.stdout.split())


def assert_reconnect_refused(hub, dev) -> None:
    p12 = probe_cert(hub, dev.chain, dev.key, "1.2", client_id=dev.id)
    assert p12.stage == "tls" and "REVOKED" in p12.detail.upper(), f"TLS 1.2: {p12}"
    p13 = probe_cert(hub, dev.chain, dev.key, "1.3", client_id=dev.id)
    assert not p13.got_connack and p13.stage in ("tls", "closed"), f"TLS 1.3: {p13}"
    with pytest.raises(ConnectRefused):
        MqttSession(hub, dev.chain, dev.key, dev.id).connect(timeout=5)


def cut_while_connected(hub, target, bystander, command: tuple[str, ...]) -> str:
    """target and bystander connected and subscribed (QoS 1); run the command; check the cut and the refusal."""
    with sessions(session(hub, target), session(hub, bystander)) as (st, sb):
        assert st.subscribe(f"devices/{target.id}/#") == 1
        assert sb.subscribe(f"devices/{bystander.id}/#") == 1
        exchange(st, st, f"devices/{target.id}/telemetry", b"before")
        exchange(sb, sb, f"devices/{bystander.id}/telemetry", b"before")

        t0, out = timed_cli(hub, *command)
        assert st.disconnected.wait(5), f"{target.id}'s session was not dropped"
        elapsed = st.disconnect_at - t0
        assert elapsed < BUDGET, f"{target.id}'s session dropped {elapsed:.3f} s after the CLI started"
        assert st.disconnect_rc is not None and getattr(st.disconnect_rc, "value", None) == ADMINISTRATIVE_ACTION, \
            st.disconnect_rc
        assert "enforced by the running hub in" in out and "live session dropped" in out, out

        assert_reconnect_refused(hub, target)
        # the bystander was never disconnected and still exchanges messages
        assert not sb.disconnected.is_set(), f"{bystander.id} was disconnected ({sb.disconnect_rc})"
        exchange(sb, sb, f"devices/{bystander.id}/telemetry", b"after")
        assert sb.connected
    return out


def test_revoke_while_connected(hub, tmp_path):
    a = enroll_device(hub, "rv-a", tmp_path)
    b = enroll_device(hub, "rv-b", tmp_path)
    out = cut_while_connected(hub, a, b, ("device", "revoke", "rv-a", "--reason", "keyCompromise"))
    assert out.startswith("rv-a: revoked; 1 certificate(s) revoked"), out
    actions = [(r["action"], r["device_id"]) for r in audit(hub, 20)]
    assert ("device.revoked.enforced", "rv-a") in actions and ("device.revoked", "rv-a") in actions
    # revocation is final: still refused a moment later, and the registry refuses to resume it
    time.sleep(0.5)
    assert_reconnect_refused(hub, a)
    assert hub.cli("device", "resume", "rv-a").returncode != 0
    assert_reconnect_refused(hub, a)


def test_suspend_while_connected_then_resume(hub, tmp_path):
    c = enroll_device(hub, "rv-c", tmp_path)
    d = enroll_device(hub, "rv-d", tmp_path)
    out = cut_while_connected(hub, c, d, ("device", "suspend", "rv-c"))
    assert out.startswith("rv-c: suspended"), out
    with sessions(session(hub, d)) as (sd,):
        assert sd.subscribe("devices/rv-d/#") == 1
        t0, out = timed_cli(hub, "device", "resume", "rv-c")
        assert out.startswith("rv-c: active") and "enforced by the running hub" in out, out
        # back in at once with the same certificate, and exchanging messages
        with sessions(session(hub, c)) as (sc,):
            assert sc.subscribe("devices/rv-c/#") == 1
            exchange(sc, sc, "devices/rv-c/telemetry", b"back")
        assert not sd.disconnected.is_set()
        exchange(sd, sd, "devices/rv-d/telemetry", b"undisturbed")
    actions = [(r["action"], r["device_id"]) for r in audit(hub, 30)]
    for action in ("device.suspended.enforced", "device.active.enforced"):
        assert (action, "rv-c") in actions, actions


def test_offline_status_changes_apply_at_next_start(tmp_path):
    """Revoke and suspend while the hub is stopped (the CLI says so); at the next start both are refused."""
    hub = init_hub(tmp_path, **LENIENT_LIMITS)
    try:
        hub.start()
        wait_ready(hub)
        a = enroll_device(hub, "off-a", tmp_path / "w")
        b = enroll_device(hub, "off-b", tmp_path / "w")
        s = enroll_device(hub, "off-s", tmp_path / "w")
        for dev in (a, b, s):
            assert probe_cert(hub, dev.chain, dev.key, client_id=dev.id).accepted
        assert hub.stop() == 0
        assert_no_broker_left(hub)

        out = " ".join(hub.cli_ok("device", "revoke", "off-a", "--reason", "keyCompromise").split())
        assert "the hub is not running" in out and "enforced by the running hub" not in out, out
        out = " ".join(hub.cli_ok("device", "suspend", "off-s").split())
        assert "the hub is not running" in out, out

        restart(hub)
        assert_reconnect_refused(hub, a)
        assert_reconnect_refused(hub, s)
        assert probe_cert(hub, b.chain, b.key, client_id=b.id).accepted
        # resuming the suspended one on the running hub lets it in again
        hub.cli_ok("device", "resume", "off-s")
        assert probe_cert(hub, s.chain, s.key, client_id=s.id).accepted
    finally:
        try:
            rc = hub.stop()
        finally:
            hub.kill()
        assert rc == 0
        assert_no_broker_left(hub)
