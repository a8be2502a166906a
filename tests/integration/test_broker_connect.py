"""Who the hub's broker lets in: only a valid, unrevoked device certificate from the fleet's device CA.

Each refusal is checked with a raw attempt (TCP, TLS, MQTT v5 CONNECT) under TLS 1.2, where the broker judges the
client certificate inside the handshake, and under TLS 1.3, where the client's handshake completes first and the
connection dies right after: in both cases no CONNACK may ever come. A valid device is the control.
One hub for the module; device ids con-*.
"""

from __future__ import annotations

import datetime as dt
import time

import pytest

from tests.helpers import CA
from tests.integration.brokerfixtures import (REFUSED_OR_DROPPED, broker_hub, count_of, enroll_device, exchange,
                                              issue_with_hub_ca, probe_cert, session, sessions, traffic, utcnow,
                                              wait_count)
from tests.integration.hubfixtures import ForeignCA

TLS_VERSIONS = ("1.2", "1.3")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with broker_hub(tmp_path_factory.mktemp("broker-connect")) as h:
        yield h


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("connect-certs")


@pytest.fixture(scope="module")
def good(hub, work):
    return enroll_device(hub, "con-good", work)


def assert_refused(hub, chain, key, client_id: str, tls_detail: str | None = None) -> None:
    """No CONNACK under TLS 1.2 or 1.3; under TLS 1.2 the handshake itself fails (with `tls_detail` if given)."""
    for tls in TLS_VERSIONS:
        p = probe_cert(hub, chain, key, tls, client_id=client_id)
        assert not p.got_connack, f"TLS {tls}: the broker answered CONNECT: {p}"
        assert p.stage in ("tls", "closed"), f"TLS {tls}: {p}"
        if tls == "1.2":
            assert p.stage == "tls", f"TLS 1.2: the handshake should fail: {p}"
            if tls_detail:
                assert tls_detail in p.detail.upper(), f"TLS 1.2: expected {tls_detail}: {p}"


@pytest.mark.parametrize("tls", TLS_VERSIONS)
def test_valid_device_certificate_is_accepted(hub, good, tls):
    p = probe_cert(hub, good.chain, good.key, tls, client_id=good.id)
    assert p.accepted, p
    assert p.tls_version == f"TLSv{tls}"


def test_no_client_certificate_is_refused(hub, good):
    assert_refused(hub, None, None, "con-nocert", "HANDSHAKE_FAILURE")
    assert probe_cert(hub, good.chain, good.key, client_id=good.id).accepted  # control


def test_certificate_from_an_unrelated_ca_is_refused(hub, tmp_path):
    ca = CA(tmp_path / "other-ca", cn="Someone Else Root")
    cert, key = ca.issue_file_client("con-good", name="intruder")
    chain = tmp_path / "intruder-chain.pem"
    chain.write_bytes(cert.read_bytes() + ca.cert_path.read_bytes())
    assert_refused(hub, chain, key, "con-good", "UNKNOWN_CA")


def test_certificate_from_a_ca_impersonating_the_device_ca_is_refused(hub, tmp_path):
    """Same subject as the fleet's device CA (O=acme, CN=acme Device CA), different key."""
    cert, key = ForeignCA(tmp_path / "fake-device-ca").client("con-good")
    assert_refused(hub, cert, key, "con-good")


def test_expired_device_certificate_is_refused(hub, work):
    """Issued in-process by the hub's own device CA with validity 30 s, as of 60 s ago: expired 30 s ago.

    (A `now` of three days ago, as first planned, is refused by FleetCA itself: the device CA of a fresh hub is
    not valid before its creation time minus 5 minutes.) The control is the same issuance, valid for a day."""
    now = utcnow() - dt.timedelta(seconds=60)
    expired = issue_with_hub_ca(hub, "con-expired", work, now, dt.timedelta(seconds=30))
    assert expired.cert.not_valid_after_utc < utcnow()
    assert_refused(hub, expired.chain, expired.key, "con-expired", "EXPIRED")
    control = issue_with_hub_ca(hub, "con-fresh", work, now, dt.timedelta(days=1))
    assert probe_cert(hub, control.chain, control.key, client_id="con-fresh").accepted


def test_revoked_device_certificate_is_refused(hub, work):
    dev = enroll_device(hub, "con-revoked", work)
    assert probe_cert(hub, dev.chain, dev.key, client_id=dev.id).accepted
    out = hub.cli_ok("device", "revoke", dev.id, "--reason", "keyCompromise")
    assert "enforced by the running hub" in " ".join(out.split())
    assert_refused(hub, dev.chain, dev.key, dev.id, "REVOKED")


def test_hub_server_certificate_is_refused_as_client_certificate(hub):
    """D/tls/est.pem chains to the fleet root through the service CA but has EKU serverAuth only."""
    tls = hub.dir / "tls"
    assert_refused(hub, tls / "est.pem", tls / "est.key", "con-est", "UNSUPPORTED_CERTIFICATE")


def test_device_cannot_take_another_devices_client_id(hub, work):
    """The broker forces client id = certificate CN: A connecting with client id "con-b" (or the hub's) is A.

    B's live session is not taken over, B keeps receiving, A's messages land only in A's topics (also as seen
    by the hub's admin session, which is not kicked either)."""
    a = enroll_device(hub, "con-a", work)
    b = enroll_device(hub, "con-b", work)
    with sessions(session(hub, b)) as (sb,):
        assert sb.subscribe("devices/con-b/#") == 1
        before = traffic(hub)
        with sessions(session(hub, a, client_id="con-b"), session(hub, a, client_id="tessera-hub")) as (sa, sa2):
            # the first impersonation attempt was taken over by the second one: both are "con-a" to the broker
            sa2.subscribe("devices/con-a/#")
            assert sa2.publish("devices/con-b/telemetry", b"as-b", qos=1) in REFUSED_OR_DROPPED
            exchange(sa2, sa2, "devices/con-a/telemetry", b"as-a")
            exchange(sb, sb, "devices/con-b/telemetry", b"b-still-receives")
            time.sleep(0.5)
            assert sa.disconnected.is_set(), "two sessions with one certificate: the first should be taken over"
            assert b"as-b" not in [p for _, p in sb.received], sb.received
        assert sb.connected and not sb.disconnected.is_set(), f"B was disconnected ({sb.disconnect_rc})"
        exchange(sb, sb, "devices/con-b/telemetry", b"b-after")
        # the hub's admin session still runs and attributes the messages by topic: a's to a, b's two to b
        after = wait_count(hub, "con-b", count_of(before, "con-b") + 2)
        after = wait_count(hub, "con-a", count_of(before, "con-a") + 1)
        time.sleep(0.2)
        final = traffic(hub)
        assert count_of(final, "con-b") == count_of(before, "con-b") + 2, (before, final)
        assert count_of(final, "con-a") == count_of(before, "con-a") + 1, (before, final)
    log = (hub.dir / "broker" / "mosquitto.log").read_text(errors="replace")
    assert "as con-a (p5" in log and " as con-b (p5" in log
    assert log.count(" as tessera-hub (p5") == 1, "the hub's admin session was re-established (kicked?)"
