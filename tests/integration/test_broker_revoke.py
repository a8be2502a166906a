"""Status changes bite at once on the broker: revoke / suspend cut the live session and refuse the reconnect, other
principals are not disturbed, resume lets the device back at once; changes made while the hub is stopped apply
when it starts.

The authz plugin decides from the registry alone: the hub's doorbell ($CONTROL sync, rung by `set_status`) only
makes it immediate and confirmed. A change committed by another process straight into the registry (no admin
socket, no doorbell) still cuts the session within a second, because the plugin follows authz_events by itself.
Sessions also end when their certificate expires (the plugin's sweep).

The broker-neutral cases run on both brokers (`target`, brokerkinds.py: this module's Mosquitto hub and the
session's RabbitMQ cluster hub, whose driver follows authz_events by itself too and cuts through the management
API of node 1 whichever node the session is on); the Mosquitto-only ones say why in one line.
"""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import time

import pytest

from hub.registry.store import DeviceNotActive
from tests.integration.brokerfixtures import (BROKER_LIMITS, NOT_AUTHORIZED, ConnectRefused, MqttSession,
                                              add_identity, admin_call, assert_no_broker_left, audit, broker_hub,
                                              enroll_device, exchange, init_hub, issue_with_hub_ca, log_mark,
                                              probe_dev, registry, restart, sessions, utcnow, wait_ready,
                                              wait_refusal)
from tests.integration.brokerkinds import broker_kind, rabbit_cluster_hub, target  # noqa: F401  (fixtures)
from tests.integration.hubfixtures import cli_env, hub_binary

pytestmark = pytest.mark.integration

BUDGET = 1.0  # seconds from the request (admin socket call, registry commit) to the session drop


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with broker_hub(tmp_path_factory.mktemp("broker-revoke")) as h:
        yield h


@pytest.fixture
def commander(target, tmp_path_factory):
    """svc.rv-cmd on the target's hub, once per hub (the tests only send commands with it)."""
    return target.once("rv-cmd", lambda: add_identity(target.hub, "rv-cmd", "commander",
                                                      tmp_path_factory.mktemp("rv-cmd")))


