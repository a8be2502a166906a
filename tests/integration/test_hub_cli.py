"""The `tessera-hub` command line against a running hub: errors, factory batches, suspend/resume, device list."""

from __future__ import annotations

import csv
import datetime as dt
import re
import stat
import subprocess
import time

import pytest

from agent.estclient import EstClient, EstClientError
from tests.integration.hubfixtures import (  # noqa: F401  (hub is a fixture)
    FLEET, hub, init_hub, make_csr, new_key, one_line, run_cli,
)

pytestmark = pytest.mark.integration


def est_enroll(hub, device_id: str, token: str):
    return EstClient(hub.url, cafile=str(hub.root_pem)).simpleenroll(make_csr(new_key(), device_id), device_id,
                                                                     token)[0]


def assert_clean_error(proc, *needles: str, progress: bool = False) -> str:
    """Non-zero exit, nothing on stdout, an 'error: ...' message on stderr naming `needles`, no traceback.

    progress: the command shows a rich progress line on stderr first; the message is what follows it."""
    assert proc.returncode != 0
    assert proc.stdout == ""
    message = one_line(proc.stderr)
    if progress and "error: " in message:
        message = message[message.index("error: "):]
    assert message.startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in message, proc.stderr
    return message


# --- errors ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad_id", ["Bad_ID", "-leading-dash", "x" * 64, "hub", "dev.1", "dev 1", "dév"])
def test_device_add_with_a_bad_id(hub, bad_id):
    before = hub.query("SELECT count(*) AS n FROM devices")[0]["n"]
    proc = run_cli("device", "add", "--dir", str(hub.dir), "--", bad_id)
    assert_clean_error(proc, repr(bad_id))
    assert hub.query("SELECT count(*) AS n FROM devices")[0]["n"] == before


def test_cli_errors_are_one_line(hub, tmp_path):
    for proc in (hub.cli("device", "add", "Bad_ID"),
                 run_cli("device", "list", "--dir", str(tmp_path))):
        assert proc.returncode != 0
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_device_add_twice(hub):
    hub.add_device("cli-twice")
    assert_clean_error(hub.cli("device", "add", "cli-twice"), "already exists")


def test_device_add_and_token_out_write_a_private_file(hub, tmp_path):
    out = tmp_path / "token"
    assert hub.cli_ok("device", "add", "cli-out", "--out", str(out)) == ""  # nothing on stdout
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    token = out.read_text().strip()
    assert len(token) >= 32 and hub.show("cli-out")["device"]["status"] == "pending"
    # an existing file is refused before the hub is asked: no device, and the file is untouched
    assert_clean_error(hub.cli("device", "add", "cli-out-2", "--out", str(out)), "exists")
    assert out.read_text().strip() == token and hub.cli("device", "show", "cli-out-2").returncode == 1
    # a refused call leaves no file behind
    again = tmp_path / "again"
    assert_clean_error(hub.cli("device", "add", "cli-out", "--out", str(again)), "already exists")
    assert not again.exists()
    fresh = tmp_path / "fresh"
    shown = hub.cli_json("device", "token", "cli-out", "--out", str(fresh))
    assert "token" not in shown and shown["token_file"] == str(fresh)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600 and fresh.read_text().strip() != token
    est_enroll(hub, "cli-out", fresh.read_text().strip())


def test_device_show_unknown(hub):
    message = assert_clean_error(hub.cli("device", "show", "nope"), "'nope'")
    assert message == "error: no device 'nope'"
    assert_clean_error(hub.cli("device", "show", "nope", "--json"), "'nope'")


