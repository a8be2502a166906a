"""Fleet jobs against a real `tessera-hub serve` with real agents (SoftHSM keys, Mosquitto with the authz plugin).

One hub for the module with five running agents (jb-1 .. jb-5, group `jobs`) and one enrolled device whose agent
is started only when a test needs it (jb-off). Operators are service identities (`tessera-hub identity add`). The
hub restart test runs last (it restarts the hub on the same ports, so the agents reconnect by themselves).
"""

from __future__ import annotations

import http.client
import json
import ssl
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest

from tests.helpers import free_port
from tests.integration import hubfixtures
from tests.integration.agentfixtures import new_device, telemetry_hub, wait_until
from tests.integration.brokerfixtures import BROKER_LIMITS, wait_ready

pytestmark = pytest.mark.integration
RUNNING = ("jb-1", "jb-2", "jb-3", "jb-4", "jb-5")


@dataclass
class Answer:
    status: int
    body: bytes

    def json(self):
        return json.loads(self.body)


class Fleet:
    def __init__(self, hub, api_port: int):
        self.hub, self.port = hub, api_port
        self.devices: dict = {}

    def call(self, method: str, path: str, who: str = "operator", body=None) -> Answer:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(self.hub.root_pem))
        d = self.hub.dir / "identities" / who
        ctx.load_cert_chain(str(d / f"{who}.pem"), str(d / f"{who}.key"))
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=ctx, timeout=60)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
            resp = conn.getresponse()
            return Answer(resp.status, resp.read())
        finally:
            conn.close()

    def ok(self, method: str, path: str, body=None, status: int = 200, who: str = "operator"):
        ans = self.call(method, path, who, body)
        assert ans.status == status, (method, path, ans.status, ans.body)
        return ans.json()

    def create(self, selector: dict, **spec) -> dict:
        """A dry run, then the job with the dry run's count (201)."""
        body = {"name": "test job", "command": "ping", "selector": selector, **spec}
        dry = self.ok("POST", "/api/v1/jobs", body)
        assert dry["dry_run"] is True
        return self.ok("POST", "/api/v1/jobs", {**body, "confirm_count": dry["matched"]}, status=201)

    def job(self, job_id: int) -> dict:
        return self.ok("GET", f"/api/v1/jobs/{job_id}")

    def wait_job(self, job_id: int, states=("completed", "aborted", "cancelled"), timeout: float = 60.0) -> dict:
        return wait_until(lambda: (j := self.job(job_id))["state"] in states and j, timeout,
                          f"job {job_id} in {states}")

    def rows(self, job_id: int, state: str | None = None) -> dict[str, dict]:
        out, cursor = {}, None
        while True:
            q = f"/api/v1/jobs/{job_id}/devices?limit=2" + (f"&state={state}" if state else "") + \
                (f"&cursor={cursor}" if cursor else "")
            page = self.ok("GET", q)
            out.update({r["device_id"]: r for r in page["items"]})
            cursor = page["next_cursor"]
            if cursor is None:
                return out


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    base = tmp_path_factory.mktemp("jobs")
    api_port = free_port()
    with telemetry_hub(base, api_port=api_port, **BROKER_LIMITS) as hub:
        wait_ready(hub)
        for role in ("viewer", "operator"):
            hub.cli_ok("identity", "add", role, "--role", role)
        f = Fleet(hub, api_port)
        try:
            for device_id in (*RUNNING, "jb-off"):
                token = hub.add_device(device_id, "--group", "jobs" if device_id in RUNNING else "spare")
                dev, _ = new_device(hub, base / "devices", device_id, register=False, interval=5.0)
                dev.enroll_ok(token)
                f.devices[device_id] = dev
            for device_id in RUNNING:
                f.devices[device_id].start()
            for device_id in RUNNING:
                f.devices[device_id].wait_state("online")
            wait_until(lambda: all(d["online"] for d in f.ok("GET", "/api/v1/devices?group=jobs")["items"]), 30,
                       "the agents' presence in the registry")
            yield f
        finally:
            for dev in f.devices.values():
                dev.destroy()


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --- creation ---------------------------------------------------------------------------------------------------

