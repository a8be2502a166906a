"""Attacks and faults around the hub's broker.

Injection through names, a device commanding itself, forged identity properties, oversized packets, the CRL
files (which the broker no longer reads) deleted under a SIGHUP, a CRL directory that cannot be written, an
unreadable registry (the plugin fails closed), a broker stopped during a status change, a killed broker, a killed
hub. Throughout, a revoked device (flt-revoked) must never be admitted; a good device (flt-good) is the control.
One hub for the module except the kill -9 hub tests, which each need their own. These faults are Mosquitto's
(its plugin, its config and CRL files, the process the hub supervises); each test says so in one line. The topic
misuse that runs on both brokers (commanding itself, a retained ack, an oversized PUBLISH, a forged will's topic)
is test_broker_misuse.py.

The tests run as root here, so "unreadable" and "unwritable" are made by moving files and putting a regular file
where a directory should be, not by chmod (root ignores permission bits).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import struct
import time
from pathlib import Path

import pytest
from cryptography import x509

from tests.integration.brokerfixtures import (NOT_AUTHORIZED, add_identity, assert_no_broker_left,
                                              audit, broker_hub, broker_log, broker_pid, broker_pids, client_context,
                                              enroll_device, exchange, init_hub, kicks, log_mark, probe_dev,
                                              raw_connection, read_packet, session, sessions, tcp_open,
                                              varint, wait_ready, wait_refusal)
from tests.integration.hubfixtures import LENIENT_LIMITS, request

pytestmark = pytest.mark.integration

RESTART_BUDGET = 5.0  # seconds for the hub to restart a killed broker
BUDGET = 1.0  # seconds for a status change to cut a live session
MAX_PAYLOAD = 256 * 1024  # the [mqtt] max_payload default
RSS_LIMIT_KIB = 60 * 1024
QUIET = 0.7  # seconds we wait for a message that must NOT arrive, after a control message did arrive
FORGED = [("tessera-role", "commander"), ("tessera-sender", "svc.flt-cmd"), ("x-extra", "1")]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with broker_hub(tmp_path_factory.mktemp("broker-faults")) as h:
        yield h


@pytest.fixture(scope="module")
def devs(hub, tmp_path_factory):
    work = tmp_path_factory.mktemp("fault-devices")
    good = enroll_device(hub, "flt-good", work)
    control = enroll_device(hub, "flt-control", work)
    revoked = enroll_device(hub, "flt-revoked", work)
    hub.cli_ok("device", "revoke", revoked.id, "--reason", "keyCompromise")
    hub.cli_ok("role", "set", "flt-cmd-watch", "--rule", "subscribe:devices/+/commands",
               "--rule", "receive:devices/+/commands")
    return {"good": good, "control": control, "revoked": revoked,
            "reader": add_identity(hub, "flt-reader", "telemetry-reader", work),
            "cmd": add_identity(hub, "flt-cmd", "commander", work),
            "watch": add_identity(hub, "flt-watch", "flt-cmd-watch", work)}


def rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB (/proc/<pid>/status)."""
    m = re.search(r"(?m)^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    assert m, f"no VmRSS for pid {pid}"
    return int(m.group(1))


def assert_enforcing(hub, devs, trials: int = 2) -> None:
    """The steady state: the revoked device is refused (0x87, 'revoked') `trials` times, an active one admitted
    (flt-control: a probe under flt-good's client id would take over a live flt-good session)."""
    for i in range(trials):
        mark = log_mark(hub)
        p = probe_dev(hub, devs["revoked"], ("1.2", "1.3")[i % 2])
        assert p.not_authorized, f"trial {i}: the revoked device got {p}"
        assert wait_refusal(hub, mark, "flt-revoked") == ("flt-revoked", "revoked")
    assert probe_dev(hub, devs["control"]).accepted


def publish_packet(topic: str, payload: bytes, mid: int = 1, retain: bool = False) -> bytes:
    """A QoS 1 MQTT v5 PUBLISH without properties."""
    t = topic.encode()
    body = struct.pack("!H", len(t)) + t + struct.pack("!H", mid) + b"\x00" + payload
    return bytes([0x32 | (1 if retain else 0)]) + varint(len(body)) + body


def raw_publish(hub, dev, topic: str, payload: bytes) -> tuple[str, int | None]:
    """PUBLISH QoS 1 on a raw connection: ("puback", reason), ("disconnect", reason) or ("closed", None)."""
    with raw_connection(hub.mqtt_port, client_context(hub, dev.chain, dev.key), dev.id) as (p, sock):
        assert p.accepted, p
        try:
            sock.sendall(publish_packet(topic, payload))
            head, body = read_packet(sock)
        except (OSError, ConnectionError):
            return "closed", None
        kind = {0x40: "puback", 0xE0: "disconnect"}.get(head & 0xF0, f"packet {head:#x}")
        code = (body[2] if len(body) > 2 else 0) if kind == "puback" else (body[0] if body else 0)
        return kind, code


# --- names ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["--group", "z\ntopic readwrite devices"], ["--group", "#"], ["--group", "+"], ["--group", "a/b"],
    ["--group", "$SYS"], ["--group", ""], ["--group", "Sensors"], ["--group", "ok", "--group", "x y"],
    ["--label", "k=v\nuser x"], ["--label", "a/b=c"], ["--label", "k=" + "v" * 129],
], ids=lambda a: repr(a[-1])[:20])
def test_names_that_would_reach_topic_rules_are_refused_and_nothing_is_written(hub, args):
    # No broker involved: the CLI refuses the names before anything is written
    before, last_audit = hub.state(), hub.last_audit_id()
    proc = hub.cli("device", "add", "flt-injected", *args)
    assert proc.returncode != 0 and proc.stdout == "", proc.stdout
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, repr(proc.stderr)
    assert "Traceback" not in proc.stderr
    assert hub.state() == before and hub.audit_since(last_audit) == []  # (the API's 'denied' call row aside)
    assert hub.query("SELECT 1 FROM devices WHERE id = 'flt-injected'") == []


