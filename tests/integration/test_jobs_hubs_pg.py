"""Jobs on two `tessera-hub serve` processes sharing one PostgreSQL registry and one RabbitMQ node (the hubs of
tests/integration/test_hubs_pg.py) with real agents: one hub's runner drives the jobs (hub/jobs/leader.py); a clean
stop hands the lease over at once; a job created at the follower is sent to each device once and completes; when
the leading hub is killed with SIGKILL the other takes the jobs over after the lease and completes the next job.

Hub A stays up throughout (the node's auth back end is A's), so the hub killed is B: A is restarted cleanly first,
which hands the lease to B."""

from __future__ import annotations

import json

import pytest

from hub.jobs.leader import LEASE
from tests.integration.agentfixtures import new_device, wait_until
from tests.integration.pgfixtures import pg_server  # noqa: F401
from tests.integration.test_hubs_pg import hubs, pg_url, registry_query  # noqa: F401

pytestmark = pytest.mark.integration

DEVICES = ("jh-0", "jh-1")


def leader_pid(hub) -> int | None:
    rows = registry_query(hub, "SELECT holder FROM jobs_leader")
    return int(rows[0]["holder"].split(":")[1]) if rows else None


def run_job(creator, waiter, name: str) -> dict:
    job = json.loads(creator.cli_ok("job", "create", name, "--command", "ping", "--id", ",".join(DEVICES),
                                    "--rate", "600", "--yes", "--json"))
    done = json.loads(waiter.cli_ok("job", "wait", str(job["id"]), "--timeout", "60", "--json"))
    assert done["state"] == "completed" and done["counts"]["acked"] == len(DEVICES), done
    sends = registry_query(creator, f"SELECT device_id, COUNT(*) AS n FROM audit WHERE action = 'command.send' "
                                    f"AND actor LIKE '% (job {job['id']})' GROUP BY device_id ORDER BY 1")
    assert sends == [{"device_id": d, "n": 1} for d in DEVICES], sends  # each device sent its command once
    return done


def test_one_hub_drives_the_jobs_and_the_other_takes_over_when_it_is_killed(hubs, tmp_path):  # noqa: F811
    a, b, _ = hubs
    assert wait_until(lambda: leader_pid(a), 10, "a jobs lease holder") == a.proc.pid  # the first hub up
    a.stop()  # a clean stop gives the lease up: B takes it at its next tick
    wait_until(lambda: leader_pid(b) == b.proc.pid, 5, "hub B holding the lease")
    a.proc = None
    a.start()
    devs = []
    try:
        for device_id in DEVICES:
            dev, token = new_device(a, tmp_path, device_id, interval=1.0)
            devs.append(dev)
            dev.enroll_ok(token)
            dev.start()
        for dev in devs:
            dev.wait_state("online", 40)
        wait_until(lambda: all(a.device_list()[d]["online"] for d in DEVICES), 20, "the devices online")
        assert leader_pid(a) == b.proc.pid  # the restarted A follows
        run_job(a, a, "created at the follower")  # (B drives it: A only applies the acks it receives)

        killed = b.proc.pid
        b.kill()  # SIGKILL: B never gives the lease up
        b.proc = None  # (the fixture's clean stop has nothing left to stop)
        wait_until(lambda: leader_pid(a) == a.proc.pid, LEASE + 5, "hub A taking the lease over")
        run_job(a, a, "after the leader was killed")
        takeover = registry_query(a, "SELECT detail FROM audit WHERE action = 'jobs.lead' ORDER BY id")[-1]
        assert f":{killed}:" in takeover["detail"] and "lease ran until" in takeover["detail"], takeover
    finally:
        for dev in devs:
            dev.destroy()