def test_dry_run_then_confirm_count_and_409_for_a_stale_count(fleet):
    body = {"name": "dry", "command": "ping", "selector": {"group": "jobs"}}
    assert fleet.ok("POST", "/api/v1/jobs", body) == {"matched": 5, "dry_run": True}
    before = fleet.ok("GET", "/api/v1/jobs?limit=1000")["items"]
    ans = fleet.call("POST", "/api/v1/jobs", body={**body, "confirm_count": 4})
    assert ans.status == 409 and "matches 5 devices now, not 4" in ans.json()["detail"]
    assert fleet.ok("GET", "/api/v1/jobs?limit=1000")["items"] == before  # nothing created
    for bad, param in (({**body, "command": "Bad!"}, "command"), ({**body, "rate_per_minute": 0}, "rate_per_minute"),
                       ({**body, "offline": "maybe"}, "offline"), ({**body, "selector": {}}, "selector"),
                       ({**body, "deadline": "2030-01-01T00:00:00Z"}, "deadline"),
                       ({**body, "abort_percent": 101}, "abort_percent"), ({**body, "extra": 1}, "body")):
        ans = fleet.call("POST", "/api/v1/jobs", body={**bad, "confirm_count": 5})
        assert ans.status == 400 and ans.json()["param"] == param, (bad, ans.body)
    ans = fleet.call("POST", "/api/v1/jobs", body={"command": "ping", "selector": {"group": "jobs"},
                                                   "confirm_count": 5})
    assert ans.status == 400 and ans.json()["param"] == "name"
    assert fleet.ok("GET", "/api/v1/jobs?limit=1000")["items"] == before


def test_a_viewer_reads_but_gets_403_on_every_post(fleet):
    job = fleet.create({"ids": ["jb-1"]}, rate_per_minute=600)
    assert fleet.ok("GET", f"/api/v1/jobs/{job['id']}", who="viewer")["id"] == job["id"]
    assert fleet.ok("GET", "/api/v1/jobs", who="viewer")["items"]
    for path, body in (("/api/v1/jobs", {"name": "x", "command": "ping", "selector": {"ids": ["jb-1"]}}),
                       (f"/api/v1/jobs/{job['id']}/cancel", None), (f"/api/v1/jobs/{job['id']}/pause", None),
                       ("/api/v1/devices/actions/renew", {"selector": {"ids": ["jb-1"]}}),
                       ("/api/v1/devices/actions/command", {"selector": {"ids": ["jb-1"]}, "command": "ping"}),
                       ("/api/v1/devices/jb-1/commands", {"command": "ping"})):
        ans = fleet.call("POST", path, who="viewer", body=body)
        assert ans.status == 403 and "act" in ans.json()["detail"], (path, ans.body)
    fleet.wait_job(job["id"])


# --- rollouts ---------------------------------------------------------------------------------------------------

def test_a_ping_job_completes_with_every_device_acked(fleet):
    job = fleet.create({"group": "jobs"}, name="ping the fleet", rate_per_minute=600, timeout_s=30)
    assert job["state"] == "running" and job["total"] == 5 and job["created_by"] == "svc.operator"
    assert job["counts"]["queued"] + job["counts"]["sent"] + job["counts"]["acked"] == 5
    done = fleet.wait_job(job["id"])
    assert done["state"] == "completed" and done["finished"] and done["reason"] is None, done
    assert done["counts"] == {"queued": 0, "sent": 0, "acked": 5, "failed": 0, "timed_out": 0, "offline": 0}
    rows = fleet.rows(job["id"])
    assert sorted(rows) == list(RUNNING)
    for row in rows.values():
        assert row["state"] == "acked" and json.loads(row["detail"]) == {"pong": True}
        assert at(row["sent_at"]) <= at(row["finished_at"])
    assert set(fleet.rows(job["id"], "acked")) == set(RUNNING) and not fleet.rows(job["id"], "failed")
    audit = fleet.hub.query("SELECT actor, action, detail FROM audit WHERE action LIKE 'job.%' AND detail LIKE ?",
                            (f"job {job['id']} %",))
    assert [(a["actor"], a["action"]) for a in audit] == [("svc.operator", "job.create"), ("hub", "job.complete")]


def test_the_rate_spaces_the_sends(fleet):
    job = fleet.create({"ids": ["jb-1", "jb-2", "jb-3", "jb-4"]}, rate_per_minute=30)  # one every 2 s
    fleet.wait_job(job["id"], timeout=30)
    sent = sorted(at(r["sent_at"]) for r in fleet.rows(job["id"]).values())
    gaps = [(b - a).total_seconds() for a, b in zip(sent, sent[1:])]
    assert len(gaps) == 3 and all(g >= 1.9 for g in gaps), gaps