# --- topics --------------------------------------------------------------------------------------------------------

def test_client_supplied_identity_properties_are_replaced(hub, devs):
    # Mosquitto only: MQTT 5 user properties and the plugin's stamp (RabbitMQ's 3.1.1 carries none)
    """User properties a client sends are replaced by the plugin's stamp: a device claiming tessera-role
    commander on its ack, telemetry or retained status is seen as the device by the commander and the reader
    (also by a reader subscribing later, to the retained copy), and a commander claiming to be the hub is seen
    as itself by the device."""
    good = devs["good"]
    stamp = (("tessera-sender", "flt-good"), ("tessera-role", "device"))
    with sessions(session(hub, good), session(hub, devs["reader"]), session(hub, devs["cmd"])) as (sg, sr, sc):
        assert sg.subscribe("devices/flt-good/commands") == 1
        assert sr.subscribe("devices/+/telemetry") == 1 and sc.subscribe("devices/+/commands/ack") == 1
        for topic, payload, s in (("devices/flt-good/commands/ack", b'{"id":"c1","ok":true}', sc),
                                  ("devices/flt-good/telemetry", b'{"t":1}', sr)):
            assert sg.publish(topic, payload, props=FORGED) == 0
            assert s.wait_message(topic, payload).user_props == stamp
        assert sg.publish("devices/flt-good/status", b"online", retain=True, props=FORGED) == 0
        assert sc.publish("devices/flt-good/commands", b'{"id":"c2"}',
                          props=[("tessera-role", "hub"), ("tessera-sender", "tessera-hub")]) == 0
        assert sg.wait_message("devices/flt-good/commands", b'{"id":"c2"}').user_props == \
            (("tessera-sender", "svc.flt-cmd"), ("tessera-role", "commander"))
        assert sr.subscribe("devices/flt-good/status") == 1
        retained = sr.wait_message("devices/flt-good/status", b"online")
        assert retained.retain and retained.user_props == stamp


def test_a_will_cannot_carry_a_forged_identity(hub, devs):
    # Mosquitto only: MQTT 5 will properties (RabbitMQ's 3.1.1 carries none)
    good = devs["good"]
    with sessions(session(hub, devs["reader"])) as (sr,):
        assert sr.subscribe("devices/+/status") == 1
        will = ("devices/flt-good/status", b"offline-forged", True, FORGED)
        with raw_connection(hub.mqtt_port, client_context(hub, good.chain, good.key), good.id, will=will) as (p, s):
            assert p.accepted, p
            s.shutdown(socket.SHUT_RDWR)  # no DISCONNECT: the broker publishes the will
        time.sleep(1.0)
        wills = [m for m in sr.received if m.payload == b"offline-forged"]
        assert all(dict(m.user_props).get("tessera-role") in (None, "device") for m in wills), wills
        assert all(dict(m.user_props).get("tessera-sender") in (None, "flt-good") for m in wills), wills


# --- sizes ---------------------------------------------------------------------------------------------------------

