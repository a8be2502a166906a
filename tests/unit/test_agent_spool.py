"""Tests for agent.spool on real SQLite files: bounds and drop policies, persistence, ack, kill -9 safety."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from agent.spool import Message, Spool, SpoolError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    d = tmp_path / "spool"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def path(spool_dir: Path) -> Path:
    return spool_dir / "spool.db"


def test_put_pending_ack_roundtrip(path: Path) -> None:
    with Spool(path) as sp:
        a = sp.put("t/a", b"\x00one", now=100.0)
        b = sp.put("t/b", b"two", qos=0, retain=True, now=101.0)
        assert isinstance(a, int) and isinstance(b, int) and a < b
        assert sp.pending(10) == [Message(a, "t/a", b"\x00one", 1, False, 100.0),
                                  Message(b, "t/b", b"two", 0, True, 101.0)]
        assert [m.id for m in sp.pending(10, after_id=a)] == [b]
        assert sp.pending(1) == sp.pending(10)[:1]
        assert sp.pending(0) == []
        assert sp.ack(a) is True
        assert sp.ack(a) is False  # already gone
        assert sp.depth() == 1
        assert [m.id for m in sp.pending(10)] == [b]


def test_ids_are_never_reused(path: Path) -> None:
    with Spool(path) as sp:
        first = sp.put("t", b"1", now=0)
        sp.ack(first)
        assert sp.put("t", b"2", now=0) > first  # a stale in-flight id can never ack a new message


def test_ack_many(path: Path) -> None:
    with Spool(path) as sp:
        ids = sp.put_many([("t", str(i).encode()) for i in range(1200)], now=1.0)
        assert sp.ack_many(ids[:1100] + [10**9]) == 1100  # more than one SQL chunk, one unknown id
        assert sp.depth() == 100
        assert [m.payload for m in sp.pending(1000)] == [str(i).encode() for i in range(1100, 1200)]
        assert sp.ack_many([]) == 0


def test_put_many_item_shapes(path: Path) -> None:
    with Spool(path) as sp:
        ids = sp.put_many([("a", b"1"), ("b", b"2", 2), ("c", b"3", 0, True)], now=5.0)
        got = sp.pending(10)
        assert [m.id for m in got] == ids
        assert [(m.topic, m.qos, m.retain) for m in got] == [("a", 1, False), ("b", 2, False), ("c", 0, True)]
        assert sp.put_many([], now=5.0) == []


@pytest.mark.parametrize("topic, payload, qos, retain, exc", [
    ("", b"x", 1, False, ValueError),
    ("a/+/b", b"x", 1, False, ValueError),
    ("a/#", b"x", 1, False, ValueError),
    ("a", "text", 1, False, TypeError),
    ("a", b"x", 3, False, ValueError),
    ("a", b"x", True, False, ValueError),
    ("a", b"x", 1, 1, TypeError),
])
def test_put_rejects_bad_messages(path: Path, topic, payload, qos, retain, exc) -> None:
    with Spool(path) as sp:
        with pytest.raises(exc):
            sp.put(topic, payload, qos, retain, now=0)
        with pytest.raises(ValueError):
            sp.put_many([("a",)], now=0)  # type: ignore[list-item]
        assert sp.depth() == 0


def test_drop_oldest(path: Path) -> None:
    with Spool(path, max_messages=3, drop_policy="oldest") as sp:
        ids = [sp.put("t", bytes([i]), now=float(i)) for i in range(5)]
        assert all(isinstance(i, int) for i in ids)
        assert [m.payload for m in sp.pending(10)] == [b"\x02", b"\x03", b"\x04"]
        assert sp.stats(now=10.0) == {"depth": 3, "dropped": 2, "oldest_age_s": 8.0}
        # a batch bigger than the bound keeps only its newest messages
        got = sp.put_many([("t", bytes([i])) for i in range(10, 15)], now=20.0)
        assert got[:2] == [None, None] and all(isinstance(i, int) for i in got[2:])
        assert [m.payload for m in sp.pending(10)] == [bytes([i]) for i in (12, 13, 14)]
        assert sp.stats(now=20.0)["dropped"] == 2 + 3 + 2


def test_drop_newest(path: Path) -> None:
    with Spool(path, max_messages=3, drop_policy="newest") as sp:
        ids = [sp.put("t", bytes([i]), now=float(i)) for i in range(5)]
        assert ids[3:] == [None, None]
        assert [m.payload for m in sp.pending(10)] == [b"\x00", b"\x01", b"\x02"]
        assert sp.stats(now=4.0) == {"depth": 3, "dropped": 2, "oldest_age_s": 4.0}
        sp.ack(ids[0])
        got = sp.put_many([("t", b"a"), ("t", b"b")], now=5.0)
        assert isinstance(got[0], int) and got[1] is None
        assert sp.stats(now=5.0)["dropped"] == 3


def test_bound_shrunk_on_reopen(path: Path) -> None:
    with Spool(path, max_messages=10) as sp:
        sp.put_many([("t", bytes([i])) for i in range(10)], now=0)
    with Spool(path, max_messages=4, drop_policy="oldest") as sp:
        sp.put("t", b"new", now=1)
        assert sp.depth() == 4
        assert [m.payload for m in sp.pending(10)] == [b"\x07", b"\x08", b"\t", b"new"]
        assert sp.stats(now=1)["dropped"] == 7


def test_persistence_across_reopen(path: Path) -> None:
    with Spool(path, max_messages=2) as sp:
        ids = [sp.put("t", bytes([i]), now=float(i)) for i in range(3)]
        sp.ack(ids[1])
    with Spool(path, max_messages=2) as sp:
        assert [(m.id, m.payload) for m in sp.pending(10)] == [(ids[2], b"\x02")]
        assert sp.depth() == 1
        assert sp.stats(now=12.0) == {"depth": 1, "dropped": 1, "oldest_age_s": 10.0}
        assert sp.put("t", b"later", now=13.0) > ids[2]


def test_stats_empty_and_clock_behind(path: Path) -> None:
    with Spool(path) as sp:
        assert sp.stats(now=0.0) == {"depth": 0, "dropped": 0, "oldest_age_s": None}
        sp.put("t", b"x", now=50.0)
        assert sp.stats(now=40.0)["oldest_age_s"] == 0.0  # never negative


def test_file_and_directory_modes(tmp_path: Path) -> None:
    d = tmp_path / "new" / "state"
    with Spool(d / "spool.db") as sp:
        sp.put("t", b"x", now=0)
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        for f in d.iterdir():  # spool.db and spool.db-wal
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_existing_file_is_tightened(path: Path) -> None:
    path.touch(mode=0o644)
    os.chmod(path, 0o644)
    Spool(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_open_directory_refused(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o755)
    with pytest.raises(SpoolError, match="expected 0700"):
        Spool(d / "spool.db")


def test_symlink_refused(spool_dir: Path, tmp_path: Path) -> None:
    (spool_dir / "spool.db").symlink_to(tmp_path / "elsewhere.db")
    with pytest.raises(SpoolError, match="cannot create spool file"):
        Spool(spool_dir / "spool.db")
    assert not (tmp_path / "elsewhere.db").exists()


def test_second_owner_refused_and_closed_spool(path: Path) -> None:
    sp = Spool(path)
    with pytest.raises(SpoolError, match="in use"):
        Spool(path)
    sp.close()
    sp.close()  # idempotent
    with pytest.raises(SpoolError, match="closed"):
        sp.put("t", b"x", now=0)
    with pytest.raises(SpoolError, match="closed"):
        sp.depth()
    Spool(path).close()  # free again


def test_bad_arguments(path: Path) -> None:
    with pytest.raises(ValueError):
        Spool(path, max_messages=0)
    with pytest.raises(ValueError):
        Spool(path, drop_policy="random")  # type: ignore[arg-type]
    with Spool(path) as sp, pytest.raises(ValueError):
        sp.pending(-1)


def test_threads_put_and_ack_concurrently(path: Path) -> None:
    with Spool(path, max_messages=10_000) as sp:
        def producer(k: int) -> None:
            for i in range(50):
                sp.put(f"t/{k}", str(i).encode(), now=0)

        def acker() -> None:
            for _ in range(50):
                sp.ack_many([m.id for m in sp.pending(5)])

        threads = [threading.Thread(target=producer, args=(k,)) for k in range(4)] + [threading.Thread(target=acker)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sp.depth() == len(sp.pending(10_000))
    with Spool(path) as sp:
        assert sp.depth() == len(sp.pending(10_000))


# Lines are padded to ~512 bytes: the 64 KiB pipe then holds ~128 of them, so the child stays within ~128 puts
# of what the parent has read and is still putting when the parent kills it, however fast the disk.
CHILD = textwrap.dedent("""
    import sys
    from agent.spool import Spool
    sp = Spool(sys.argv[1])
    print("ready", flush=True)
    for i in range(1000):
        mid = sp.put("fleet/t", b"payload-%d" % i, now=float(i))
        print(mid, i, " " * 500, flush=True)
