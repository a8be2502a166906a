"""`tessera-hub identity add|list|show|revoke` and `tessera-hub watch` through the real executable.

Most tests use one fleet made by `tessera-hub init` (no `serve`): identities are registry records plus files, and
need no running hub. The tests that need the broker (a service identity connecting, the revoke doorbell, `watch`
receiving device messages) need the broker-side authz plugin, which admits service identities; they are skipped
until it is in place (AUTHZ_PLUGIN_READY).
"""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.helpers import ROOT, stop_process, wait_for_text
from tests.integration.hubfixtures import (  # noqa: F401  (module_token is a fixture)
    FLEET, cli_env, hub_binary, init_hub, module_token, one_line, run_cli, spki,
)
from tests.integration.test_hub_cli import assert_clean_error

pytestmark = pytest.mark.integration

#: The broker admits service identities only through the Tessera authz plugin (hub/broker/mosquitto/): its C
#: source and the module that builds it. Until both exist `serve` cannot start the broker at all.
AUTHZ_PLUGIN_READY = ((ROOT / "hub" / "broker" / "mosquitto" / "tessera_authz.c").exists()
                      and importlib.util.find_spec("hub.broker.mosquitto.build") is not None)
needs_plugin = pytest.mark.skipif(not AUTHZ_PLUGIN_READY, reason="the broker's authz plugin "
                                  "(hub/broker/mosquitto/tessera_authz.c + build.py) is not in place yet")