def run_cli(hub, *args: str) -> tuple[float, str]:
    """Run `tessera-hub ARGS --dir D` as a separate process; returns when it ended (monotonic) and its output."""
    proc = subprocess.run([hub_binary(), *args, "--dir", str(hub.dir)], capture_output=True, text=True,
                          env=cli_env(), timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"tessera-hub {' '.join(args)}: {proc.stderr}"
    return time.monotonic(), " ".join(proc.stdout.split())


def assert_reconnect_refused(hub, dev, reason: str) -> None:
    """Mosquitto's terms, for its own hub (Target.assert_refused says it for either broker)."""
    for tls in ("1.2", "1.3"):
        mark = log_mark(hub)
        p = probe_dev(hub, dev, tls)
        assert p.reason_code == NOT_AUTHORIZED, f"TLS {tls}: {p}"
        assert wait_refusal(hub, mark, dev.id) == (dev.id, reason)
    with pytest.raises(ConnectRefused):
        MqttSession(hub, dev.chain, dev.key, dev.id).connect(timeout=5)


def command(sc, dev, sd, text: bytes) -> None:
    """The commander sends `text` to dev's commands topic and dev's session sd receives it."""
    exchange(sc, sd, f"devices/{dev.id}/commands", text)


def change(hub, how: str, device_id: str, status: str) -> tuple[float, str]:
    """Suspend / resume / revoke through the CLI, the admin socket, or straight into the registry (no doorbell).
    Returns when the request was made (for the CLI: when it returned) and what it said."""
    if how == "cli":
        verb = {"suspended": "suspend", "active": "resume", "revoked": "revoke"}[status]
        return run_cli(hub, "device", verb, device_id, *(["--reason", "keyCompromise"] if verb == "revoke" else []))
    t0 = time.monotonic()
    if how == "socket":
        result = admin_call(hub, {"op": "set_status", "device": device_id, "status": status,
                                  "reason": "keyCompromise" if status == "revoked" else "", "actor": "test"})
        return t0, f"kicked={result['kicked']} total_ms={result['timings']['total_ms']:.0f}"
    with registry(hub) as reg:
        t0 = time.monotonic()  # from the commit, not from opening the registry
        reg.set_status(device_id, status, utcnow(), actor="test-direct", reason="keyCompromise")
    return t0, ""


def enforced_ms(out: str) -> float:
    """The hub's own measure of a status change, from the CLI's or the admin socket's answer."""
    m = re.search(r"(?:enforced by the running hub in |total_ms=)(\d+)", out)
    assert m, out
    return float(m.group(1))


@pytest.mark.parametrize("how", ["cli", "socket", "registry"])
@pytest.mark.parametrize("status", ["revoked", "suspended"])
def test_status_change_cuts_the_live_session(target, commander, tmp_path, how, status):
    """The device's session on one node (RabbitMQ: not the hub's node 1 for most params), the commander and a
    bystander on the others: the device is cut and refused, the bystander keeps getting its commands."""
    hub = target.hub
    dev = enroll_device(hub, f"rv-{status[:3]}-{how[:3]}", tmp_path)
    bystander = enroll_device(hub, f"rv-by-{status[:3]}-{how[:3]}", tmp_path)
    last_audit = hub.last_audit_id()
    mark = target.mark()
    with sessions(target.session(commander, 2), target.session(dev, 1), target.session(bystander)) as (sc, st, sb):
        for d, s in ((dev, st), (bystander, sb)):
            assert s.subscribe(f"devices/{d.id}/commands") == 1
            command(sc, d, s, b"before")

        t, out = change(hub, how, dev.id, status)
        target.assert_cut(st, f"{how} {status}")
        if how == "cli":  # cut before the command returned (its own start-up is no measure on a busy machine)
            assert st.disconnect_at < t + 0.2, f"cut {st.disconnect_at - t:.3f} s after the CLI returned"
        else:
            assert st.disconnect_at - t < BUDGET, f"cut {st.disconnect_at - t:.3f} s after the request"
        if how != "registry":
            assert enforced_ms(out) < BUDGET * 1000, out
        target.wait_kicked(mark, dev.id)
        if how == "cli":
            assert "enforced by the running hub in" in out and "(1 live session(s) cut)" in out, out
        elif how == "socket":
            assert out.startswith("kicked=1 "), out

        target.assert_refused(dev, status, principal=dev.id, in_crl=True)
        # the bystander was never disconnected and still gets its commands
        assert not sb.disconnected.is_set(), f"{bystander.id} was disconnected ({sb.disconnect_rc})"
        command(sc, bystander, sb, b"after")
        assert sc.connected
    rows = [(r["action"], r["device_id"]) for r in hub.audit_since(last_audit)]
    assert (f"device.{status}", dev.id) in rows
    enforced = [r for r in hub.audit_since(last_audit) if r["action"] == f"device.{status}.enforced"]
    if how == "registry":
        assert enforced == [], "a commit straight into the registry went through the hub?"
    else:
        assert [(r["device_id"], r["outcome"], r["detail"].split(";")[0]) for r in enforced] == \
            [(dev.id, "ok", "sessions cut: 1")]


def back_within(target, dev, deadline: float):
    """A session of dev's (on the test's second node), connected before `deadline` (monotonic): Mosquitto's plugin
    reads the registry at the CONNECT; RabbitMQ's listener CRL still holds a suspended certificate until the
    driver has followed the event (at once through the hub, within FOLLOW_EVERY for a commit straight into the
    registry)."""
    while True:
        s = target.mqtt(dev, 1)
        try:
            return s.connect(timeout=5)
        except ConnectRefused:
            s.close()
            assert time.monotonic() < deadline, f"{target.kind}: {dev.id} not back within {BUDGET} s of resume"
            time.sleep(0.02)


@pytest.mark.parametrize("how", ["cli", "socket", "registry"])
def test_resume_lets_a_suspended_device_back_at_once(target, commander, tmp_path, how):
    hub = target.hub
    dev = enroll_device(hub, f"rv-back-{how[:3]}", tmp_path)
    change(hub, how, dev.id, "suspended")
    target.assert_refused(dev, "suspended", principal=dev.id, in_crl=True)
    returned, _ = change(hub, how, dev.id, "active")
    with sessions(back_within(target, dev, returned + BUDGET), target.session(commander)) as (sd, sc):
        assert sd.subscribe(f"devices/{dev.id}/commands") == 1
        command(sc, dev, sd, b"welcome back")
        assert sd.publish(f"devices/{dev.id}/telemetry", b"{}") == 0


def test_revocation_is_final(target, tmp_path):
    hub = target.hub
    dev = enroll_device(hub, "rv-final", tmp_path)
    hub.cli_ok("device", "revoke", dev.id, "--reason", "keyCompromise")
    assert hub.cli("device", "resume", dev.id).returncode != 0
    with pytest.raises(DeviceNotActive, match="revocation is final"):
        change(hub, "registry", dev.id, "active")
    time.sleep(0.3)
    target.assert_refused(dev, "revoked", principal=dev.id, in_crl=True)


def test_revoked_service_identity_is_cut_off(target, tmp_path):
    """Straight into the registry as well (hub.authz.identities.revoke_identity writes the authz event)."""
    from hub.authz.identities import revoke_identity

    hub = target.hub
    reader = add_identity(hub, "rv-reader", "telemetry-reader", tmp_path)
    other = add_identity(hub, "rv-reader2", "telemetry-reader", tmp_path)
    dev = enroll_device(hub, "rv-src", tmp_path)
    with sessions(target.session(reader, 1), target.session(other, 2), target.session(dev)) as (sr, so, sd):
        assert sr.subscribe("devices/+/telemetry") == 1 and so.subscribe("devices/+/telemetry") == 1
        exchange(sd, sr, "devices/rv-src/telemetry", b"1")
        with registry(hub) as reg:
            t0 = time.monotonic()
            revoke_identity(reg, "rv-reader", utcnow(), actor="test")
        target.assert_cut(sr, "identity revoked")
        assert sr.disconnect_at - t0 < BUDGET
        exchange(sd, so, "devices/rv-src/telemetry", b"2")
        assert so.connected
    target.assert_refused(reader, "revoked", principal=reader.id, in_crl=True)


def test_session_ends_when_its_certificate_expires(target, tmp_path):
    """A certificate valid for 3 s: the session on it is cut after expiry (Mosquitto: the plugin's sweep, every
    5 s)."""
    dev = issue_with_hub_ca(target.hub, "rv-short", tmp_path, utcnow(), dt.timedelta(seconds=3), register=True)
    mark = target.mark()
    with sessions(target.session(dev, 1)) as (s,):
        assert s.disconnected.wait(12), "the session outlived its certificate"
        expired_for = (utcnow() - dev.cert.not_valid_after_utc).total_seconds()
        assert 0 <= expired_for < 6.5, expired_for
    target.wait_kicked(mark, "rv-short")


def test_offline_status_changes_apply_at_next_start(tmp_path):
    # Mosquitto only: a hub of its own stopped and started again (the cluster hub is the session's, shared)
    """Revoke and suspend while the hub is stopped (the CLI says so); at the next start both are refused."""
    hub = init_hub(tmp_path, **BROKER_LIMITS)
    try:
        hub.start()
        wait_ready(hub)
        a = enroll_device(hub, "off-a", tmp_path / "w")
        b = enroll_device(hub, "off-b", tmp_path / "w")
        s = enroll_device(hub, "off-s", tmp_path / "w")
        for dev in (a, b, s):
            assert probe_dev(hub, dev).accepted
        assert hub.stop() == 0
        assert_no_broker_left(hub)

        out = " ".join(hub.cli_ok("device", "revoke", "off-a", "--reason", "keyCompromise").split())
        assert "the hub is not running" in out and "enforced by the running hub" not in out, out
        out = " ".join(hub.cli_ok("device", "suspend", "off-s").split())
        assert "the hub is not running" in out, out

        restart(hub)
        assert_reconnect_refused(hub, a, "revoked")
        assert_reconnect_refused(hub, s, "suspended")
        assert probe_dev(hub, b).accepted
        # resuming the suspended one on the running hub lets it in again
        hub.cli_ok("device", "resume", "off-s")
        assert probe_dev(hub, s).accepted
        assert ("device.active.enforced", "off-s") in [(r["action"], r["device_id"]) for r in audit(hub, 20)]
    finally:
        try:
            rc = hub.stop()
        finally:
            hub.kill()
        assert rc == 0
        assert_no_broker_left(hub)