def test_payload_limit(hub, devs):
    # Mosquitto only: raw MQTT 5 PUBLISH packets and [mqtt] max_payload in mosquitto.conf
    """max_payload bytes pass (delivered intact and stamped); one byte more, or 300 KiB, is refused and not
    delivered; 200 KiB passes."""
    good = devs["good"]
    with sessions(session(hub, devs["reader"])) as (sr,):
        assert sr.subscribe("devices/+/telemetry") == 1
        for size in (200 * 1024, MAX_PAYLOAD):
            kind, code = raw_publish(hub, good, "devices/flt-good/telemetry", bytes([size % 251]) * size)
            assert (kind, code) in (("puback", 0x00), ("puback", 0x10)), (size, kind, code)
            m = sr.wait_message("devices/flt-good/telemetry", bytes([size % 251]) * size)
            assert m.user_props == (("tessera-sender", "flt-good"), ("tessera-role", "device"))
        for size in (MAX_PAYLOAD + 1, 300 * 1024):
            kind, code = raw_publish(hub, good, "devices/flt-good/telemetry", b"z" * size)
            assert kind == "closed" or code >= 0x80, (size, kind, code)
        time.sleep(QUIET)
        assert [len(m.payload) for m in sr.received] == [200 * 1024, MAX_PAYLOAD]
    assert_enforcing(hub, devs, trials=1)


def test_huge_publish_is_cut_off_and_broker_memory_stays_bounded(hub, devs):
    # Mosquitto only: the RSS of the one mosquitto process the hub runs
    """A PUBLISH header claiming 100 MB, then a stream of payload: the broker drops the connection early (it
    never buffers the packet), its RSS stays under RSS_LIMIT_KIB, and it keeps serving."""
    pid = broker_pid(hub)
    good, claimed, limit = devs["good"], 100 * 1024 * 1024, 8 * 1024 * 1024
    topic = b"devices/flt-good/telemetry"
    head = b"\x32" + varint(claimed) + struct.pack("!H", len(topic)) + topic + struct.pack("!H", 1) + b"\x00"
    peak, sent, answer = rss_kib(pid), 0, None
    with raw_connection(hub.mqtt_port, client_context(hub, good.chain, good.key), good.id) as (p, sock):
        assert p.accepted, p
        chunk = os.urandom(64 * 1024)
        try:
            sock.sendall(head)
            while sent < limit:
                sock.sendall(chunk)
                sent += len(chunk)
                peak = max(peak, rss_kib(pid))
        except OSError:
            pass
        with contextlib.suppress(OSError, ConnectionError):
            sock.settimeout(2)
            answer = read_packet(sock)
    assert sent < limit, f"the broker took {sent} bytes of a 100 MB packet without closing the connection"
    assert answer is None or answer[0] == 0xE0, answer  # a DISCONNECT (packet too large) or just closed
    assert peak < RSS_LIMIT_KIB, f"broker RSS reached {peak} KiB"
    assert broker_pids(hub) == [pid]
    assert_enforcing(hub, devs, trials=1)


# --- CRL files: not on the broker's path ---------------------------------------------------------------------------

@pytest.fixture
def crl_files(hub):
    """The hub's CRL files, restored after the test."""
    crl_dir = hub.dir / "crl"
    saved = {p.name: p.read_bytes() for p in crl_dir.iterdir() if p.is_file()}
    assert "device.crl" in saved, saved
    yield crl_dir
    if crl_dir.is_file() or crl_dir.is_symlink():
        crl_dir.unlink()
    crl_dir.mkdir(exist_ok=True)
    for name, data in saved.items():
        (crl_dir / name).write_bytes(data)


def test_broker_config_has_no_file_based_authorization(hub):
    # Mosquitto only: mosquitto.conf (RabbitMQ's node files: test_rabbitmq_config.py)
    conf = (hub.dir / "broker" / "mosquitto.conf").read_text()
    for word in ("crlfile", "acl_file", "password_file", "dynamic-security", "use_identity_as_username",
                 "use_subject_as_username", "allow_anonymous true"):
        assert word not in conf, word
    assert "require_certificate true" in conf and "plugin_opt_registry" in conf