def test_an_unknown_command_fails_on_the_devices_and_the_job_aborts(fleet):
    job = fleet.create({"group": "jobs"}, command="frobnicate", rate_per_minute=20, abort_percent=10,
                       min_finished=2)
    done = fleet.wait_job(job["id"], timeout=30)
    assert done["state"] == "aborted" and "failed or timed out" in done["reason"], done
    assert done["counts"]["failed"] >= 2 and done["counts"]["queued"] >= 1, done  # stopped before the end
    failed = fleet.rows(job["id"], "failed")
    assert all(r["detail"] == "unknown command 'frobnicate'" for r in failed.values()), failed
    assert fleet.call("POST", f"/api/v1/jobs/{job['id']}/resume").status == 409


def test_offline_device_under_fail_is_marked_offline_at_once(fleet):
    job = fleet.create({"ids": ["jb-1", "jb-off"]}, rate_per_minute=600, offline="fail")
    done = fleet.wait_job(job["id"])
    assert done["state"] == "completed" and done["counts"]["acked"] == 1 and done["counts"]["offline"] == 1
    row = fleet.rows(job["id"])["jb-off"]
    assert row["state"] == "offline" and row["sent_at"] is None and row["finished_at"]


def test_offline_device_under_wait_gets_the_command_when_it_comes_online(fleet):
    job = fleet.create({"ids": ["jb-off"]}, rate_per_minute=600, offline="wait")
    time.sleep(1.5)  # several ticks: it stays queued
    assert fleet.job(job["id"])["counts"]["queued"] == 1 and fleet.job(job["id"])["state"] == "running"
    dev = fleet.devices["jb-off"]
    dev.start()
    try:
        dev.wait_state("online")
        done = fleet.wait_job(job["id"])
        assert done["state"] == "completed" and done["counts"]["acked"] == 1, done
    finally:
        dev.stop()
    wait_until(lambda: not fleet.ok("GET", "/api/v1/devices/jb-off")["online"], 30, "jb-off offline again")


def test_wait_ends_at_the_deadline(fleet):
    deadline = (datetime.now(timezone.utc) + timedelta(seconds=2)).isoformat()
    job = fleet.create({"ids": ["jb-off", "jb-2"]}, rate_per_minute=600, offline="wait", deadline=deadline)
    done = fleet.wait_job(job["id"], timeout=30)
    assert done["state"] == "completed" and done["counts"]["acked"] == 1 and done["counts"]["offline"] == 1
    assert at(done["finished"]) >= at(deadline)
    assert "deadline" in fleet.rows(job["id"])["jb-off"]["detail"]


def test_renew_with_key_rotation_gives_a_new_certificate_and_key(fleet):
    dev = fleet.devices["jb-3"]
    before_serial, before_key = dev.status_file()["cert_serial"], dev.status_file()["key_uri"]
    body = {"selector": {"ids": ["jb-3"]}, "rotate_key": True, "rate_per_minute": 600}
    assert fleet.ok("POST", "/api/v1/devices/actions/renew", body) == {"matched": 1, "dry_run": True}
    job = fleet.ok("POST", "/api/v1/devices/actions/renew", {**body, "confirm_count": 1}, status=201)
    assert job["command"] == "renew" and job["args"] == {"rotate_key": True} and job["name"] == "renew by selector"
    done = fleet.wait_job(job["id"])
    assert done["state"] == "completed" and done["counts"]["acked"] == 1, done
    st = wait_until(lambda: (s := dev.status_file()).get("cert_serial") not in (None, before_serial)
                    and s.get("state") == "online" and s, 90, "jb-3 online with a new certificate")
    assert st["key_uri"] != before_key
    certs = {c["serial"]: c["status"] for c in fleet.ok("GET", "/api/v1/devices/jb-3")["certificates"]}
    assert certs[st["cert_serial"]] == "active" and certs[before_serial] != "active"


def test_bulk_command_creates_a_job(fleet):
    body = {"selector": {"ids": ["jb-4", "jb-5"]}, "command": "report", "rate_per_minute": 600}
    assert fleet.ok("POST", "/api/v1/devices/actions/command", body) == {"matched": 2, "dry_run": True}
    assert fleet.call("POST", "/api/v1/devices/actions/command", body={**body, "confirm_count": 3}).status == 409
    job = fleet.ok("POST", "/api/v1/devices/actions/command", {**body, "confirm_count": 2}, status=201)
    done = fleet.wait_job(job["id"])
    assert done["state"] == "completed" and done["counts"]["acked"] == 2
    assert json.loads(fleet.rows(job["id"])["jb-4"]["detail"])["device"] == "jb-4"