def test_dir_that_is_not_a_fleet(tmp_path):
    for args in (("device", "list"), ("device", "add", "dev-1"), ("serve",), ("audit",)):
        proc = run_cli(*args, "--dir", str(tmp_path), timeout=30)
        assert_clean_error(proc, "fleet.toml", str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # nothing was created there


def test_init_refuses_an_existing_fleet(hub):
    assert_clean_error(run_cli("init", "--fleet", FLEET, "--dir", str(hub.dir)), "refusing to overwrite")


def test_suspend_unknown_device_without_a_running_hub(tmp_path):
    h = init_hub(tmp_path)
    for action in ("suspend", "resume"):
        assert_clean_error(h.cli("device", action, "ghost"), "no device 'ghost'")
    assert_clean_error(h.cli("device", "revoke", "ghost", "--reason", "keyCompromise"), "no device 'ghost'")


def test_suspend_unknown_device_with_a_running_hub(hub):
    assert_clean_error(hub.cli("device", "suspend", "ghost"), "no device 'ghost'")


# --- factory batches ----------------------------------------------------------------------------------------------

def test_token_create_batch(hub, tmp_path):
    out = tmp_path / "tokens.csv"
    proc = hub.cli("token", "create", "--count", "25", "--prefix", "fac", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    with out.open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["device_id", "token"]
    body = rows[1:]
    assert [r[0] for r in body] == [f"fac-{n:05d}" for n in range(1, 26)]
    assert len({r[1] for r in body}) == 25 and all(len(r[1]) >= 20 for r in body)
    for r in body:  # tokens are in the file only, never in the registry or on stdout
        assert r[1] not in proc.stdout and r[1] not in proc.stderr
    stored = hub.query("SELECT token_hash FROM tokens WHERE device_id LIKE 'fac-%'")
    assert len(stored) == 25 and not {r[1] for r in body} & {s["token_hash"] for s in stored}
    listed = hub.device_list()
    assert all(listed[f"fac-{n:05d}"]["status"] == "pending" for n in range(1, 26))  # never enrolled

    for device_id, token in (body[0], body[-1]):
        leaf = est_enroll(hub, device_id, token)
        assert leaf.subject.rfc4514_string() == f"CN={device_id},O={FLEET}"
    assert hub.device_list()["fac-00001"]["cert_expires"] is not None
    assert hub.device_list()["fac-00002"]["cert_expires"] is None
    # a token is for its own device only
    with pytest.raises(EstClientError) as err:
        est_enroll(hub, "fac-00002", body[2][1])
    assert (err.value.status, err.value.code) == (401, "unauthorized")  # generic: the audit has the reason

    # the file is never overwritten, and a batch with a taken id writes nothing
    assert_clean_error(hub.cli("token", "create", "--count", "2", "--prefix", "fac", "--out", str(out)), "exists",
                       progress=True)
    other = tmp_path / "again.csv"
    proc = hub.cli("token", "create", "--count", "2", "--prefix", "fac", "--start", "25", "--out", str(other))
    assert_clean_error(proc, "device 'fac-00025' already exists", progress=True)
    assert not other.exists() and not list(tmp_path.glob("*.tmp"))
    assert "fac-00026" not in hub.device_list()


def test_token_file_has_lf_line_endings(hub, tmp_path):
    out = tmp_path / "lf.csv"
    hub.cli_ok("token", "create", "--count", "3", "--prefix", "lf", "--out", str(out))
    data = out.read_bytes()
    assert b"\r" not in data and data.count(b"\n") == 4 and data.startswith(b"device_id,token\n"), data[:40]


BAD_HUB_URLS = ["127.0.0.1:8443", "http://127.0.0.1:8443", "https://:8443", "https://hub:99999",
                "https://hub:8443/est", 'https://hub"x:8443', "https://user@hub:8443"]


def test_bundle_refuses_a_hub_url_that_is_not_https_with_a_host(hub, tmp_path):
    tokens = tmp_path / "b.csv"
    hub.cli_ok("token", "create", "--count", "2", "--prefix", "bu", "--out", str(tokens))
    out = tmp_path / "bundles"
    for url in BAD_HUB_URLS:
        proc = hub.cli("bundle", "--tokens", str(tokens), "--out", str(out), "--hub-url", url)
        assert_clean_error(proc, "--hub-url must be an https URL with a host", repr(url), progress=True)
        assert not out.exists()  # refused before anything was written
    bad_host = hub.cli("bundle", "--tokens", str(tokens), "--out", str(out), "--hub-url", "https://hub:8443",
                       "--mqtt-host", 'x"\ny = "1')
    assert_clean_error(bad_host, "--mqtt-host must be a host name", progress=True)
    assert not out.exists()
    hub.cli_ok("bundle", "--tokens", str(tokens), "--out", str(out), "--hub-url", "https://[::1]:8443/")
    assert 'hub_url = "https://[::1]:8443"\n' in (out / "bu-00001" / "agent.toml").read_text()


@pytest.mark.parametrize("where, why", [("/proc/x", "No such file or directory"),
                                        ("/etc/hostname/x", "Not a directory")])
def test_init_in_an_impossible_directory_is_one_line_naming_it(where, why):
    message = assert_clean_error(run_cli("init", "--fleet", FLEET, "--dir", where))
    assert message == f"error: cannot create the hub directory {where}: {why}"


def test_init_failing_inside_the_directory_names_the_path(tmp_path):
    (tmp_path / "ca").write_text("not a directory")
    message = assert_clean_error(run_cli("init", "--fleet", FLEET, "--dir", str(tmp_path)))
    assert message == f"error: cannot create the fleet in {tmp_path}: {tmp_path / 'ca'}: File exists"


# --- suspend / resume ---------------------------------------------------------------------------------------------

def test_suspend_blocks_enrollment_and_resume_restores_it(hub):
    device_id = "cli-susp-1"
    token = hub.add_device(device_id)
    proc = hub.cli("device", "suspend", device_id)
    assert proc.returncode == 0, proc.stderr
    assert f"{device_id}: suspended" in proc.stdout
    assert hub.device_list()[device_id]["status"] == "suspended"
    assert_clean_error(hub.cli("device", "token", device_id), "suspended")

    with pytest.raises(EstClientError) as err:
        est_enroll(hub, device_id, token)
    assert (err.value.status, err.value.code) == (403, "device_not_active")
    assert hub.cert_count(device_id) == 0

    proc = hub.cli("device", "resume", device_id)
    assert proc.returncode == 0, proc.stderr
    assert f"{device_id}: pending" in proc.stdout  # it never enrolled: back to pending
    leaf = est_enroll(hub, device_id, token)  # the refused attempt did not use the token up
    assert leaf.subject.rfc4514_string() == f"CN={device_id},O={FLEET}"
    row = hub.device_list()[device_id]
    assert row["status"] == "active"
    assert dt.datetime.fromisoformat(row["cert_expires"]) == leaf.not_valid_after_utc
    actions = [r["action"] for r in hub.cli_json("audit", "--device", device_id, "--limit", "20")]
    assert "device.suspended" in actions and "device.active" in actions


# --- device list --------------------------------------------------------------------------------------------------

def test_device_list_json_fields(hub):
    hub.add_device("cli-list-new", "--group", "line-a", "--label", "site=berlin")
    token = hub.add_device("cli-list-enrolled")
    leaf = est_enroll(hub, "cli-list-enrolled", token)
    hub.add_device("cli-list-susp")
    hub.cli_ok("device", "suspend", "cli-list-susp")

    rows = hub.device_list()

    for row in rows.values():
        assert {"id", "status", "online", "last_seen", "cert_expires"} <= set(row)
    new, enrolled, susp = rows["cli-list-new"], rows["cli-list-enrolled"], rows["cli-list-susp"]
    assert (new["status"], new["online"], new["last_seen"], new["cert_expires"]) == ("pending", False, None, None)
    assert new["groups"] == ["line-a"] and new["labels"] == {"site": "berlin"}
    assert (enrolled["status"], enrolled["online"], enrolled["last_seen"]) == ("active", False, None)
    assert dt.datetime.fromisoformat(enrolled["cert_expires"]) == leaf.not_valid_after_utc
    assert susp["status"] == "suspended"
    # the table form lists them too
    table = hub.cli_ok("device", "list")
    assert table.rstrip().endswith(f"{len(rows)} device(s)")


def test_audit_json_records_cli_actions(hub):
    """The CLI is a client of the fleet API: its rows name the hub directory's operator identity, not "cli"."""
    hub.add_device("cli-audit-1")
    rows = hub.cli_json("audit", "--device", "cli-audit-1")
    assert [(r["action"], r["outcome"], r["actor"]) for r in rows] == [("token.create", "ok", "svc.local-admin"),
                                                                      ("device.add", "ok", "svc.local-admin")]
    calls = hub.cli_json("audit", "--actor", "svc.local-admin", "--action", "api.devices.create", "--limit", "1")
    assert [(r["action"], r["outcome"]) for r in calls] == [("api.devices.create", "ok")]


# --- human output at 80 columns (issue 15) ------------------------------------------------------------------------

LONG_ID = "cli-human-" + "x" * 53  # 63 characters: the longest id there is
STAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def assert_fits(text: str) -> list[str]:
    lines = text.splitlines()
    assert lines and max(len(line) for line in lines) <= 80, text
    return lines


def test_device_show_prints_human_values(hub):
    hub.add_device("cli-human-1", "--group", "sensors", "--group", "line-b", "--label", "site=berlin",
                   "--label", "rack=7")
    hub.add_device("cli-human-2")
    shown = hub.cli_ok("device", "show", "cli-human-1")
    fields = dict(line.split(None, 1) if len(line.split(None, 1)) == 2 else (line.strip(), "")
                  for line in assert_fits(shown)[1:] if not line.startswith(("at ", "20")))
    assert fields["groups"] == "line-b, sensors" or fields["groups"] == "sensors, line-b", shown
    assert fields["labels"] in ("rack=7, site=berlin", "site=berlin, rack=7"), shown
    assert fields["online"] == "no" and fields["last"] == "seen   -", shown
    bare = hub.cli_ok("device", "show", "cli-human-2")
    for repr_ in ("[", "]", "{", "}", "None", "False", "True", "'"):
        assert repr_ not in shown and repr_ not in bare, (repr_, shown, bare)
    assert re.search(r"^groups +-$", bare, re.M) and re.search(r"^labels +-$", bare, re.M), bare
    assert re.search(r"^created +" + STAMP.pattern + "$", bare, re.M), bare
    assert "api.devices" not in bare  # the API's per-call rows are not the device's history


def test_list_and_audit_keep_timestamps_whole_at_80_columns(hub):
    token = hub.add_device(LONG_ID, "--group", "a-rather-long-group-name", "--group", "another-long-group")
    leaf = est_enroll(hub, LONG_ID, token)
    hub.cli_ok("device", "suspend", LONG_ID, "--reason", "a reason long enough to want the whole width " * 3)
    listed = assert_fits(hub.cli_ok("device", "list", "--id-prefix", "cli-human-x"))
    row = next(line for line in listed if line.startswith("cli-human-"))
    assert f"{leaf.not_valid_after_utc:%Y-%m-%d}" in row, listed  # "cert until" whole, not "2026-12-…"
    assert "\u2026" in row.split()[0]  # (the id gave way instead)
    audit = assert_fits(hub.cli_ok("audit", "--device", LONG_ID))
    assert len(audit) >= 4
    for line in audit[1:]:
        assert STAMP.match(line), audit
    shown = "\n".join(assert_fits(hub.cli_ok("device", "show", LONG_ID)))
    assert re.search(r"^\S+ +\S+ +" + f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M}", shown, re.M), shown


def test_audit_of_an_unknown_device_says_so(hub):
    message = assert_clean_error(hub.cli("audit", "--device", "nosuch"), "'nosuch'")
    assert message == "error: no device 'nosuch'"
    assert_clean_error(hub.cli("audit", "--device", "nosuch", "--json"), "no device 'nosuch'")
    # a device that exists with nothing matching is an empty answer; a decommissioned one still has its trail
    hub.add_device("cli-audit-gone")
    assert hub.cli_json("audit", "--device", "cli-audit-gone", "--action", "device.revoked") == []
    hub.cli_ok("device", "decommission", "cli-audit-gone")
    rows = hub.cli_json("audit", "--device", "cli-audit-gone")
    assert "device.add" in {r["action"] for r in rows}


def test_command_arguments_are_key_value_or_a_flag(hub):
    hub.add_device("cli-args-1")
    for cmd in (("device", "send", "cli-args-1", "ping"), ("job", "create", "j", "--command", "ping", "--id",
                                                           "cli-args-1")):
        bad = assert_clean_error(hub.cli(*cmd, "--arg", "=x"), "--arg '=x'", "argument")
        assert "label" not in bad
    # a bare name is a flag (true): the command goes as far as the device being offline
    proc = hub.cli("device", "send", "cli-args-1", "ping", "--arg", "rotate_key")
    assert_clean_error(proc, "not online")
    job = hub.cli_json("job", "create", "j", "--command", "renew", "--id", "cli-args-1", "--arg", "rotate_key",
                       "--arg", "n=3", "--yes")
    assert job["args"] == {"rotate_key": True, "n": 3}


# --- the serve process --------------------------------------------------------------------------------------------

def test_serve_stops_cleanly_on_sigterm(tmp_path):
    """SIGTERM to the hub's main thread: exit 0 at once, "hub stopped", hub.stop audited, ports closed."""
    h = init_hub(tmp_path)
    h.start()
    try:
        assert h.proc.poll() is None
        wait_ready(h)
        h.signal_thread(h.proc.pid)
        rc = h.proc.wait(timeout=10)
    finally:
        h.kill()
    assert rc == 0
    assert h.stdout_text().rstrip().endswith("hub stopped")
    actions = [r["action"] for r in h.query("SELECT action FROM audit ORDER BY id")]
    assert actions[-1] == "hub.stop" and "hub.start" in actions
    assert not h._accepts()
    assert not (h.dir / "admin.sock").exists()


def wait_ready(h, timeout: float = 10.0) -> None:
    """Until the hub has printed its last start-up line (then its main thread waits for a signal)."""
    deadline = time.monotonic() + timeout
    while "hub ready" not in h.stdout_text():
        assert time.monotonic() < deadline, h.stdout_text()
        time.sleep(0.02)
    time.sleep(0.3)


def test_sigterm_received_by_another_thread_stops_the_hub(tmp_path):
    """kill <pid> may hand SIGTERM to any thread; the hub must still stop at once (it used to block in a 60 s
    stop.wait() in its main thread, so a SIGTERM caught by another thread went unnoticed for up to a minute)."""
    h = init_hub(tmp_path)
    h.start()
    try:
        wait_ready(h)
        other = [t for t in h.threads() if t != h.proc.pid]
        assert other, "the hub runs several threads"
        h.signal_thread(other[0])
        try:
            rc = h.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            rc = None
    finally:
        if h.proc.poll() is None:
            h.signal_thread(h.proc.pid)  # what the handler should have done; then a normal exit
            h.proc.wait(timeout=10)
        h.kill()
    assert rc == 0, "tessera-hub serve did not exit within 10 s of a SIGTERM received by a non-main thread"


def test_a_failed_init_leaves_the_directory_as_it_found_it(tmp_path):
    given = tmp_path / "given"
    given.mkdir()
    (given / "ca").write_text("not a directory\n")  # init's CA step fails on it, after other steps wrote files
    proc = run_cli("init", "--fleet", FLEET, "--dir", str(given))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in given.iterdir()) == ["ca"] and (given / "ca").read_text() == "not a directory\n"
    fresh = tmp_path / "fresh"
    pin = tmp_path / "pin"
    pin.write_text("1234\n")
    pin.chmod(0o600)
    proc = run_cli("init", "--fleet", FLEET, "--dir", str(fresh), "--ca-key", "pkcs11:token=no-such-token",
                   "--ca-pin-source", f"file:{pin}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert not fresh.exists()  # made by init, removed again
