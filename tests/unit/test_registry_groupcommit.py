"""hub/registry/groupcommit.py: concurrent issuing transactions share one commit, each body undone alone."""

from __future__ import annotations

import threading
import time

import pytest

from hub.registry import groupcommit
from hub.registry.store import Registry


@pytest.fixture
def registry(tmp_path):
    reg = Registry(tmp_path / "registry.sqlite3")
    with reg.write() as db:
        db.execute("CREATE TABLE gc_test (x INTEGER)")
    yield reg
    reg.close()


def _insert(db, x):
    db.execute("INSERT INTO gc_test (x) VALUES (?)", [x])
    if x == 3:
        raise ValueError("body 3 fails after its insert")
    return x * 10


def test_bodies_queued_meanwhile_commit_together_and_a_failing_one_is_undone_alone(registry, monkeypatch):
    batches = []
    commit = groupcommit._commit
    monkeypatch.setattr(groupcommit, "_commit", lambda reg, batch: (batches.append(len(batch)), commit(reg, batch)))
    outcome: dict[int, object] = {}
    with registry._write_lock:  # another writer holds the lock: the six queue up meanwhile
        threads = [threading.Thread(target=lambda x=x: outcome.__setitem__(x, _run(registry, x))) for x in range(6)]
        for t in threads:
            t.start()
        queue = groupcommit._queue(registry)
        deadline = time.monotonic() + 10
        while len(queue.items) < 6 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(queue.items) == 6
    for t in threads:
        t.join(timeout=10)
    assert {x: outcome[x] for x in range(6)} == {0: 0, 1: 10, 2: 20, 3: "ValueError", 4: 40, 5: 50}
    assert sorted(r["x"] for r in registry.query("SELECT x FROM gc_test")) == [0, 1, 2, 4, 5]
    assert batches == [6]  # one transaction, one commit for the six


def _run(registry, x):
    try:
        return groupcommit.run(registry, _insert, x)
    except ValueError as exc:
        return type(exc).__name__


def test_one_at_a_time_is_a_batch_of_one(registry):
    assert groupcommit.run(registry, _insert, 7) == 70
    with pytest.raises(ValueError):
        groupcommit.run(registry, _insert, 3)
    assert [r["x"] for r in registry.query("SELECT x FROM gc_test")] == [7]


def test_many_threads_many_batches_each_answer_its_own(registry):
    """Threads arriving while a batch commits wait for the next leader: every body runs once, each caller gets its
    own result (or its own exception), nothing is lost between leaders."""
    answers: dict[int, object] = {}

    def worker(base: int) -> None:
        for i in range(25):
            x = base * 100 + i
            try:
                answers[x] = groupcommit.run(registry, lambda db, v: _insert(db, v % 50), x)
            except ValueError:
                answers[x] = "ValueError"

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(answers) == 300
    assert all(answers[x] == ("ValueError" if x % 50 == 3 else (x % 50) * 10) for x in answers)
    rows = registry.query("SELECT count(*) AS n FROM gc_test")[0]["n"]
    assert rows == 300 - sum(1 for x in answers if x % 50 == 3)
    assert not groupcommit._queue(registry).items and not groupcommit._queue(registry).leading
