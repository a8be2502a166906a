"""The jobs on a PostgreSQL registry shared by two hubs (two Registry objects on one URL, each with its own
connections, as two `tessera-hub serve` processes): the schema applies twice without a change, an ack applied by
both hubs counts once, and only the jobs lease holder sends (hub/jobs/leader.py): a clean stop hands over at once,
a hub that stops renewing (killed) is replaced only after the lease. Fake clocks; the MQTT side is a recorder."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from hub.api import queries
from hub.api.queries import Selector
from hub.jobs import schema, store
from hub.jobs.leader import LEASE, Lease
from hub.jobs.runner import JobRunner
from hub.registry.store import Registry
from tests.integration.pgfixtures import pg_server, pg_url  # noqa: F401
from tests.unit.test_jobs_runner import T0, Clock

N = 6


class Hub:
    """One hub's side of the runner: its registry, and a recorder for LiveHub.send_command."""

    def __init__(self, registry: Registry, name: str, on_send=None):
        self.registry, self.name, self.sent, self.on_send = registry, name, [], on_send

    def send_command(self, device_id, command, args, actor="cli"):
        cid = f"{self.name}-{len(self.sent)}"
        self.sent.append((device_id, cid))
        if self.on_send is not None:
            self.on_send(device_id, cid)
        return cid


@pytest.fixture
def two(pg_url, tmp_path):  # noqa: F811
    """Two registries on one PostgreSQL database (hub a, hub b), N online devices in group g, a shared clock."""
    a = Registry(pg_url, home=tmp_path)
    b = Registry(pg_url, home=tmp_path)
    try:
        for r in (a, b):  # both hubs start: each applies the schemas (the second changes nothing)
            queries.apply_schema(r)
            schema.apply_schema(r)
        a.create_devices_with_tokens([(f"d-{n}", {}, ["g"]) for n in range(N)], "acme", T0, timedelta(days=1))
        for n in range(N):
            a.mark_presence(f"d-{n}", True, T0)
        yield a, b, Clock()
    finally:
        a.close()
        b.close()


def new_job(reg, clock, **spec) -> int:
    base = {"name": "t", "command": "ping", "args": {}, "rate_per_minute": 6000, "timeout_s": 60,
            "abort_percent": 50, "offline": "fail", "min_finished": None, "deadline": None, "selector": {"group": "g"}}
    return store.create_job(reg, {**base, **spec}, Selector.parse({"group": "g"}), N, "alice", clock())["id"]


def runner(hub: Hub, clock: Clock, holder: str) -> JobRunner:
    return JobRunner(hub, clock=clock, settle=0.0, lease=Lease(hub.registry, holder=holder))


def counts(reg, job_id) -> dict:
    job = store.get_job(reg, job_id)
    rows = reg.query("SELECT state, COUNT(*) AS n FROM job_devices WHERE job_id = ? GROUP BY state", [job_id])
    assert {k: v for k, v in job["counts"].items() if v} == {r["state"]: r["n"] for r in rows}
    return job["counts"]


def catalog(reg) -> list:
    return reg.query(
        "SELECT c.relname, c.relkind, pg_get_indexdef(i.indexrelid) AS idx, pg_get_constraintdef(k.oid) AS con, "
        "a.attname, format_type(a.atttypid, a.atttypmod) AS type FROM pg_class c "
        "JOIN pg_namespace s ON s.oid = c.relnamespace AND s.nspname = current_schema() "
        "LEFT JOIN pg_index i ON i.indexrelid = c.oid LEFT JOIN pg_constraint k ON k.conrelid = c.oid "
        "LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 "
        "WHERE c.relname LIKE 'job%' ORDER BY 1, 2, 3, 4, 5")


def test_the_schema_applies_twice_without_a_change_and_keeps_rates_exact(two):
    a, b, clock = two
    before = catalog(a)
    assert {r["relname"] for r in before} >= {"jobs", "job_devices", "jobs_leader", "jobs_state",
                                              "job_devices_state", "job_devices_sent", "job_devices_command"}
    schema.apply_schema(b)
    assert catalog(a) == before
    job = store.get_job(b, new_job(a, clock, rate_per_minute=0.1, timeout_s=2.5, abort_percent=12.5))
    assert (job["rate_per_minute"], job["timeout_s"], job["abort_percent"]) == (0.1, 2.5, 12.5)  # no float4
    with pytest.raises(Exception, match="json"):
        with a.write() as db:
            db.execute("UPDATE jobs SET args = 'not json' WHERE id = ?", [job["id"]])