def test_pause_resume_cancel(fleet):
    job = fleet.create({"group": "jobs"}, rate_per_minute=6)  # one device every 10 s
    wait_until(lambda: fleet.job(job["id"])["counts"]["acked"] == 1, 15, "the first device acked")
    paused = fleet.ok("POST", f"/api/v1/jobs/{job['id']}/pause")
    assert paused["state"] == "paused"
    assert fleet.ok("POST", f"/api/v1/jobs/{job['id']}/pause")["state"] == "paused"  # no change
    time.sleep(11)  # past the next send slot: nothing is sent while paused
    assert fleet.job(job["id"])["counts"]["queued"] == 4
    assert fleet.ok("POST", f"/api/v1/jobs/{job['id']}/resume")["state"] == "running"
    wait_until(lambda: fleet.job(job["id"])["counts"]["acked"] == 2, 15, "a second device after resume")
    cancelled = fleet.ok("POST", f"/api/v1/jobs/{job['id']}/cancel")
    assert cancelled["state"] == "cancelled" and cancelled["reason"] == "cancelled by svc.operator"
    time.sleep(1)
    assert fleet.job(job["id"])["counts"]["queued"] >= 2
    for action in ("cancel", "pause", "resume"):
        ans = fleet.call("POST", f"/api/v1/jobs/{job['id']}/{action}")
        assert ans.status == 409 and "cancelled" in ans.json()["detail"]
    actions = [(r["actor"], r["action"]) for r in fleet.hub.query(
        "SELECT actor, action FROM audit WHERE action LIKE 'job.%' AND detail LIKE ? ORDER BY id",
        (f"job {job['id']} %",))]
    assert actions == [("svc.operator", a) for a in ("job.create", "job.pause", "job.resume", "job.cancel")]


def test_one_command_to_one_device_waits_for_its_ack(fleet):
    ans = fleet.ok("POST", "/api/v1/devices/jb-1/commands", {"command": "ping", "wait_s": 10})
    assert ans["device_id"] == "jb-1" and ans["ack"]["ok"] is True and ans["ack"]["result"] == {"pong": True}
    assert ans["ack"]["id"] == ans["id"]
    nowait = fleet.call("POST", "/api/v1/devices/jb-1/commands", body={"command": "ping"})
    assert nowait.status == 202 and nowait.json()["ack"] is None
    off = fleet.call("POST", "/api/v1/devices/jb-off/commands", body={"command": "ping", "wait_s": 1})
    assert off.status == 409 and "not online" in off.json()["detail"]
    assert fleet.call("POST", "/api/v1/devices/jb-nobody/commands", body={"command": "ping"}).status == 404
    bad = fleet.call("POST", "/api/v1/devices/jb-1/commands", body={"command": "ping", "wait_s": 31})
    assert bad.status == 400 and bad.json()["param"] == "wait_s"


def test_jobs_list_newest_first_with_cursor(fleet):
    made = [fleet.create({"ids": ["jb-none"]}, name=f"empty {n}")["id"] for n in range(4)]  # over no device
    assert fleet.wait_job(made[-1])["state"] == "completed"
    ids, cursor = [], None
    while True:
        page = fleet.ok("GET", "/api/v1/jobs?limit=3" + (f"&cursor={cursor}" if cursor else ""))
        ids += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert set(made) <= set(ids) and ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)
    done = fleet.ok("GET", "/api/v1/jobs?state=completed&limit=1000")["items"]
    assert set(made) <= {j["id"] for j in done} and all(j["state"] == "completed" for j in done)
    assert fleet.call("GET", "/api/v1/jobs?cursor=bogus").status == 400
    assert fleet.call("GET", "/api/v1/jobs/999999").status == 404
    assert fleet.call("GET", "/api/v1/jobs/abc/devices").status == 404


