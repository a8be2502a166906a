"""Who the hub's broker lets in: only a principal's current credential, and only under its own client id.

Chain failures (no certificate, a foreign or impersonating CA, an expired certificate, a server certificate) end
in the TLS handshake: under TLS 1.2 the broker judges the client certificate inside it, under TLS 1.3 the
client's handshake completes first and the connection dies before any CONNACK. Everything the authz plugin
refuses (a certificate the registry does not hold as current, a wrong client id, a connect flood) gets CONNACK
0x87 under either version, and the plugin logs the reason, which is checked too. A valid device is the control
in each test. One hub for the module (supersession grace GRACE s, the default connect limits); device ids con-*.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.helpers import CA
from tests.integration.brokerfixtures import (NOT_AUTHORIZED, ConnectRefused, Device, MqttSession, add_identity,
                                              admin_call, broker_hub, broker_log, enroll_device, exchange,
                                              issue_with_hub_ca, log_mark, probe_cert, probe_dev, refusals, registry,
                                              session,
                                              sessions, utcnow, wait_refusal, write_chain)
from tests.integration.hubfixtures import FLEET, ForeignCA, make_csr, new_key, tls_context, write_key

pytestmark = pytest.mark.integration

TLS_VERSIONS = ("1.2", "1.3")
GRACE = 3  # [mqtt] supersede_grace_seconds of this module's hub
CONNECT_RATE, CONNECT_BURST = 30, 10  # [mqtt] connect_rate (per minute) and connect_burst


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with broker_hub(tmp_path_factory.mktemp("broker-connect"), supersede_grace_seconds=GRACE,
                    connect_rate=CONNECT_RATE, connect_burst=CONNECT_BURST) as h:
        yield h


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("connect-certs")


@pytest.fixture(scope="module")
def good(hub, work):
    return enroll_device(hub, "con-good", work)


def assert_refused_in_tls(hub, chain, key, client_id: str, tls_detail: str | None = None) -> None:
    """No CONNACK under TLS 1.2 or 1.3; under TLS 1.2 the handshake itself fails (with `tls_detail` if given)."""
    for tls in TLS_VERSIONS:
        p = probe_cert(hub, chain, key, tls, client_id=client_id)
        assert not p.got_connack, f"TLS {tls}: the broker answered CONNECT: {p}"
        assert p.stage in ("tls", "closed"), f"TLS {tls}: {p}"
        if tls == "1.2":
            assert p.stage == "tls", f"TLS 1.2: the handshake should fail: {p}"
            if tls_detail:
                assert tls_detail in p.detail.upper(), f"TLS 1.2: expected {tls_detail}: {p}"


def assert_not_authorized(hub, dev, reason: str, client_id: str | None = None, principal: str | None = None) -> None:
    """CONNACK 0x87 under TLS 1.2 and 1.3, the plugin logging `reason`; paho's connect is refused too."""
    client_id = dev.id if client_id is None else client_id
    for tls in TLS_VERSIONS:
        mark = log_mark(hub)
        p = probe_dev(hub, dev, tls, client_id=client_id)
        assert p.not_authorized, f"TLS {tls}: expected CONNACK 0x87, got {p}"
        logged = wait_refusal(hub, mark, client_id)
        assert logged[1] == reason, f"TLS {tls}: refused for {logged[1]!r}, expected {reason!r}"
        if principal is not None:
            assert logged[0] == principal, logged
    with pytest.raises(ConnectRefused, match="Not authorized"):
        MqttSession(hub, dev.chain, dev.key, client_id).connect(timeout=5)


def assert_refused(hub, dev, client_id: str) -> None:
    """Never admitted: refused in the TLS handshake or with CONNACK 0x87, under TLS 1.2 and 1.3."""
    for tls in TLS_VERSIONS:
        p = probe_dev(hub, dev, tls, client_id=client_id)
        assert p.stage in ("tls", "closed") or p.not_authorized, f"TLS {tls}: {p}"


