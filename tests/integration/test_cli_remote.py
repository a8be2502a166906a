"""`tessera-hub` as a client of the fleet API: remote use (--hub, ~/.config/tessera/cli.toml, profiles) from another
HOME with operator credentials of each role, a device certificate refused, --json everywhere, 80-column tables,
audit rows naming the operator, and the in-process API when no hub runs (then `serve` sees what was recorded)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from agent.estclient import EstClient
from tests.helpers import ROOT, free_port
from tests.integration.hubfixtures import (
    FLEET, LENIENT_LIMITS, cli_env, hub_binary, init_hub, make_csr, new_key, one_line, running_hub, write_key,
    write_pem,
)
from tests.integration.test_hub_cli import assert_clean_error

pytestmark = pytest.mark.integration


class Operator:
    """`tessera-hub` run from another HOME, with a cli.toml naming one credential (and the hub's API URL)."""

    def __init__(self, home: Path, url: str, cert: Path, key: Path, ca: Path, profiles: dict | None = None,
                 hub_in_config: bool = True):
        self.home = home
        conf = home / ".config" / "tessera"
        conf.mkdir(parents=True, exist_ok=True)
        lines = [f'hub = "{url}"'] if hub_in_config else []
        lines += [f'cert = "{cert}"', f'key = "{key}"', f'ca = "{ca}"']
        for name, p in (profiles or {}).items():
            lines += [f"[profiles.{name}]", *(f'{k} = "{v}"' for k, v in p.items())]
        (conf / "cli.toml").write_text("\n".join(lines) + "\n")

    def cli(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        environ = {k: v for k, v in cli_env().items() if k not in ("XDG_CONFIG_HOME", "TESSERA_HUB", "TESSERA_PROFILE")}
        environ.update({"HOME": str(self.home), **(env or {})})
        return subprocess.run([hub_binary(), *args], capture_output=True, text=True, timeout=60, env=environ,
                              cwd=self.home, stdin=subprocess.DEVNULL)

    def ok(self, *args: str) -> str:
        proc = self.cli(*args)
        assert proc.returncode == 0, f"tessera-hub {' '.join(args)}: {proc.stderr}"
        return proc.stdout

    def json(self, *args: str):
        return json.loads(self.ok(*args, "--json"))


def api_url(hub) -> str:
    host, port = (hub.dir / "api.addr").read_text().split()
    return f"https://{host}:{port}"


def identity(hub, name: str, role: str) -> dict[str, Path]:
    info = hub.cli_json("identity", "add", name, "--role", role)
    d = Path(info["dir"])
    return {"cert": d / f"{name}.pem", "key": d / f"{name}.key", "ca": d / "ca.pem"}


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """A running hub, and operators of each role from their own HOME (remote use by cli.toml)."""
    base = tmp_path_factory.mktemp("remote")
    with running_hub(base, **LENIENT_LIMITS) as hub:
        url = api_url(hub)
        ops = {role: Operator(base / f"home-{role}", url, **identity(hub, f"op-{role}", role))
               for role in ("viewer", "operator", "admin")}
        yield hub, url, ops


def test_a_viewer_lists_but_cannot_revoke(remote):
    hub, _, ops = remote
    hub.add_device("rem-view-1")
    assert "rem-view-1" in {d["id"] for d in ops["viewer"].json("device", "list", "--id-prefix", "rem-view")}
    mark = hub.last_audit_id()
    proc = ops["viewer"].cli("device", "revoke", "rem-view-1", "--reason", "keyCompromise")
    message = assert_clean_error(proc, "role 'viewer' does not have the 'act' permission")
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert hub.show("rem-view-1")["device"]["status"] == "pending"
    rows = hub.wait_audit(mark, lambda r: r["action"] == "api.devices.status")
    assert [(r["actor"], r["outcome"]) for r in rows if r["action"] == "api.devices.status"] == \
        [("svc.op-viewer", "denied")], message
    calls = ops["admin"].json("audit", "--actor", "svc.op-viewer", "--calls")
    assert ("api.devices.status", "denied") in {(r["action"], r["outcome"]) for r in calls}
    assert not [r for r in ops["admin"].json("audit", "--actor", "svc.op-viewer") if r["action"].startswith("api.")]
    assert_clean_error(ops["viewer"].cli("identity", "add", "x-by-viewer", "--role", "viewer", "--out",
                                         str(ops["viewer"].home / "x")), "does not have the 'admin' permission")
    assert not (ops["viewer"].home / "x").exists()


def test_an_operator_revokes_and_the_audit_names_it(remote):
    hub, _, ops = remote
    hub.add_device("rem-op-1")
    out = one_line(ops["operator"].ok("device", "revoke", "rem-op-1", "--reason", "keyCompromise"))
    assert out.startswith("rem-op-1: revoked; enforced by the running hub in "), out
    rows = ops["admin"].json("audit", "--device", "rem-op-1")
    assert ("device.revoked", "svc.op-operator") in {(r["action"], r["actor"]) for r in rows}
    assert ("device.revoked.enforced", "svc.op-operator") in {(r["action"], r["actor"]) for r in rows}
    assert "cli" not in {r["actor"] for r in rows}
    listed = ops["viewer"].json("audit", "--actor", "svc.op-operator", "--action", "device.revoked")
    assert [r["device_id"] for r in listed][:1] == ["rem-op-1"]


def test_a_device_certificate_is_refused(remote, tmp_path):
    hub, url, _ = remote
    token = hub.add_device("rem-dev-1")
    key = new_key()
    leaf = EstClient(hub.url, cafile=str(hub.root_pem)).simpleenroll(make_csr(key, "rem-dev-1"), "rem-dev-1",
                                                                     token)[0]
    from cryptography import x509

    device_ca = x509.load_pem_x509_certificate(hub.device_ca_pem.read_bytes())
    dev = Operator(tmp_path / "chain", url, write_pem(tmp_path / "dev.pem", leaf, device_ca),
                   write_key(tmp_path / "dev.key", key), hub.root_pem)
    for args in (("device", "list"), ("device", "revoke", "rem-dev-1", "--reason", "r")):
        assert_clean_error(dev.cli(*args), "this API serves operators with a service identity", "not device")
    bare = Operator(tmp_path / "bare", url, write_pem(tmp_path / "leaf.pem", leaf), tmp_path / "dev.key",
                    hub.root_pem)  # no chain: the TLS handshake itself fails
    assert_clean_error(bare.cli("device", "list"), "client certificate")
    assert hub.show("rem-dev-1")["device"]["status"] == "active"


def test_credential_problems_are_one_line(remote, tmp_path):
    hub, url, _ = remote
    creds = identity(hub, "op-loose", "viewer")
    os.chmod(creds["key"], 0o644)
    loose = Operator(tmp_path / "loose", url, **creds)
    message = assert_clean_error(loose.cli("device", "list"), "readable by others", "chmod 600")
    assert len(message) < 300
    os.chmod(creds["key"], 0o600)
    missing = Operator(tmp_path / "missing", url, creds["cert"], tmp_path / "nope.key", creds["ca"])
    assert_clean_error(missing.cli("device", "list"), "nope.key")
    (tmp_path / "bad").mkdir()
    bad = Operator(tmp_path / "bad", url, tmp_path / "bad" / "x", creds["key"], creds["ca"])
    (tmp_path / "bad" / "x").write_text("not a certificate")
    assert_clean_error(bad.cli("device", "list"), "not a PEM certificate")
    for proc in (loose.cli("device", "revoke", "x", "--reason", "r"), missing.cli("device", "suspend", "x")):
        assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1, proc.stderr  # the fast path too
    assert_clean_error(loose.cli("device", "list", "--hub", "http://nope"), "is not a URL")
    assert_clean_error(loose.cli("device", "list", "--profile", "nope"), "no profile 'nope'")


def test_hub_option_and_profiles(remote, tmp_path):
    """--hub with cli.toml credentials (no hub in it), and a [profiles.NAME] table chosen by --profile."""
    hub, url, _ = remote
    creds = identity(hub, "op-prof", "viewer")
    plain = Operator(tmp_path / "plain", url, **creds, hub_in_config=False)
    assert isinstance(plain.json("device", "list", "--hub", url), list)
    env = {"TESSERA_HUB": url}
    proc = plain.cli("identity", "list", "--json", env=env)
    assert proc.returncode == 0 and json.loads(proc.stdout), proc.stderr
    nohub = plain.cli("device", "list")  # no hub anywhere: the local hub directory, which is not here
    assert_clean_error(nohub, "fleet.toml")
    prof = Operator(tmp_path / "prof", f"https://127.0.0.1:{free_port()}", **creds,
                    profiles={"prod": {"hub": url, **{k: str(v) for k, v in creds.items()}}})
    assert_clean_error(prof.cli("device", "list"), "connection refused")
    assert isinstance(prof.json("device", "list", "--profile", "prod"), list)


def test_every_command_answers_json_and_tables_fit_80_columns(remote, tmp_path):
    hub, _, ops = remote
    admin = ops["admin"]
    long_id = "rem-" + "w" * 59
    admin.ok("device", "add", long_id, "--group", "g" * 60, "--label", "site=" + "x" * 120)
    admin.ok("device", "add", "rem-j-1")
    token_file = tmp_path / "tokens.csv"
    json_commands = [
        ("device", "add", "rem-j-2", "--group", "line-a"),
        ("device", "list"), ("device", "list", "--all"), ("device", "list", "--status", "pending", "--limit", "2"),
        ("device", "show", long_id), ("device", "token", "rem-j-1"),
        ("device", "edit", "rem-j-1", "--group", "line-b", "--label", "k=v"),
        ("device", "suspend", "rem-j-1"), ("device", "resume", "rem-j-1"),
        ("device", "revoke", "rem-j-1", "--reason", "test"), ("device", "decommission", "rem-j-2"),
        ("token", "create", "--count", "3", "--prefix", "rem-tok", "--out", str(token_file)),
        ("identity", "list"), ("identity", "show", "op-admin"),
        ("identity", "add", "rem-json", "--role", "viewer", "--out", str(tmp_path / "ident")),
        ("identity", "revoke", "rem-json", "--reason", "test"),
        ("audit",), ("audit", "--device", long_id), ("audit", "--actor", "svc.op-admin", "--limit", "3"),
    ]
    for args in json_commands:
        proc = admin.cli(*args, "--json")
        assert proc.returncode == 0, f"{args}: {proc.stderr}"
        json.loads(proc.stdout)  # parses
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    table_commands = [("device", "list"), ("device", "list", "--all"), ("device", "show", long_id),
                      ("identity", "list"), ("identity", "show", "op-admin"), ("audit",),
                      ("audit", "--device", long_id)]
    for args in table_commands:
        text = admin.ok(*args)
        lines = text.splitlines()
        assert lines and all(len(line) <= 80 for line in lines), f"{args}:\n{text}"
    listing = admin.ok("device", "list", "--id-prefix", "rem-w")
    assert long_id[:19] + "\u2026" in listing  # cut, not wrapped
    assert sum(1 for line in listing.splitlines() if line.startswith("rem-w")) == 1


def test_device_list_pages_and_csv(remote):
    hub, _, ops = remote
    viewer = ops["viewer"]
    for n in range(5):
        hub.add_device(f"rem-page-{n}")
    proc = viewer.cli("device", "list", "--id-prefix", "rem-page", "--limit", "2", "--json")
    assert [d["id"] for d in json.loads(proc.stdout)] == ["rem-page-0", "rem-page-1"]
    cursor = proc.stderr.split("--cursor ")[1].split()[0]
    page2 = viewer.json("device", "list", "--id-prefix", "rem-page", "--limit", "2", "--cursor", cursor)
    assert [d["id"] for d in page2] == ["rem-page-2", "rem-page-3"]
    every = viewer.json("device", "list", "--id-prefix", "rem-page", "--limit", "2", "--all")
    assert [d["id"] for d in every] == [f"rem-page-{n}" for n in range(5)]
    table = viewer.ok("device", "list", "--id-prefix", "rem-page", "--limit", "2", "--all")
    assert table.count("rem-page-") == 5 and table.rstrip().endswith("5 device(s)") and table.count("device ") == 1
    rows = list(csv.DictReader(io.StringIO(viewer.ok("device", "list", "--id-prefix", "rem-page", "--csv"))))
    assert [r["id"] for r in rows] == [f"rem-page-{n}" for n in range(5)]
    assert_clean_error(viewer.cli("device", "list", "--expires-before", "soon"), "--expires-before")


def test_offline_the_api_answers_in_process_and_serve_sees_it(tmp_path):
    """No hub running: the CLI starts the API in its own process (same handlers, the local operator identity);
    what it records is there when `serve` starts."""
    hub = init_hub(tmp_path)
    token = hub.add_device("off-1", "--group", "line-a")
    hub.add_device("off-2")
    out = one_line(hub.cli_ok("device", "suspend", "off-2"))
    assert out == ("off-2: suspended; the hub is not running: recorded; the broker enforces it from the registry "
                   "when it starts")
    assert hub.cli_json("device", "revoke", "off-2", "--reason", "keyCompromise")["hub_running"] is False
    rows = hub.cli_json("audit", "--device", "off-1")
    assert {r["actor"] for r in rows} == {"svc.local-admin"}
    assert not (hub.dir / "api.addr").exists()
    hub.start()
    try:
        listed = hub.device_list()
        assert listed["off-1"]["groups"] == ["line-a"] and listed["off-2"]["status"] == "revoked"
        leaf = EstClient(hub.url, cafile=str(hub.root_pem)).simpleenroll(make_csr(new_key(), "off-1"), "off-1",
                                                                         token)[0]
        assert leaf.subject.rfc4514_string() == f"CN=off-1,O={FLEET}"
        assert (hub.dir / "api.addr").exists()
        out = one_line(hub.cli_ok("device", "suspend", "off-1"))
        assert out.startswith("off-1: suspended; enforced by the running hub in "), out
    finally:
        assert hub.stop() == 0
        hub.kill()
    assert not (hub.dir / "api.addr").exists()


def test_an_older_hub_directory_gets_its_local_operator(tmp_path):
    """A hub directory from before the local operator identity (no tls/local-admin.*): the CLI makes it, offline."""
    hub = init_hub(tmp_path)
    for f in ("local-admin.pem", "local-admin.key"):
        (hub.dir / "tls" / f).unlink()
    hub.add_device("old-1")
    assert (hub.dir / "tls" / "local-admin.key").stat().st_mode & 0o077 == 0
    rows = hub.query("SELECT status FROM identity_certificates WHERE identity = 'local-admin' ORDER BY issued_at")
    assert [r["status"] for r in rows] == ["superseded", "active"]
    assert hub.cli_json("audit", "--device", "old-1")[0]["actor"] == "svc.local-admin"


def test_the_cli_never_imports_the_server_side_for_a_remote_revoke(remote):
    """The fast path to a remote hub: the stdlib client only (no aiohttp, cryptography, typer, rich)."""
    hub, url, ops = remote
    hub.add_device("rem-fast-1")
    code = ("import sys; from hub.cli.entry import status_fast_path; "
            "rc = status_fast_path(['device', 'suspend', 'rem-fast-1']); "
            "print(rc, sorted(m for m in ('typer', 'rich', 'cryptography', 'sqlite_utils', 'aiohttp') "
            "if m in sys.modules))")
    env = {**cli_env(), "HOME": str(ops["operator"].home)}
    env.pop("XDG_CONFIG_HOME", None)
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env,
                          cwd=ROOT)
    assert proc.stdout.strip().splitlines()[-1] == "0 []", proc.stdout + proc.stderr
    assert hub.show("rem-fast-1")["device"]["status"] == "suspended"
