"""hub/jobs/runner.py ticked by hand on a fake clock over a real registry (a SQLite file and a PostgreSQL database,
`any_registry`; one runner: it holds the jobs lease). The MQTT side is a recorder standing in
for LiveHub.send_command (tests/integration/test_jobs.py runs the real one with real agents): rate, offline
policies, presence settling after a start, acks (also of commands sent before a restart), timeouts, abort."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from hub.api import queries
from hub.api.queries import Selector
from hub.broker import BrokerError
from hub.jobs import schema, store
from hub.jobs.runner import JobRunner
from hub.registry.store import Registry
from tests.integration.pgfixtures import any_registry, pg_server, pg_url, registry_target  # noqa: F401

T0 = datetime(2027, 1, 1, tzinfo=timezone.utc)


class Clock:
    def __init__(self):
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Publisher:
    """Records what the runner publishes (LiveHub.send_command's contract: returns the command id)."""

    def __init__(self, registry):
        self.registry, self.sent, self.down, self.n = registry, [], False, 0

    def send_command(self, device_id, command, args, actor="cli"):
        if self.down:
            raise BrokerError("the hub's admin connection to the broker is down")
        self.n += 1
        cid = f"c{self.n}"
        self.sent.append((device_id, command, args, actor, cid))
        return cid


@pytest.fixture
def env(any_registry):  # noqa: F811
    reg = any_registry
    queries.apply_schema(reg)
    schema.apply_schema(reg)
    reg.create_devices_with_tokens([(f"d-{n}", {}, ["g"]) for n in range(6)], "acme", T0, timedelta(days=1))
    clock = Clock()
    pub = Publisher(reg)
    return reg, clock, pub


def online(reg, clock, *ids, value=True):
    for device_id in ids:
        reg.mark_presence(device_id, value, clock())


def runner(reg, clock, pub, settle=0.0) -> JobRunner:
    r = JobRunner(pub, clock=clock, settle=settle)
    r.registry = reg
    return r


def job(reg, clock, **spec):
    base = {"name": "t", "command": "ping", "args": {}, "rate_per_minute": 60, "timeout_s": 30,
            "abort_percent": 50, "offline": "fail", "min_finished": None, "deadline": None, "selector": {"group": "g"}}
    sel = Selector.parse({"group": "g"})
    return store.create_job(reg, {**base, **spec}, sel, 6, "alice", clock())["id"]


def ticks(r, clock, seconds, step=0.2):
    for _ in range(int(round(seconds / step))):
        clock.advance(step)
        r.tick()


def ack_all(r, pub, ok=True):
    for device_id, _, _, _, cid in pub.sent:
        r.on_ack(device_id, {"id": cid, "ok": ok, **({"result": {"pong": True}} if ok else {"error": "boom"})})


def test_the_rate_spaces_the_sends_and_the_job_completes(env):
    reg, clock, pub = env
    online(reg, clock, *[f"d-{n}" for n in range(6)])
    r = runner(reg, clock, pub)
    job_id = job(reg, clock, rate_per_minute=30)  # one every 2 s
    r.tick()
    assert [s[0] for s in pub.sent] == ["d-0"] and pub.sent[0][3] == "alice (job 1)"
    ticks(r, clock, 10.0)
    assert len(pub.sent) == 6  # t=0, 2, 4, 6, 8, 10
    rows = {x["device_id"]: x for x in store.list_job_devices(reg, job_id, 10)[0]}
    sent_at = sorted(datetime.fromisoformat(x["sent_at"]) for x in rows.values())
    assert [(b - a).total_seconds() for a, b in zip(sent_at, sent_at[1:])] == pytest.approx([2.0] * 5, abs=0.21)
    ack_all(r, pub)
    r.tick()
    r.tick()
    got = store.get_job(reg, job_id)
    assert got["state"] == "completed" and got["counts"]["acked"] == 6


def test_offline_fail_marks_at_once_and_wait_keeps_queued(env):
    reg, clock, pub = env
    online(reg, clock, "d-0", "d-1")
    r = runner(reg, clock, pub)
    fail_id = job(reg, clock, rate_per_minute=600, offline="fail")
    r.tick()
    assert store.get_job(reg, fail_id)["counts"] == {"queued": 0, "sent": 2, "acked": 0, "failed": 0,
                                                     "timed_out": 0, "offline": 4}
    pub.sent.clear()
    wait_id = job(reg, clock, rate_per_minute=600, offline="wait")
    ticks(r, clock, 1.0)
    assert store.get_job(reg, wait_id)["counts"]["queued"] == 4 and len(pub.sent) == 2
    online(reg, clock, "d-4")
    ticks(r, clock, 1.0)  # the cursor wraps around and finds it
    assert [s[0] for s in pub.sent][-1] == "d-4" and store.get_job(reg, wait_id)["counts"]["queued"] == 3


def test_wait_deadline(env):
    reg, clock, pub = env
    r = runner(reg, clock, pub)
    job_id = job(reg, clock, offline="wait", deadline=T0 + timedelta(seconds=5))
    ticks(r, clock, 4.0)
    assert store.get_job(reg, job_id)["counts"]["queued"] == 6
    ticks(r, clock, 2.0)
    got = store.get_job(reg, job_id)
    assert got["state"] == "completed" and got["counts"]["offline"] == 6 and not pub.sent


def test_presence_settles_after_a_start(env):
    reg, clock, pub = env
    online(reg, clock, "d-0", "d-1")  # seen before the (re)start: stale
    clock.advance(60)
    r = runner(reg, clock, pub, settle=10.0)
    job_id = job(reg, clock, rate_per_minute=600, offline="fail")
    online(reg, clock, "d-1")  # reconnected since the start
    ticks(r, clock, 2.0)
    assert [s[0] for s in pub.sent] == ["d-1"] and store.get_job(reg, job_id)["counts"]["offline"] == 0
    ticks(r, clock, 10.0)  # settled: d-0's flag is trusted, the others fail as offline
    assert sorted(s[0] for s in pub.sent) == ["d-0", "d-1"]
    assert store.get_job(reg, job_id)["counts"]["offline"] == 4


def test_acks_of_commands_sent_before_a_restart_still_count(env):
    reg, clock, pub = env
    online(reg, clock, *[f"d-{n}" for n in range(6)])
    first = runner(reg, clock, pub)
    job_id = job(reg, clock, rate_per_minute=600, timeout_s=60)
    first.tick()
    assert len(pub.sent) == 6
    first.stop()  # (on PostgreSQL: gives the jobs lease up)
    second = runner(reg, clock, pub)  # a new hub process: nothing in memory
    ack_all(second, pub)
    second.tick()
    second.tick()
    got = store.get_job(reg, job_id)
    assert got["state"] == "completed" and got["counts"]["acked"] == 6


def test_timeouts_and_abort(env):
    reg, clock, pub = env
    online(reg, clock, *[f"d-{n}" for n in range(6)])
    r = runner(reg, clock, pub)
    job_id = job(reg, clock, rate_per_minute=30, timeout_s=3, abort_percent=30, min_finished=2)  # one every 2 s
    r.tick()
    ticks(r, clock, 3.2)  # sent at 0 and 2; the first timed out (more than 3 s without an ack)
    got = store.get_job(reg, job_id)
    assert len(pub.sent) == 2 and got["counts"]["timed_out"] == 1 and got["state"] == "running", got
    ticks(r, clock, 3.0)  # the second one times out too: 2 finished, 100% failed -> abort
    got = store.get_job(reg, job_id)
    assert got["state"] == "aborted" and "2 of 2 finished devices failed or timed out" in got["reason"], got
    assert got["counts"] == {"queued": 3, "sent": 1, "acked": 0, "failed": 0, "timed_out": 2, "offline": 0}
    sent = len(pub.sent)
    ticks(r, clock, 2.0)
    assert len(pub.sent) == sent  # an aborted job sends nothing more


def test_failed_acks_and_paused_jobs(env):
    reg, clock, pub = env
    online(reg, clock, *[f"d-{n}" for n in range(6)])
    r = runner(reg, clock, pub)
    job_id = job(reg, clock, rate_per_minute=60, abort_percent=100)
    r.tick()
    store.operator_action(reg, job_id, "pause", "bob", clock())
    ticks(r, clock, 3.0)
    assert len(pub.sent) == 1
    ack_all(r, pub, ok=False)
    r.tick()
    row = store.list_job_devices(reg, job_id, 1, state="failed")[0][0]
    assert row["device_id"] == "d-0" and row["detail"] == "boom"  # acks apply while paused
    store.operator_action(reg, job_id, "resume", "bob", clock())
    r.tick()
    assert len(pub.sent) == 2


def test_a_broker_outage_leaves_devices_queued(env):
    reg, clock, pub = env
    online(reg, clock, *[f"d-{n}" for n in range(6)])
    r = runner(reg, clock, pub)
    job_id = job(reg, clock, rate_per_minute=600)
    pub.down = True
    ticks(r, clock, 1.0)
    assert store.get_job(reg, job_id)["counts"]["queued"] == 6
    pub.down = False
    r.tick()
    assert store.get_job(reg, job_id)["counts"]["sent"] == 6


def test_a_ramp_speeds_the_rollout_up_as_devices_ack(env):
    reg, clock, pub = env
    online(reg, clock, *[f"d-{n}" for n in range(6)])
    r = runner(reg, clock, pub)
    job(reg, clock, rate_per_minute=6000, ramp={"start_per_minute": 6, "factor": 10, "every_acked": 1})
    r.tick()
    ticks(r, clock, 5.0)
    assert len(pub.sent) == 1  # 6/min: the next one in 10 s
    ack_all(r, pub)
    ticks(r, clock, 1.0)  # one acked: 60/min, the bucket refills at 1/s
    assert len(pub.sent) == 2
    ack_all(r, pub)
    ticks(r, clock, 0.4)  # two acked: 600/min, 10/s
    assert len(pub.sent) == 6


def test_retries_send_a_device_again(env):
    reg, clock, pub = env
    online(reg, clock, "d-0")
    r = runner(reg, clock, pub)
    job_id = job(reg, clock, rate_per_minute=600, timeout_s=2, retries=1, abort_percent=100)
    ticks(r, clock, 5.0)
    assert [s[0] for s in pub.sent[:2]] == ["d-0", "d-0"] and pub.sent[0][4] != pub.sent[1][4]
    ticks(r, clock, 3.0)
    got = store.get_job(reg, job_id)
    assert len([s for s in pub.sent if s[0] == "d-0"]) == 2 and got["counts"]["timed_out"] == 1


def test_stop_applies_the_acks_still_queued(env):
    reg, clock, pub = env
    online(reg, clock, "d-0")
    r = runner(reg, clock, pub)
    job_id = job(reg, clock, rate_per_minute=600)
    r.tick()
    ack_all(r, pub)  # received by the hub, not yet applied by a tick
    r.stop()  # (serve: after its MQTT session ended, flush applies whatever came in meanwhile)
    assert store.get_job(reg, job_id)["counts"]["acked"] == 1
    r.on_ack("d-0", {"id": "late", "ok": True, "result": {}})
    r.flush()
    assert r._acks.empty()


def test_a_hub_restarted_on_sqlite_resumes_at_once_without_a_lease(tmp_path):
    reg = Registry(tmp_path / "registry.sqlite3")  # one hub per SQLite file: leadership is trivially held
    try:
        queries.apply_schema(reg)
        schema.apply_schema(reg)
        reg.create_devices_with_tokens([(f"d-{n}", {}, ["g"]) for n in range(6)], "acme", T0, timedelta(days=1))
        clock, pub = Clock(), Publisher(reg)
        online(reg, clock, *[f"d-{n}" for n in range(6)])
        job(reg, clock, rate_per_minute=60)
        runner(reg, clock, pub).tick()  # then killed: it never stops cleanly
        clock.advance(1.0)
        runner(reg, clock, pub).tick()  # the restarted hub sends at once, no lease to wait out
        assert len(pub.sent) == 2 and reg.query("SELECT * FROM jobs_leader") == []
    finally:
        reg.close()