def superseded_until(hub, dev) -> dt.datetime:
    """grace_until of the device's one superseded certificate (from the registry)."""
    (row,) = hub.query("SELECT grace_until FROM certificates WHERE device_id = ? AND status = 'superseded'",
                       (dev.id,))
    return dt.datetime.fromisoformat(row["grace_until"])


def hub_sessions(hub) -> int:
    """How many times the hub's own admin session (client id tessera-hub) has connected."""
    return broker_log(hub).count(" as tessera-hub (p5")


# --- accepted ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tls", TLS_VERSIONS)
def test_valid_device_certificate_is_accepted(hub, good, tls):
    mark = log_mark(hub)
    p = probe_dev(hub, good, tls)
    assert p.accepted, p
    assert p.tls_version == f"TLSv{tls}"
    time.sleep(0.1)
    log = broker_log(hub)[mark:]
    assert " as con-good (p5, c1, k10, u'con-good')" in log, log  # the plugin set username = principal
    assert refusals(hub, mark) == []


def test_valid_service_identity_is_accepted(hub, work):
    ident = add_identity(hub, "con-svc", "telemetry-reader", work)
    assert ident.id == "svc.con-svc"
    mark = log_mark(hub)
    assert probe_dev(hub, ident).accepted
    time.sleep(0.1)
    assert " as svc.con-svc (p5, c1, k10, u'svc.con-svc')" in broker_log(hub)[mark:]


# --- refused in the TLS handshake ----------------------------------------------------------------------------------

def test_no_client_certificate_is_refused(hub, good):
    assert_refused_in_tls(hub, None, None, "con-nocert", "HANDSHAKE_FAILURE")
    assert probe_dev(hub, good).accepted  # control


def test_certificate_from_an_unrelated_ca_is_refused(hub, good, tmp_path):
    ca = CA(tmp_path / "other-ca", cn="Someone Else Root")
    cert, key = ca.issue_file_client("con-good", name="intruder")
    chain = tmp_path / "intruder-chain.pem"
    chain.write_bytes(cert.read_bytes() + ca.cert_path.read_bytes())
    assert_refused_in_tls(hub, chain, key, "con-good", "UNKNOWN_CA")