@pytest.mark.parametrize("damage", ["deleted", "emptied", "garbage"])
def test_damaged_crl_files_and_sighup_change_nothing(hub, devs, crl_files, damage):
    # Mosquitto only: SIGHUP and the CRL files it no longer reads
    pid = broker_pid(hub)
    with sessions(session(hub, devs["good"]), session(hub, devs["reader"])) as (sg, sr):
        assert sr.subscribe("devices/+/telemetry") == 1
        for path in crl_files.iterdir():
            if damage == "deleted":
                path.unlink()
            else:
                path.write_bytes(b"" if damage == "emptied" else b"\x00garbage\xff" * 64)
        for _ in range(2):
            os.kill(pid, signal.SIGHUP)  # as a log rotation's `kill -HUP` would
            time.sleep(0.2)
        assert_enforcing(hub, devs, trials=6)
        # sessions survive the reload with their rights
        exchange(sg, sr, "devices/flt-good/telemetry", b"after-hup")
        assert sg.publish("devices/flt-other/telemetry", b"x") == NOT_AUTHORIZED
        assert sg.connected and sr.connected
    assert broker_pids(hub) == [pid]


def test_revoke_bites_although_the_crl_cannot_be_written(hub, devs, crl_files, tmp_path):
    # Mosquitto only: its plugin decides without the CRL files (RabbitMQ's listener CRL is its own case)
    """The CRL directory replaced by a regular file: the revocation still cuts the session at once and the reconnect
    is refused; CRL publication catches up in the background once the directory is back."""
    dev = enroll_device(hub, "flt-crl", tmp_path)
    backup = tmp_path / "crl-backup"
    shutil.move(str(crl_files), backup)
    crl_files.write_text("not a directory\n")
    try:
        with sessions(session(hub, dev)) as (s,):
            proc = hub.cli("device", "revoke", dev.id, "--reason", "keyCompromise")
            returned = time.monotonic()
            assert proc.returncode == 0, proc.stderr
            assert "(1 live session(s) cut)" in " ".join(proc.stdout.split()), proc.stdout
            assert s.disconnected.wait(5) and s.disconnect_at < returned + 0.2
        mark = log_mark(hub)
        assert probe_dev(hub, dev).not_authorized
        assert wait_refusal(hub, mark, dev.id) == (dev.id, "revoked")
    finally:
        crl_files.unlink()
        shutil.move(str(backup), crl_files)
    deadline = time.monotonic() + 15
    while True:
        resp = request(hub, "GET", "/crl/device.crl")
        crl = x509.load_der_x509_crl(resp.body) if resp.status == 200 else None
        if crl is not None and crl.get_revoked_certificate_by_serial_number(dev.cert.serial_number) is not None:
            break
        assert time.monotonic() < deadline, "the CRL never caught up with the revocation"
        time.sleep(0.3)


# --- the registry --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def registry_gone(hub, how: str):
    """The registry moved away (how="moved"), or a directory in its place ("directory"). (Not a garbage file: the
    live -wal file next to it would still supply the real pages, and the main file cannot be replaced safely.)"""
    path, away = hub.registry_path, hub.registry_path.with_name("registry.sqlite3.away")
    os.rename(path, away)
    if how == "directory":
        path.mkdir()
    try:
        yield
    finally:
        if how == "directory":
            path.rmdir()
        os.rename(away, path)


@pytest.mark.parametrize("how", ["moved", "directory"])
def test_unreadable_registry_fails_closed(hub, devs, how):
    # Mosquitto only: moving the registry of the session's shared cluster hub would break every module using it
    for _ in range(2):
        with registry_gone(hub, how):
            for name in ("good", "reader", "revoked"):
                mark = log_mark(hub)
                p = probe_dev(hub, devs[name])
                assert p.not_authorized, f"{name} was not refused with the registry unreadable: {p}"
                assert wait_refusal(hub, mark, devs[name].id)[1] == "registry unreadable"
        deadline = time.monotonic() + 5
        while not probe_dev(hub, devs["good"]).accepted:
            assert time.monotonic() < deadline, "the good device is still refused after the registry came back"
            time.sleep(0.2)
        assert probe_dev(hub, devs["reader"]).accepted
        assert_enforcing(hub, devs, trials=2)


def test_registry_coming_back_neither_crashes_the_broker_nor_drops_sessions(hub, devs):
    # Mosquitto only: follows the unreadable-registry case above
    with sessions(session(hub, devs["reader"])) as (sr,):
        for cycle in range(3):
            pid = broker_pid(hub)
            with registry_gone(hub, "moved"):
                assert probe_dev(hub, devs["good"]).not_authorized
            p = probe_dev(hub, devs["good"])
            time.sleep(0.3)
            assert broker_pids(hub) == [pid], f"cycle {cycle}: the broker died ({p})"
            assert p.accepted, f"cycle {cycle}: {p}"
            assert sr.connected, f"cycle {cycle}: the reader's session was dropped ({sr.disconnect_rc})"


# --- the broker process --------------------------------------------------------------------------------------------