""")


def test_sigkill_loses_nothing_reported_as_put(path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True, env=env,
                             cwd=ROOT)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    reported: dict[int, int] = {}
    try:
        for line in child.stdout:
            mid, i = map(int, line.split())
            reported[mid] = i
            if len(reported) == 200:
                child.send_signal(signal.SIGKILL)
                break
    finally:
        child.kill()
        child.wait()
        for line in child.stdout:  # ids printed before the kill landed were also put
            if not line.endswith("\n"):
                break
            mid, i = map(int, line.split())
            reported[mid] = i
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert 200 <= len(reported) < 1000, "child finished before the kill: not a mid-way kill"
    with Spool(path) as sp:
        stored = {m.id: m for m in sp.pending(10_000)}
    missing = set(reported) - set(stored)
    assert not missing, f"{len(missing)} messages reported as put were lost"
    for mid, i in reported.items():
        assert stored[mid].payload == b"payload-%d" % i and stored[mid].created == float(i)
    assert len(stored) - len(reported) <= 1  # at most the put in flight when killed


def test_throughput(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    n = 300
    with Spool(path) as sp:
        t0 = time.perf_counter()
        for i in range(n):
            sp.put("t", b"x" * 100, now=0)
        single = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(10):
            sp.put_many([("t", b"x" * 100)] * 1000, now=0)
        batched = 10_000 / (time.perf_counter() - t0)
        assert sp.depth() == n + 10_000
    with capsys.disabled():
        print(f"\nspool throughput: put {single:,.0f}/s (one fsync each), put_many {batched:,.0f}/s (batches of 1000)")