def leaf(ca_cert: x509.Certificate, ca_key, cn: str, path: Path, serial: int | None = None) -> Device:
    """A clientAuth certificate O=<fleet>, CN=cn signed with `ca_key` (valid for a day), chain = leaf + CA."""
    key, now = new_key(), utcnow()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, FLEET),
                                     x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(serial or x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    path.parent.mkdir(parents=True, exist_ok=True)
    return Device(cn, write_chain(path.with_suffix(".pem"), [cert, ca_cert]), write_key(path.with_suffix(".key"), key),
                  cert)


def forge_with_ca(hub, ca_role: str, cn: str, workdir: Path, serial: int | None = None) -> Device:
    """Signed directly with the hub's `ca_role` ("device" or "service") CA key file, bypassing every check
    FleetCA makes (reserved names, the registry)."""
    from hub.ca.authority import load_key_file

    ca_cert = x509.load_pem_x509_certificate((hub.dir / "ca" / f"{ca_role}-ca.pem").read_bytes())
    return leaf(ca_cert, load_key_file(hub.dir / "ca" / f"{ca_role}-ca.key"), cn, workdir / f"forged-{ca_role}-{cn}",
                serial)


def renew_device(hub, dev: Device, workdir: Path) -> Device:
    """EST simplereenroll over mTLS with the device's current certificate; the old one becomes superseded."""
    from agent.estclient import EstClient

    key = new_key()
    ctx = tls_context(hub, dev.chain, dev.key)
    certs = EstClient(hub.url, cafile=str(hub.root_pem), context=ctx).simplereenroll(make_csr(key, dev.id))
    return Device(dev.id, write_chain(workdir / f"{dev.id}.renewed.pem", certs),
                  write_key(workdir / f"{dev.id}.renewed.key", key), certs[0])


def test_certificates_from_cas_impersonating_the_fleet_cas_are_refused(hub, good, work, tmp_path):
    """Same subjects as the fleet's device and service CAs, other keys; the leaves copy the CN and serial of a
    registered device and service identity, so only the chain check stands between them and the plugin."""
    device_ca = x509.load_pem_x509_certificate(hub.device_ca_pem.read_bytes())
    fake = ForeignCA(tmp_path / "fake-device-ca", subject_cn=device_ca.subject.get_attributes_for_oid(
        NameOID.COMMON_NAME)[0].value)
    assert fake.cert.subject == device_ca.subject
    fake_good = leaf(fake.cert, fake.key, good.id, tmp_path / "fake-good", good.cert.serial_number)
    assert_refused_in_tls(hub, fake_good.chain, fake_good.key, good.id)

    ident = add_identity(hub, "con-imp", "admin", work)
    service_ca = x509.load_pem_x509_certificate((hub.dir / "ca" / "service-ca.pem").read_bytes())
    fake_svc = ForeignCA(tmp_path / "fake-service-ca",
                         subject_cn=service_ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    fake_admin = leaf(fake_svc.cert, fake_svc.key, ident.id, tmp_path / "fake-admin", ident.cert.serial_number)
    assert_refused_in_tls(hub, fake_admin.chain, fake_admin.key, ident.id)
    assert probe_dev(hub, good).accepted and probe_dev(hub, ident).accepted  # the genuine ones


def test_expired_device_certificate_is_refused(hub, work):
    """Issued by the hub's device CA with validity 30 s as of 60 s ago and recorded in the registry as the device's
    enrollment (so only its expiry is wrong). The control is the same issuance, valid for a day."""
    now = utcnow() - dt.timedelta(seconds=60)
    expired = issue_with_hub_ca(hub, "con-expired", work, now, dt.timedelta(seconds=30), register=True)
    assert expired.cert.not_valid_after_utc < utcnow()
    assert hub.show("con-expired")["certificates"][0]["status"] == "active"
    assert_refused_in_tls(hub, expired.chain, expired.key, "con-expired", "EXPIRED")
    control = issue_with_hub_ca(hub, "con-fresh", work, now, dt.timedelta(days=1), register=True)
    assert probe_dev(hub, control).accepted


def test_hub_server_certificate_is_refused_as_client_certificate(hub):
    """D/tls/est.pem chains to the fleet root through the service CA but has EKU serverAuth only."""
    tls = hub.dir / "tls"
    for version in TLS_VERSIONS:
        p = probe_cert(hub, tls / "est.pem", tls / "est.key", version, client_id="con-est")
        assert not p.accepted and (p.stage in ("tls", "closed") or p.not_authorized), p
    p = probe_cert(hub, tls / "est.pem", tls / "est.key", "1.2", client_id="con-est")
    assert p.stage == "tls" and "UNSUPPORTED_CERTIFICATE" in p.detail.upper(), p


# --- refused by the plugin: CONNACK 0x87 ---------------------------------------------------------------------------

def test_certificate_of_the_device_ca_unknown_to_the_registry_is_refused(hub, work):
    stray = issue_with_hub_ca(hub, "con-stray", work, utcnow(), dt.timedelta(days=1))
    hub.add_device("con-stray")  # the device exists, this certificate was never enrolled
    assert_not_authorized(hub, stray, "unknown certificate", principal="-")


def test_revoked_device_is_refused(hub, work):
    dev = enroll_device(hub, "con-revoked", work)
    assert probe_dev(hub, dev).accepted
    out = " ".join(hub.cli_ok("device", "revoke", dev.id, "--reason", "keyCompromise").split())
    assert "enforced by the running hub" in out, out
    assert_not_authorized(hub, dev, "revoked", principal=dev.id)


def test_suspended_device_is_refused_until_resumed(hub, work):
    dev = enroll_device(hub, "con-suspended", work)
    assert probe_dev(hub, dev).accepted
    hub.cli_ok("device", "suspend", dev.id)
    assert_not_authorized(hub, dev, "suspended", principal=dev.id)
    hub.cli_ok("device", "resume", dev.id)
    assert probe_dev(hub, dev).accepted


def test_revoked_service_identity_is_refused(hub, work):
    from hub.authz.identities import revoke_identity

    ident = add_identity(hub, "con-gone", "commander", work)
    assert probe_dev(hub, ident).accepted
    with registry(hub) as reg:
        revoke_identity(reg, "con-gone", utcnow(), actor="test")
    assert_not_authorized(hub, ident, "revoked", principal="svc.con-gone")


def test_superseded_certificate_is_refused_after_its_grace(hub, work):
    """A renewal supersedes the old certificate: it still connects (and a session on it lives) for GRACE s,
    then it is refused and that session is cut by the plugin's expiry sweep."""
    dev = enroll_device(hub, "con-old", work)
    new = renew_device(hub, dev, work)
    grace_until = superseded_until(hub, dev)
    assert dt.timedelta(seconds=GRACE - 1) < grace_until - utcnow() <= dt.timedelta(seconds=GRACE)
    assert probe_dev(hub, dev).accepted, "the superseded certificate must work during its grace"
    with sessions(session(hub, dev)) as (old,):
        while utcnow() < grace_until + dt.timedelta(milliseconds=100):
            time.sleep(0.05)
        assert_not_authorized(hub, dev, "superseded", principal=dev.id)
        assert old.disconnected.wait(8), "the session on the superseded certificate outlived its grace"
    assert probe_dev(hub, new).accepted


def test_superseded_certificate_is_refused_once_the_new_one_connected(hub, work):
    dev = enroll_device(hub, "con-switch", work)
    new = renew_device(hub, dev, work)
    grace_until = superseded_until(hub, dev)
    assert probe_dev(hub, dev).accepted
    with sessions(session(hub, dev)) as (old,):
        with sessions(session(hub, new)) as (fresh,):
            assert old.disconnected.wait(2), "the new certificate's session should take over the old one's"
            assert fresh.connected
        assert_not_authorized(hub, dev, "superseded", principal=dev.id)
    assert utcnow() < grace_until, "too slow: the grace was over anyway, this proved nothing"
    assert probe_dev(hub, new).accepted


def test_device_ca_certificate_named_like_the_hub_gets_nothing(hub, work):
    """The device CA never issues CN=tessera-hub (FleetCA refuses the reserved id); one signed with its key anyway
    is refused: also with the serial of the hub's registered admin certificate (the issuer is part of the lookup),
    and the same for a device-CA certificate copying a service identity's name and serial. The hub's own session
    is never taken over: it connected once, and its doorbell still answers."""
    hub_serial = int(hub.query("SELECT serial FROM identity_certificates WHERE identity = 'tessera-hub' "
                               "AND status = 'active'")[0]["serial"], 16)
    sessions_before = hub_sessions(hub)
    for forged in (forge_with_ca(hub, "device", "tessera-hub", work / "plain"),
                   forge_with_ca(hub, "device", "tessera-hub", work / "hub-serial", serial=hub_serial)):
        assert_not_authorized(hub, forged, "unknown certificate", client_id="tessera-hub", principal="-")
    ident = add_identity(hub, "con-admin", "admin", work)
    forged = forge_with_ca(hub, "device", ident.id, work / "svc-serial", serial=ident.cert.serial_number)
    assert_refused(hub, forged, ident.id)  # in TLS: "svc.con-admin" looks like a DNS name, which the device CA excludes
    assert probe_dev(hub, ident).accepted  # the genuine identity
    assert admin_call(hub, {"op": "authz_sync"})["seq"] > 0
    assert hub_sessions(hub) == sessions_before == 1, "the hub's admin session was taken over"


def test_certificate_whose_cn_is_not_its_principal_is_refused(hub, work):
    """A device-CA certificate with the serial of con-cn's enrolled certificate but CN con-cn-other."""
    dev = issue_with_hub_ca(hub, "con-cn", work, utcnow(), dt.timedelta(days=1), register=True)
    forged = forge_with_ca(hub, "device", "con-cn-other", work, serial=dev.cert.serial_number)
    for client_id in ("con-cn", "con-cn-other"):
        assert_not_authorized(hub, forged, "certificate CN mismatch", client_id=client_id, principal="con-cn")
    assert probe_dev(hub, dev).accepted


def test_client_id_must_be_the_principal(hub, good, work):
    for client_id in ("con-good-2", "CON-GOOD", "con-good ", "svc.con-good"):
        assert_not_authorized(hub, good, "client id mismatch", client_id=client_id, principal="con-good")
    mark = log_mark(hub)
    assert probe_dev(hub, good, client_id="").not_authorized  # the broker assigns one: auto-<uuid>
    assert [(p, c[:5], r) for p, c, r in refusals(hub, mark)] == [("con-good", "auto-", "client id mismatch")]
    ident = add_identity(hub, "con-id", "commander", work)
    assert_not_authorized(hub, ident, "client id mismatch", client_id="con-id", principal="svc.con-id")
    assert probe_dev(hub, good).accepted and probe_dev(hub, ident).accepted


def test_device_cannot_take_another_devices_or_the_hubs_client_id(hub, work):
    """A presenting the client id of B (or the hub's) is refused; B's live session is not taken over and still gets
    its commands, and the hub's own session stays up."""
    a = enroll_device(hub, "con-a", work)
    b = enroll_device(hub, "con-b", work)
    cmd = add_identity(hub, "con-cmd", "commander", work)
    sessions_before = hub_sessions(hub)
    with sessions(session(hub, b), session(hub, cmd)) as (sb, sc):
        assert sb.subscribe("devices/con-b/commands") == 1
        assert_not_authorized(hub, a, "client id mismatch", client_id="con-b", principal="con-a")
        assert_not_authorized(hub, a, "client id mismatch", client_id="tessera-hub", principal="con-a")
        assert_not_authorized(hub, a, "client id mismatch", client_id="svc.con-cmd", principal="con-a")
        time.sleep(0.2)
        assert sb.connected and sc.connected, (sb.disconnect_rc, sc.disconnect_rc)
        msg = exchange(sc, sb, "devices/con-b/commands", b'{"id":"1","command":"ping"}')
        assert msg.user_props == (("tessera-sender", "svc.con-cmd"), ("tessera-role", "commander"))
    assert hub_sessions(hub) == sessions_before
    assert probe_dev(hub, a).accepted


def test_connect_rate_is_limited_per_principal(hub, work):
    """CONNECT_BURST connects in a row pass (plus what the bucket refilled meanwhile), the next is refused (0x87,
    'rate limited'); another principal is not affected; a token comes back after 60 / CONNECT_RATE s."""
    flood = enroll_device(hub, "con-flood", work)
    other = enroll_device(hub, "con-calm", work)
    started, accepted = time.monotonic(), 0
    while accepted < 3 * CONNECT_BURST:
        mark = log_mark(hub)
        p = probe_dev(hub, flood)
        if not p.accepted:
            break
        accepted += 1
    refilled = (time.monotonic() - started) * CONNECT_RATE / 60
    assert CONNECT_BURST <= accepted <= CONNECT_BURST + refilled + 1, (accepted, refilled)
    assert p.reason_code == NOT_AUTHORIZED, p
    assert wait_refusal(hub, mark, flood.id) == (flood.id, "rate limited")
    assert probe_dev(hub, other).accepted
    time.sleep(60 / CONNECT_RATE + 0.2)
    assert probe_dev(hub, flood).accepted