def test_status_change_while_the_broker_is_stopped_bites_when_it_resumes(hub, devs, tmp_path):
    # Mosquitto only: SIGSTOP of the broker process the hub supervises (the hub does not run RabbitMQ's nodes)
    """SIGSTOP: the hub's doorbell gets no answer, the CLI says so, and the change still applies: once the broker
    runs again the plugin reads the committed event and cuts the session."""
    dev = enroll_device(hub, "flt-stopped", tmp_path)
    last = hub.last_audit_id()
    with sessions(session(hub, dev)) as (s,):
        pid = broker_pid(hub)
        os.kill(pid, signal.SIGSTOP)
        try:
            out = " ".join(hub.cli_ok("device", "suspend", dev.id).split())
            assert "broker not confirmed" in out, out
            time.sleep(0.3)
            assert not s.disconnected.is_set()
        finally:
            os.kill(pid, signal.SIGCONT)
        resumed = time.monotonic()
        assert s.disconnected.wait(5) and s.disconnect_at - resumed < BUDGET
    rows = [r for r in hub.audit_since(last) if r["action"] == "device.suspended.enforced"]
    assert [r["outcome"] for r in rows] == ["error"], rows
    mark = log_mark(hub)
    assert probe_dev(hub, dev).not_authorized
    assert wait_refusal(hub, mark, dev.id) == (dev.id, "suspended")
    assert broker_pids(hub) == [pid]


def test_killed_broker_is_restarted_with_enforcement_intact(hub, devs, tmp_path):
    # Mosquitto only: the hub restarts the broker it supervises (it does not run RabbitMQ's nodes)
    good = devs["good"]
    last = hub.last_audit_id()
    with sessions(session(hub, good)) as (sg,):
        old = broker_pid(hub)
        os.kill(old, signal.SIGKILL)
        t0 = time.monotonic()
        assert sg.disconnected.wait(5), "the session survived its broker?"
        while True:
            pids = broker_pids(hub)
            if pids and old not in pids and tcp_open(hub.mqtt_port):
                break
            assert time.monotonic() - t0 < RESTART_BUDGET, f"no new broker within {RESTART_BUDGET} s ({pids})"
            time.sleep(0.02)
    new = broker_pid(hub)
    assert_enforcing(hub, devs, trials=4)
    with sessions(session(hub, good), session(hub, devs["reader"])) as (sg, sr):
        assert sr.subscribe("devices/+/telemetry") == 1
        exchange(sg, sr, "devices/flt-good/telemetry", b"after-restart")
        assert sg.publish("devices/flt-revoked/telemetry", b"x") == NOT_AUTHORIZED
    rows = hub.audit_since(last)
    assert any(r["action"] == "broker.died" and r["outcome"] == "error" for r in rows), rows
    assert any(r["action"] == "broker.restarted" and r["detail"] == f"pid {new}" for r in rows), rows
    # the hub's admin session came back: a revocation still cuts a live session at once, confirmed
    late = enroll_device(hub, "flt-late", tmp_path)
    mark = log_mark(hub)
    with sessions(session(hub, late)) as (sl,):
        out = " ".join(hub.cli_ok("device", "revoke", late.id, "--reason", "keyCompromise").split())
        returned = time.monotonic()
        assert sl.disconnected.wait(2) and sl.disconnect_at < returned + 0.2
        assert "(1 live session(s) cut)" in out, out
    assert ("flt-late", "revoked") in kicks(hub, mark)
    assert "broker.died" not in [r["action"] for r in audit(hub, 5)]
    assert broker_log(hub).count("tessera_authz: enforcing registry") >= 2


@pytest.mark.parametrize("broker", ["started-with-hub", "restarted-by-watcher"])
def test_killed_hub_takes_its_broker_along(tmp_path, broker):
    # Mosquitto only: the hub's own broker child process
    hub = init_hub(tmp_path, **LENIENT_LIMITS)
    try:
        hub.start()
        wait_ready(hub)
        pid = broker_pid(hub)
        if broker == "restarted-by-watcher":
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + RESTART_BUDGET
            while pid in broker_pids(hub) or not broker_pids(hub) or not tcp_open(hub.mqtt_port):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            pid = broker_pid(hub)
        os.kill(hub.proc.pid, signal.SIGKILL)
        hub.proc.wait(10)
        deadline = time.monotonic() + 3
        while broker_pids(hub) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert broker_pids(hub) == [], f"mosquitto {pid} outlived its kill -9'ed hub"
        assert not tcp_open(hub.mqtt_port)
    finally:
        hub.kill()
        assert_no_broker_left(hub, timeout=0.5)