def test_max_in_flight_one_sends_each_device_after_the_previous_answered(fleet):
    job = fleet.create({"group": "jobs"}, rate_per_minute=6000, max_in_flight=1, retries=2,
                       ramp={"start_per_minute": 600, "factor": 2, "every_acked": 2})
    assert job["max_in_flight"] == 1 and job["retries"] == 2
    assert job["ramp"] == {"start_per_minute": 600, "factor": 2, "every_acked": 2}
    done = fleet.wait_job(job["id"])
    assert done["state"] == "completed" and done["counts"]["acked"] == 5, done
    rows = sorted(fleet.rows(job["id"]).values(), key=lambda r: r["sent_at"])
    for before, after in zip(rows, rows[1:]):
        assert at(after["sent_at"]) >= at(before["finished_at"]), (before, after)
    bad = fleet.call("POST", "/api/v1/jobs", body={"name": "x", "command": "ping", "selector": {"group": "jobs"},
                                                    "ramp": {"factor": 2}, "confirm_count": 5})
    assert bad.status == 400 and bad.json()["param"] == "ramp"


def test_the_cli_is_a_client_of_the_jobs_api(fleet):
    hub = fleet.hub
    dry = hub.cli_ok("job", "create", "cli ping", "--command", "ping", "--id", "jb-1,jb-2", "--rate", "600")
    assert "2 devices match" in dry and "--confirm-count 2" in dry
    stale = hub.cli("job", "create", "cli ping", "--command", "ping", "--id", "jb-1,jb-2", "--confirm-count", "3")
    assert stale.returncode == 1 and "matches 2 devices now, not 3" in " ".join(stale.stderr.split())
    job = json.loads(hub.cli_ok("job", "create", "cli ping", "--command", "ping", "--id", "jb-1", "--id", "jb-2",
                                "--rate", "600", "--max-in-flight", "2", "--retries", "1", "--yes", "--json"))
    assert job["total"] == 2 and job["created_by"] == "svc.local-admin"
    assert job["max_in_flight"] == 2 and job["retries"] == 1
    done = json.loads(hub.cli_ok("job", "wait", str(job["id"]), "--timeout", "60", "--json"))
    assert done["state"] == "completed"
    assert done["counts"]["acked"] == 2
    rows = json.loads(hub.cli_ok("job", "devices", str(job["id"]), "--json"))
    assert [(r["device_id"], r["state"]) for r in rows] == [("jb-1", "acked"), ("jb-2", "acked")]
    shown = hub.cli_ok("job", "show", str(job["id"]))
    assert "at most 2 in flight; 1 retries after a timeout" in shown and "acked 2" in shown
    table = hub.cli_ok("job", "list")
    assert all(len(line) <= 80 for line in table.splitlines()) and "cli ping" in table
    again = hub.cli("job", "cancel", str(job["id"]))
    assert again.returncode == 1 and "completed" in again.stderr
    failing = json.loads(hub.cli_ok("job", "create", "cli fail", "--command", "nope", "--id", "jb-1", "--rate",
                                    "600", "--yes", "--json"))
    waited = hub.cli("job", "wait", str(failing["id"]), "--timeout", "60")
    assert waited.returncode == 1 and "aborted" in waited.stdout, (waited.stdout, waited.stderr)


# --- last: a hub restart mid-job --------------------------------------------------------------------------------

def _restart_on_the_same_ports(hub) -> None:
    ports = iter([hub.port, hub.mqtt_port])
    original = hubfixtures.free_port
    hubfixtures.free_port = lambda: next(ports)
    try:
        hub.proc = None
        hub.start()
    finally:
        hubfixtures.free_port = original
    wait_ready(hub)


def test_a_job_survives_a_hub_restart(fleet):
    job = fleet.create({"group": "jobs"}, rate_per_minute=12, timeout_s=60)  # one device every 5 s
    wait_until(lambda: fleet.job(job["id"])["counts"]["acked"] >= 2, 30, "two devices acked")
    assert fleet.hub.stop() == 0
    stopped = fleet.hub.query("SELECT state, n_acked FROM jobs WHERE id = ?", (job["id"],))[0]
    assert stopped["state"] == "running" and 2 <= stopped["n_acked"] < 5
    restarted = datetime.now(timezone.utc)
    _restart_on_the_same_ports(fleet.hub)
    for device_id in RUNNING:
        fleet.devices[device_id].wait_state("online", timeout=60)
    done = fleet.wait_job(job["id"], timeout=120)
    assert done["state"] == "completed" and done["counts"]["acked"] == 5, done
    after = [r for r in fleet.rows(job["id"]).values() if at(r["sent_at"]) > restarted]
    assert after, "no device was sent the command after the restart"
