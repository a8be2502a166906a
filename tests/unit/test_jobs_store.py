"""hub/jobs/store.py on a real registry, a SQLite file and a PostgreSQL database (`any_registry`): a job from a
selector in one transaction, transitions and their counters, keyset listing, operator actions, and index-only
query plans for the runner's queries (SQLite's planner)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from hub.api import queries
from hub.api.queries import Conflict, NotFound, Selector
from hub.jobs import schema, store
from hub.registry.store import Registry
from tests.integration.pgfixtures import any_registry, pg_server, pg_url, registry_target  # noqa: F401

T0 = datetime(2027, 1, 1, tzinfo=timezone.utc)
SPEC = {"name": "ping all", "command": "ping", "args": {}, "rate_per_minute": 60, "timeout_s": 30,
        "abort_percent": 20, "offline": "fail", "min_finished": None, "deadline": None}


def _fill(r):
    queries.apply_schema(r)
    schema.apply_schema(r)
    rows = [(f"dev-{n:04d}", {}, ["even" if n % 2 == 0 else "odd"]) for n in range(200)]
    r.create_devices_with_tokens(rows, "acme", T0, timedelta(days=1))
    return r


@pytest.fixture
def reg(any_registry):  # noqa: F811
    """200 devices in groups even / odd, once per dialect."""
    return _fill(any_registry)


@pytest.fixture
def sqlite_reg(tmp_path):
    r = _fill(Registry(tmp_path / "registry.sqlite3"))
    yield r
    r.close()


def new_job(reg, selector=None, **spec):
    raw = selector or {"group": "even"}
    sel = Selector.parse(raw, allow_ids=True)
    return store.create_job(reg, {**SPEC, **spec, "selector": raw}, sel, queries.count(reg, sel), "alice", T0)


def counts_match_rows(reg, job_id):
    rows = reg.query("SELECT state, COUNT(*) AS n FROM job_devices WHERE job_id = ? GROUP BY state", [job_id])
    real = {r["state"]: r["n"] for r in rows}
    job = store.get_job(reg, job_id)
    assert {k: v for k, v in job["counts"].items() if v} == real
    return job["counts"]


def test_create_queues_every_matching_device_and_audits_the_operator(reg):
    job = new_job(reg)
    assert job["state"] == "running" and job["total"] == 100 and job["counts"]["queued"] == 100
    assert job["created_by"] == "alice" and job["started"] and job["selector"] == {"group": "even"}
    audit = reg.query("SELECT actor, detail FROM audit WHERE action = 'job.create'")
    assert audit[0]["actor"] == "alice" and f"job {job['id']}" in audit[0]["detail"]
    counts_match_rows(reg, job["id"])


def test_create_with_a_stale_count_writes_nothing(reg):
    sel = Selector.parse({"group": "odd"})
    with pytest.raises(Conflict, match="matches 100 devices now, not 99"):
        store.create_job(reg, {**SPEC, "selector": {"group": "odd"}}, sel, 99, "alice", T0)
    assert reg.query("SELECT COUNT(*) AS n FROM jobs")[0]["n"] == 0
    assert reg.query("SELECT COUNT(*) AS n FROM job_devices")[0]["n"] == 0


def test_ids_selector_takes_only_existing_devices(reg):
    sel = Selector.parse({"ids": ["dev-0001", "nope", "dev-0002"]}, allow_ids=True)
    assert queries.count(reg, sel) == 2
    job = store.create_job(reg, {**SPEC, "selector": {"ids": ["dev-0001", "nope", "dev-0002"]}}, sel, 2, "a", T0)
    assert job["total"] == 2


def test_transitions_keep_the_counters_equal_to_the_rows(reg):
    job_id = new_job(reg)["id"]
    first = store.next_queued(reg, job_id, "", 5)
    assert [r["device_id"] for r in first] == [f"dev-{n:04d}" for n in range(0, 10, 2)]
    assert store.record_sent(reg, job_id, [(r["device_id"], f"c{n}") for n, r in enumerate(first)], T0) == 5
    assert store.record_sent(reg, job_id, [("dev-0000", "again")], T0) == 0  # only a queued device is sent
    assert store.mark_offline(reg, job_id, ["dev-0010"], T0, "offline") == 1
    acks = [("dev-0000", "c0", True, "{}"), ("dev-0002", "c1", False, "unknown command 'x'"),
            ("dev-0004", "c0", True, "{}"),  # another device's command id: ignored
            ("dev-0099", "zz", True, "{}")]  # not a job's command
    assert store.apply_acks(reg, acks, T0) == 2
    assert store.apply_acks(reg, [("dev-0000", "c0", False, "late")], T0) == 0  # already acked
    assert store.time_out(reg, job_id, T0 + timedelta(seconds=1), T0 + timedelta(seconds=31)) == 3
    counts = counts_match_rows(reg, job_id)
    assert counts == {"queued": 94, "sent": 0, "acked": 1, "failed": 1, "timed_out": 3, "offline": 1}
    rows, _ = store.list_job_devices(reg, job_id, 3, state="timed_out")
    assert [r["device_id"] for r in rows] == ["dev-0004", "dev-0006", "dev-0008"]
    assert rows[0]["attempts"] == 1 and rows[0]["sent_at"] and rows[0]["finished_at"]
    failed, _ = store.list_job_devices(reg, job_id, 10, state="failed")
    assert failed[0]["detail"] == "unknown command 'x'"


def test_expire_queued_marks_the_waiting_devices_offline(reg):
    job_id = new_job(reg, offline="wait")["id"]
    assert store.expire_queued(reg, job_id, T0, "deadline", limit=60) == 60
    assert store.expire_queued(reg, job_id, T0, "deadline") == 40
    assert counts_match_rows(reg, job_id)["offline"] == 100


def test_finish_and_operator_actions(reg):
    job_id = new_job(reg)["id"]
    assert store.operator_action(reg, job_id, "pause", "bob", T0)["state"] == "paused"
    assert store.operator_action(reg, job_id, "pause", "bob", T0)["state"] == "paused"  # no-op
    assert not store.finish(reg, job_id, "completed", None, T0)  # only a running job completes
    assert store.operator_action(reg, job_id, "resume", "bob", T0)["state"] == "running"
    assert store.finish(reg, job_id, "aborted", "too many failures", T0)
    job = store.get_job(reg, job_id)
    assert job["state"] == "aborted" and job["reason"] == "too many failures" and job["finished"]
    for action in ("pause", "resume", "cancel"):
        with pytest.raises(Conflict, match="aborted"):
            store.operator_action(reg, job_id, action, "bob", T0)
    with pytest.raises(NotFound):
        store.operator_action(reg, 9999, "cancel", "bob", T0)
    actions = [(r["actor"], r["action"]) for r in reg.query("SELECT actor, action FROM audit WHERE action LIKE "
                                                            "'job.%' ORDER BY id")]
    assert actions == [("alice", "job.create"), ("bob", "job.pause"), ("bob", "job.resume"), ("hub", "job.abort")]


def test_cancel_sets_the_reason(reg):
    job_id = new_job(reg)["id"]
    job = store.operator_action(reg, job_id, "cancel", "bob", T0)
    assert job["state"] == "cancelled" and job["reason"] == "cancelled by bob" and job["finished"]


def test_list_jobs_newest_first_with_keyset_paging(reg):
    ids = [new_job(reg, name=f"job {n}")["id"] for n in range(5)]
    page, before = store.list_jobs(reg, 2)
    assert [j["id"] for j in page] == ids[::-1][:2] and before == ids[3]
    page, before = store.list_jobs(reg, 2, before)
    assert [j["id"] for j in page] == [ids[2], ids[1]]
    page, before = store.list_jobs(reg, 2, before)
    assert [j["id"] for j in page] == [ids[0]] and before is None


def test_the_runner_queries_use_indexes(sqlite_reg):
    reg = sqlite_reg
    job_id = new_job(reg)["id"]

    def plan(sql, params):
        return " | ".join(r["detail"] for r in reg.query(f"EXPLAIN QUERY PLAN {sql}", params))

    cases = [
        ("SELECT jd.device_id FROM job_devices jd LEFT JOIN devices d ON d.id = jd.device_id WHERE jd.job_id = ? "
         "AND jd.state = 'queued' AND jd.device_id > ? ORDER BY jd.device_id LIMIT 5", [job_id, ""]),
        ("SELECT device_id FROM job_devices WHERE job_id = ? AND state = 'sent' AND sent_at < ? ORDER BY sent_at "
         "LIMIT 5", [job_id, "x"]),
        ("SELECT job_id FROM job_devices WHERE command_id = ? AND device_id = ?", ["c", "d"]),
    ]
    for sql, params in cases:
        text = plan(sql, params)
        assert "USING" in text and "SCAN" not in text and "TEMP B-TREE" not in text, text
    # the active jobs: an index range (their few rows are sorted)
    assert "USING INDEX jobs_state" in plan("SELECT * FROM jobs WHERE state IN ('running', 'paused') ORDER BY id", [])


def test_a_timed_out_device_is_queued_again_while_it_has_retries(reg):
    job_id = new_job(reg, selector={"ids": ["dev-0001"]})["id"]
    for attempt in (1, 2):
        assert store.record_sent(reg, job_id, [("dev-0001", f"c{attempt}")], T0) == 1
        assert store.time_out(reg, job_id, T0 + timedelta(seconds=1), T0, retries=1) == 1
    row = store.list_job_devices(reg, job_id, 1)[0][0]
    assert row["state"] == "timed_out" and row["attempts"] == 2 and row["detail"] == "no ack in time"
    assert counts_match_rows(reg, job_id)["timed_out"] == 1


def test_a_jobs_table_of_the_first_version_gets_the_new_columns(tmp_path):
    r = Registry(tmp_path / "old.sqlite3")
    try:
        with r.write() as db:
            db.execute(schema.JOBS_SCHEMA[0].replace(
                "ramp_start REAL, ramp_factor REAL, ramp_every INTEGER, max_in_flight INTEGER,\n"
                "        retries INTEGER NOT NULL DEFAULT 0,\n", ""))
        assert "retries" not in {c["name"] for c in r.query("PRAGMA table_info(jobs)")}
        schema.apply_schema(r)
        schema.apply_schema(r)
        assert set(schema.ADDED_COLUMNS) <= {c["name"] for c in r.query("PRAGMA table_info(jobs)")}
    finally:
        r.close()