FILE_MODES = {"{n}.key": 0o600, "{n}.pem": 0o644, "ca.pem": 0o644, "{n}.p12": 0o600, "{n}.p12.pass": 0o600}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A fleet directory from `tessera-hub init` (not running)."""
    return init_hub(tmp_path_factory.mktemp("identities"))


def add(hub, name: str, role: str, *extra: str) -> dict:
    return hub.cli_json("identity", "add", name, "--role", role, *extra)


def cli(hub, *args: str) -> subprocess.CompletedProcess:
    """`tessera-hub ARGS --dir <hub>`, with --dir before a `--` (after it everything is an argument)."""
    if "--" not in args:
        return hub.cli(*args)
    i = args.index("--")
    return run_cli(*args[:i], "--dir", str(hub.dir), *args[i:])


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def load_pems(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def registry_state(hub) -> dict:
    """Everything an identity command may change (the audit log by its length, without the fleet API's own rows:
    the API audits every call, a refused one as 'denied')."""
    return {"identities": hub.query("SELECT * FROM identities ORDER BY name"),
            "certificates": hub.query("SELECT * FROM identity_certificates ORDER BY serial"),
            "events": hub.query("SELECT count(*) AS n FROM authz_events"),
            "audit": hub.query("SELECT count(*) AS n FROM audit WHERE action NOT LIKE 'api.%'"),
            "api_ok_writes": hub.query("SELECT count(*) AS n FROM audit WHERE action LIKE 'api.identities.%' "
                                       "AND action NOT IN ('api.identities.list', 'api.identities.show') "
                                       "AND outcome = 'ok'")}


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


# --- add ---------------------------------------------------------------------------------------------------------

def test_add_writes_a_complete_identity(fleet):
    before = fleet.last_audit_id()
    info = add(fleet, "reader", "telemetry-reader")
    d = fleet.dir / "identities" / "reader"
    assert info["principal"] == info["client_id"] == "svc.reader" and info["role"] == "telemetry-reader"
    assert Path(info["dir"]) == d and mode(d) == 0o700 and mode(d.parent) == 0o700
    files = {f.format(n="reader"): m for f, m in FILE_MODES.items()}
    assert sorted(os.listdir(d)) == sorted(files)  # no temporary leftovers
    assert info["files"] == {f: str(d / f) for f in files}
    for f, m in files.items():
        assert mode(d / f) == m, f

    key = serialization.load_pem_private_key((d / "reader.key").read_bytes(), password=None)
    assert (d / "reader.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    leaf, service_ca = load_pems(d / "reader.pem")
    root = load_pems(fleet.root_pem)[0]
    assert service_ca == load_pems(fleet.dir / "ca" / "service-ca.pem")[0]
    assert (d / "ca.pem").read_bytes() == fleet.root_pem.read_bytes()
    assert spki(leaf.public_key()) == spki(key.public_key())
    assert leaf.subject.rfc4514_string() == f"CN=svc.reader,OU=tessera-service,O={FLEET}"
    assert leaf.issuer == service_ca.subject and service_ca.issuer == root.subject
    leaf.verify_directly_issued_by(service_ca)
    assert leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == \
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert format(leaf.serial_number, "x") == info["serial"]
    assert leaf.not_valid_after_utc.isoformat() == info["not_after"]

    passphrase = (d / "reader.p12.pass").read_text().strip()
    assert len(passphrase) >= 24
    p12 = pkcs12.load_pkcs12((d / "reader.p12").read_bytes(), passphrase.encode())
    assert p12.cert.certificate == leaf and p12.cert.friendly_name == b"svc.reader"
    assert spki(p12.key.public_key()) == spki(key.public_key())
    assert [c.certificate for c in p12.additional_certs] == [service_ca, root]
    with pytest.raises(ValueError):
        pkcs12.load_pkcs12((d / "reader.p12").read_bytes(), b"wrong")

    cred = fleet.query("SELECT * FROM authz_credentials WHERE issuer = 'service' AND serial = ?", (info["serial"],))
    assert [(c["principal"], c["kind"], c["role"], c["cert_status"], c["principal_status"]) for c in cred] == \
        [("svc.reader", "service", "telemetry-reader", "active", "active")]
    rows = [r for r in fleet.audit_since(before) if not r["action"].startswith("api.")]
    assert [(r["action"], r["actor"], r["outcome"]) for r in rows] == [("identity.add", "svc.local-admin", "ok")]
    assert rows[0]["detail"] == f"identity=svc.reader role=telemetry-reader serial={info['serial']}"


def test_add_says_what_to_use(fleet):
    proc = fleet.cli("identity", "add", "console", "--role", "admin")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "principal svc.console, role admin" in text and "MQTT client id: svc.console" in text
    assert "expires 20" in text and str(fleet.dir / "identities" / "console") in one_line(text)
    for f in FILE_MODES:
        assert f.format(n="console") in text
    passphrase = (fleet.dir / "identities" / "console" / "console.p12.pass").read_text().strip()
    assert passphrase not in proc.stdout + proc.stderr


def test_add_into_an_existing_out_directory_keeps_its_other_files(fleet, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    os.chmod(tmp_path, 0o750)
    info = add(fleet, "cmd-out", "commander", "--out", str(tmp_path), "--days", "7")
    assert sorted(os.listdir(tmp_path)) == sorted(["notes.txt", *(f.format(n="cmd-out") for f in FILE_MODES)])
    assert mode(tmp_path) == 0o750  # the operator's directory keeps its permissions
    leaf = load_pems(tmp_path / "cmd-out.pem")[0]
    assert 6 < (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days <= 7
    assert info["dir"] == str(tmp_path)


@pytest.mark.parametrize("args,needle", [
    (("Bad_Name", "--role", "admin"), "invalid identity name 'Bad_Name'"),
    (("svc.reader", "--role", "admin"), "invalid identity name"),
    (("x" * 64, "--role", "admin"), "invalid identity name"),
    (("--role", "admin", "--", "-lead"), "invalid identity name '-lead'"),
    (("a/b", "--role", "admin"), "invalid identity name"),
    (("dév", "--role", "admin"), "invalid identity name"),
    (("tessera-hub", "--role", "admin"), "reserved for the hub"),
    (("newname", "--role", "superuser"), "unknown role 'superuser'"),
    (("newname", "--role", "device"), "role 'device' cannot be granted"),
    (("newname", "--role", "hub"), "role 'hub' cannot be granted"),
    (("newname", "--role", ""), "unknown role ''"),
    (("newname", "--role", "admin", "--days", "0"), "--days must be between 1 and"),
    (("newname", "--role", "admin", "--days", "99999"), "--days must be between 1 and"),
    (("newname", "--role", "admin", "--pin-source", "env:PIN"), "--pin-source and --module go with --key-uri"),
    (("newname", "--role", "admin", "--key-uri", "pkcs11:object=k", "--pin-source", "env:PIN"), "must name the token"),
    (("newname", "--role", "admin", "--key-uri", "pkcs11:token=t?pin-value=1234"), "must not carry the PIN"),
    (("newname", "--role", "admin", "--key-uri", "pkcs11:token=t"), "needs --pin-source"),
    (("newname", "--role", "admin", "--key-uri", "file:/x", "--pin-source", "env:PIN"), "not a PKCS#11 URI"),
])
def test_add_refuses_bad_input_and_writes_nothing(fleet, args, needle):
    before, files = registry_state(fleet), tree(fleet.dir / "identities")
    proc = cli(fleet, "identity", "add", *args)
    message = assert_clean_error(proc, needle)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in message
    assert registry_state(fleet) == before and tree(fleet.dir / "identities") == files


def test_add_refuses_an_existing_identity(fleet):
    add(fleet, "twice", "commander")
    before, files = registry_state(fleet), tree(fleet.dir / "identities")
    assert_clean_error(fleet.cli("identity", "add", "twice", "--role", "admin"), "identity 'twice' already exists")
    assert registry_state(fleet) == before and tree(fleet.dir / "identities") == files


@pytest.mark.parametrize("existing", ["clash.key", "clash.pem", "ca.pem", "clash.p12", "clash.p12.pass"])
def test_add_never_overwrites_a_file(fleet, tmp_path, existing):
    (tmp_path / existing).write_text("precious")
    before = registry_state(fleet)
    assert_clean_error(fleet.cli("identity", "add", "clash", "--role", "admin", "--out", str(tmp_path)),
                       "already exists; refusing to overwrite it", existing)
    assert os.listdir(tmp_path) == [existing] and (tmp_path / existing).read_text() == "precious"
    assert registry_state(fleet) == before


def test_add_refuses_an_out_path_under_a_file(fleet, tmp_path):
    (tmp_path / "plain").write_text("")
    before = registry_state(fleet)
    assert_clean_error(fleet.cli("identity", "add", "under", "--role", "admin", "--out",
                                 str(tmp_path / "plain" / "sub")), "is not a directory")
    assert os.listdir(tmp_path) == ["plain"] and registry_state(fleet) == before


def test_add_writes_nothing_when_the_ca_cannot_sign(fleet, tmp_path):
    """The service CA key is refused (others could read it): no directory, no file, no record."""
    key = fleet.dir / "ca" / "service-ca.key"
    before = registry_state(fleet)
    os.chmod(key, 0o644)  # the hub refuses CA key files others can read
    try:
        assert_clean_error(fleet.cli("identity", "add", "nosign", "--role", "admin", "--out",
                                     str(tmp_path / "a" / "b")), "service-ca.key")
    finally:
        os.chmod(key, 0o600)
    assert os.listdir(tmp_path) == [] and registry_state(fleet) == before


def test_add_with_a_token_key(fleet, module_token):
    conf, pin = str(module_token.conf), f"file:{module_token.pin_file}"
    info = add(fleet, "tokensvc", "commander", "--key-uri", f"pkcs11:token={module_token.label}",
               "--pin-source", pin, "--softhsm-conf", conf)
    d = fleet.dir / "identities" / "tokensvc"
    assert sorted(os.listdir(d)) == ["ca.pem", "tokensvc.key-uri", "tokensvc.pem"]
    assert info["key_uri"].startswith(f"pkcs11:token={module_token.label};object=svc.tokensvc;type=private;id=")
    assert (d / "tokensvc.key-uri").read_text().strip() == info["key_uri"]
    assert "pin" not in info["key_uri"]
    from hsm import worker

    key = worker.describe_key(module_token.config, "svc.tokensvc")
    leaf = load_pems(d / "tokensvc.pem")[0]
    assert spki(leaf.public_key()) == spki(serialization.load_pem_public_key(key.public_key_pem.encode()))
    assert dict(key.attributes)["sensitive"] and not dict(key.attributes)["extractable"]
    assert leaf.subject.rfc4514_string() == f"CN=svc.tokensvc,OU=tessera-service,O={FLEET}"

    before, files = registry_state(fleet), tree(fleet.dir / "identities")
    proc = fleet.cli("identity", "add", "tokensvc2", "--role", "commander", "--key-uri",
                     f"pkcs11:token={module_token.label};object=svc.tokensvc", "--pin-source", pin,
                     "--softhsm-conf", conf)
    assert_clean_error(proc, "already exists on token")
    assert registry_state(fleet) == before and tree(fleet.dir / "identities") == files
    proc = fleet.cli("identity", "add", "tokensvc3", "--role", "commander", "--key-uri", "pkcs11:token=no-such",
                     "--pin-source", pin, "--softhsm-conf", conf)
    assert_clean_error(proc, "no token labelled 'no-such'")
    assert registry_state(fleet) == before


# --- list, show, revoke ------------------------------------------------------------------------------------------

def test_list_show_revoke(fleet):
    info = add(fleet, "backend", "admin")
    listed = {r["name"]: r for r in fleet.cli_json("identity", "list")}
    assert listed["backend"]["principal"] == "svc.backend" and listed["backend"]["status"] == "active"
    assert listed["backend"]["cert_not_after"] is not None and listed["backend"]["kind"] == "service"
    shown = fleet.cli_json("identity", "show", "backend")
    assert (shown["principal"], shown["role"], shown["status"]) == ("svc.backend", "admin", "active")
    assert [c["serial"] for c in shown["certificates"]] == [info["serial"]]
    assert [a["action"] for a in shown["audit"]] == ["identity.add"]
    human = fleet.cli_ok("identity", "show", "backend")
    assert "svc.backend" in human and "CN=svc.backend,OU=tessera-service,O=acme" in one_line(human)
    assert "svc.backend" in fleet.cli_ok("identity", "list")

    before = fleet.last_audit_id()
    proc = fleet.cli("identity", "revoke", "backend", "--reason", "keyCompromise")
    assert proc.returncode == 0, proc.stderr
    assert one_line(proc.stdout).startswith("svc.backend: revoked; 1 certificate(s) revoked; the hub is not running")
    shown = fleet.cli_json("identity", "show", "backend")
    assert shown["status"] == "revoked" and shown["revoked_at"]
    assert [(c["status"], c["revocation_reason"]) for c in shown["certificates"]] == [("revoked", "keyCompromise")]
    assert [a["action"] for a in shown["audit"]] == ["identity.revoke", "identity.add"]
    rows = [r for r in fleet.audit_since(before) if not r["action"].startswith("api.")]
    assert [(r["action"], r["actor"], r["outcome"]) for r in rows] == [("identity.revoke", "svc.local-admin", "ok")]
    assert rows[0]["detail"] == f"identity=svc.backend; certificates: {info['serial']}; reason: keyCompromise"
    events = fleet.query("SELECT principal, reason FROM authz_events ORDER BY seq DESC LIMIT 1")
    assert events == [{"principal": "svc.backend", "reason": "identity revoked"}]
    cred = fleet.query("SELECT cert_status, principal_status FROM authz_credentials WHERE serial = ?",
                       (info["serial"],))
    assert cred == [{"cert_status": "revoked", "principal_status": "revoked"}]
    crl = x509.load_pem_x509_crl((fleet.dir / "crl" / "service.crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(int(info["serial"], 16)) is not None
    assert crl.issuer == load_pems(fleet.dir / "ca" / "service-ca.pem")[0].subject
    assert {r["name"]: r for r in fleet.cli_json("identity", "list")}["backend"]["status"] == "revoked"

    before = registry_state(fleet)
    assert_clean_error(fleet.cli("identity", "revoke", "backend"), "already revoked; revocation is final")
    assert_clean_error(fleet.cli("identity", "add", "backend", "--role", "admin"), "already exists")
    assert registry_state(fleet) == before


@pytest.mark.parametrize("args,needle", [
    (("show", "nobody"), "no identity 'nobody'"), (("show", "nobody", "--json"), "no identity 'nobody'"),
    (("revoke", "nobody"), "no identity 'nobody'"), (("revoke", "tessera-hub"), "reserved for the hub"),
    (("revoke", "Bad_Name"), "invalid identity name"),
    (("revoke", "reader", "--reason", "line\nbreak"), "printable ASCII"),
])
def test_show_and_revoke_refuse_bad_input(fleet, args, needle):
    if not fleet.query("SELECT 1 FROM identities WHERE name = 'reader'"):
        add(fleet, "reader", "telemetry-reader")
    before = registry_state(fleet)
    assert_clean_error(fleet.cli("identity", *args), needle)
    assert registry_state(fleet) == before


# --- watch without a broker ------------------------------------------------------------------------------------------

def test_watch_without_an_identity_says_how_to_make_one(tmp_path):
    hub = init_hub(tmp_path)
    message = assert_clean_error(hub.cli("watch"), "tessera-hub identity add watch --role telemetry-reader")
    assert message.startswith("error: no identity 'watch'")
    add(hub, "watch", "telemetry-reader")
    (hub.dir / "identities" / "watch" / "watch.key").unlink()
    assert_clean_error(hub.cli("watch"), "watch.key is missing")
    assert_clean_error(hub.cli("watch", "--device", "a", "--group", "b"), "not both")
    assert_clean_error(hub.cli("watch", "--device", "Bad"), "invalid device id 'Bad'")
    hub.cli_ok("identity", "revoke", "watch")
    assert_clean_error(hub.cli("watch"), "identity 'watch' is revoked")


# --- against a running hub (broker with the authz plugin) --------------------------------------------------------

@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from tests.integration.brokerfixtures import broker_hub

    with broker_hub(tmp_path_factory.mktemp("identities-live")) as hub:
        yield hub


def watch_proc(hub, workdir: Path, *args: str) -> tuple[subprocess.Popen, Path, Path]:
    """`tessera-hub watch ARGS` in the background; returns (process, stdout file, stderr file) once subscribed."""
    out, err = workdir / "watch.out", workdir / "watch.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen([hub_binary(), "watch", "--dir", str(hub.dir), "--host", "127.0.0.1", "--port",
                                 str(hub.mqtt_port), *args], stdout=o, stderr=e, stdin=subprocess.DEVNULL,
                                env=cli_env(), cwd=ROOT, start_new_session=True)
    wait_for_text(err, "watching ", 20, proc)
    return proc, out, err


def finish(proc: subprocess.Popen, timeout: float = 20) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        stop_process(proc)


@needs_plugin
def test_revoke_rings_the_broker_and_cuts_the_session(live):
    from tests.integration.brokerfixtures import MqttSession

    add(live, "cut-me", "telemetry-reader")
    d = live.dir / "identities" / "cut-me"
    s = MqttSession(live, d / "cut-me.pem", d / "cut-me.key", "svc.cut-me").connect()
    try:
        assert s.subscribe("devices/+/telemetry") == 1
        started = time.monotonic()
        out = one_line(live.cli_ok("identity", "revoke", "cut-me"))
        assert "enforced by the running broker" in out and "(1 live session(s) cut)" in out, out
        assert s.disconnected.wait(2) and s.disconnect_at - started < 2
    finally:
        s.close()


@needs_plugin
def test_watch_prints_what_devices_publish(live, tmp_path):
    from tests.integration.brokerfixtures import enroll_device, session

    add(live, "watch", "telemetry-reader")
    dev = enroll_device(live, "watched-1", tmp_path)
    s = session(live, dev)
    try:
        assert s.publish("devices/watched-1/status", b'{"state":"online"}') == 0  # not retained here
        proc, out, _ = watch_proc(live, tmp_path, "--json", "--count", "2", "--device", "watched-1")
        assert s.publish("devices/watched-1/telemetry", b'{"seq":1,"readings":{"t":21.5}}') == 0
        assert s.publish("devices/watched-1/events", b"not json \x1b[31m") == 0
        assert finish(proc) == 0, out.read_text()
    finally:
        s.close()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(m["device"], m["kind"], m["sender"], m["role"]) for m in lines] == \
        [("watched-1", "telemetry", "watched-1", "device"), ("watched-1", "events", "watched-1", "device")]
    assert lines[0]["payload"] == {"seq": 1, "readings": {"t": 21.5}} and lines[1]["payload"] == "not json \x1b[31m"
    assert "\x1b" not in out.read_text()  # JSON escapes it


@needs_plugin
def test_watch_lines_are_safe_for_a_terminal_and_groups_filter(live, tmp_path):
    from tests.integration.brokerfixtures import enroll_device, session

    if not live.query("SELECT 1 FROM identities WHERE name = 'watch'"):
        add(live, "watch", "telemetry-reader")
    member = enroll_device(live, "grouped-1", tmp_path / "m", groups=("g-watch",))
    other = enroll_device(live, "ungrouped-1", tmp_path / "o")
    a, b = session(live, member), session(live, other)
    try:
        proc, out, _ = watch_proc(live, tmp_path, "--count", "1", "--group", "g-watch")
        assert b.publish("devices/ungrouped-1/telemetry", b"{}") == 0
        assert a.publish("devices/grouped-1/telemetry", "[bold]x[/bold]\x1b[2J\u202e".encode() + b"y" * 1000) == 0
        assert finish(proc) == 0
    finally:
        a.close()
        b.close()
    (line,) = out.read_text().splitlines()
    assert " grouped-1 " in line and " telemetry " in line and "ungrouped" not in line
    assert "[bold]x[/bold]\\x1b[2J\\u202e" in line and "\x1b" not in line and "\u202e" not in line
    assert line.endswith("…") and len(line) < 300


@needs_plugin
def test_watch_as_a_commander_is_refused_the_subscription(live):
    add(live, "cmd-watch", "commander")
    proc = live.cli("watch", "--identity", "cmd-watch", "--host", "127.0.0.1", "--port", str(live.mqtt_port),
                    timeout=30)
    assert_clean_error(proc, "refused the subscription to devices/+/telemetry")