def test_an_ack_applied_by_both_hubs_counts_once(two):
    a, b, clock = two
    job_id = new_job(a, clock)
    assert store.record_sent(a, job_id, [(f"d-{n}", f"c{n}") for n in range(N)], clock()) == N
    acks = [(f"d-{n}", f"c{n}", n % 2 == 0, "{}") for n in range(N)]
    assert store.apply_acks(a, acks[:2], clock()) == 2
    assert store.apply_acks(b, acks[:2], clock()) == 0  # the other hub received the same acks
    results = []
    gate = threading.Barrier(2)

    def apply(reg):
        gate.wait()
        results.append(store.apply_acks(reg, acks[2:], clock()))

    threads = [threading.Thread(target=apply, args=(r,)) for r in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [0, N - 2]
    assert counts(b, job_id) == {"queued": 0, "sent": 0, "acked": 3, "failed": 3, "timed_out": 0, "offline": 0}


def test_only_the_lease_holder_sends_and_a_follower_applies_its_acks(two):
    a, b, clock = two
    hub_a, hub_b = Hub(a, "a"), Hub(b, "b")
    ra, rb = runner(hub_a, clock, "hub-a"), runner(hub_b, clock, "hub-b")
    job_id = new_job(a, clock, rate_per_minute=60)  # one a second
    for _ in range(25):  # 5 s
        ra.tick()
        rb.tick()
        clock.advance(0.2)
    assert len(hub_a.sent) == 5 and hub_b.sent == []
    assert a.query("SELECT holder FROM jobs_leader") == [{"holder": "hub-a"}]
    for device_id, cid in hub_a.sent:  # the broker delivered the acks to hub b's session
        rb.on_ack(device_id, {"id": cid, "ok": True, "result": {}})
    rb.tick()
    assert counts(a, job_id)["acked"] == 5
    for device_id, cid in hub_a.sent:  # ... and to hub a's as well: nothing counts twice
        ra.on_ack(device_id, {"id": cid, "ok": True, "result": {}})
    ra.tick()
    assert counts(a, job_id)["acked"] == 5


def test_an_ack_seen_by_the_follower_before_the_leader_recorded_the_send_still_counts(two):
    a, b, clock = two
    hub_b = Hub(b, "b")
    rb = runner(hub_b, clock, "hub-b")

    def acked_at_once(device_id, cid):  # the device answers before the leader's tick records the send
        rb.on_ack(device_id, {"id": cid, "ok": True, "result": {}})
        rb.tick()

    hub_a = Hub(a, "a", on_send=acked_at_once)
    ra = runner(hub_a, clock, "hub-a")
    job_id = new_job(a, clock, rate_per_minute=120)
    ra.tick()  # sends 2 (the burst), each ack reaching hub b mid-tick
    assert len(hub_a.sent) == 2 and counts(a, job_id)["acked"] == 0 and len(rb._unknown) == 2
    clock.advance(0.2)
    rb.tick()
    assert counts(a, job_id)["acked"] == 2 and rb._unknown == []


def test_a_clean_stop_hands_over_at_once_and_a_killed_leader_after_the_lease(two):
    a, b, clock = two
    hub_a, hub_b = Hub(a, "a"), Hub(b, "b")
    ra, rb = runner(hub_a, clock, "hub-a"), runner(hub_b, clock, "hub-b")
    new_job(a, clock, rate_per_minute=60)
    ra.tick()
    rb.tick()
    ra.stop()  # a clean stop: the lease is given up
    clock.advance(1.0)
    rb.tick()
    assert [len(hub_a.sent), len(hub_b.sent)] == [1, 1]
    # hub b is "killed" (SIGKILL: it renews no more); a new hub a process is a new holder
    ra2 = runner(hub_a, clock, "hub-a2")
    last = clock()
    clock.advance(LEASE - 0.2)
    ra2.tick()
    assert len(hub_a.sent) == 1  # b's lease still runs
    clock.advance(0.2)
    ra2.tick()
    assert len(hub_a.sent) == 2 and a.query("SELECT holder FROM jobs_leader") == [{"holder": "hub-a2"}]
    takeover = a.query("SELECT detail FROM audit WHERE action = 'jobs.lead' ORDER BY id")[-1]["detail"]
    until = store.ts(last + timedelta(seconds=LEASE))
    assert takeover == f"hub-a2 drives the jobs now; hub-b's lease ran until {until}"
    clock.advance(1.0)  # b wakes up (it was only frozen): it has lost the lease and sends nothing
    rb.tick()
    ra2.tick()
    assert len(hub_b.sent) == 1 and len(hub_a.sent) == 3
    assert not rb.lease.valid(clock())


def test_two_followers_taking_an_expired_lease_at_once_one_wins(two, pg_url, tmp_path):  # noqa: F811
    a, b, clock = two
    assert Lease(a, holder="old").held(clock())
    clock.advance(LEASE)
    c = Registry(pg_url, home=tmp_path)
    try:
        leases = [Lease(r, holder=f"h{n}") for n, r in enumerate((a, b, c))]
        won: list[bool] = []
        gate = threading.Barrier(len(leases))

        def take(lease):  # each has read the row and seen it expired (held's read): now all claim it at once
            gate.wait()
            won.append(lease._claim(clock()))

        threads = [threading.Thread(target=take, args=(x,)) for x in leases]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(won) == [False, False, True]
        assert [x.holder for x in leases if x.until is not None] == [a.query("SELECT holder FROM jobs_leader")[0]
                                                                     ["holder"]]
    finally:
        c.close()


def test_a_leader_whose_tick_outlasts_its_lease_stops_sending_mid_tick(two):
    a, _, clock = two
    hub = Hub(a, "a", on_send=lambda device_id, cid: clock.advance(LEASE / 2))  # each publish stalls 5 s
    r = runner(hub, clock, "hub-a")
    job_id = new_job(a, clock)
    r.tick()  # the burst would send all 6; the lease (renewed at the tick's start) runs out after the second
    assert len(hub.sent) == 2 and counts(a, job_id)["sent"] == 2
