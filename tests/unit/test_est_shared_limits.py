"""hub/est/sharedlimits.py: the supervisor's LimitServer decides for every worker's LimitClient, exactly."""

from __future__ import annotations

import socket
import threading

import pytest

from hub.est.ratelimit import RateLimiter
from hub.est.sharedlimits import LimitClient, LimitServer, SharedGate


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def server():
    clock = Clock()
    srv = LimitServer(RateLimiter(1.0, 4, 3, 5, 8), max_per_source=3, monotonic=clock)
    srv.clock = clock
    yield srv
    srv.stop()


def wait_for(cond, seconds: float = 5.0) -> None:
    done = threading.Event()
    for _ in range(int(seconds / 0.01)):
        if cond():
            return
        done.wait(0.01)
    raise AssertionError("condition not met")


def clients(srv: LimitServer, n: int, **kw) -> list[LimitClient]:
    return [LimitClient(srv.channel(), RateLimiter(0.5, 2, 2, 3, 4), **kw) for _ in range(n)]


def test_a_burst_spread_over_workers_is_the_burst(server):
    a, b = clients(server, 2)
    answers = [(a if i % 2 else b).admit("10.0.0.1", 0) for i in range(5)]
    assert answers == [0, 0, 0, 0, 1]  # burst 4 across both, then Retry-After 1 s (rate 1/s)
    assert a.admit("10.0.0.2", 0) == 0  # another source has its own bucket
    server.clock.t += 1.0
    assert b.admit("10.0.0.1", 0) == 0 and a.admit("10.0.0.1", 0) == 1


def test_failures_spread_over_workers_spend_one_budget(server):
    a, b = clients(server, 2)
    for i in range(3):
        assert (a, b)[i % 2].check("10.0.0.1", "dev-1", 0) == 0
        (a, b)[i % 2].fail("10.0.0.1", "dev-1", 0)
    assert b.check("10.0.0.1", "dev-1", 0) == 60 and a.check("10.0.0.1", "dev-1", 0) == 60
    assert a.check("10.0.0.1", "dev-2", 0) == 0  # per (source, device)
    server.clock.t += 60.0
    assert b.check("10.0.0.1", "dev-1", 0) == 0


def test_connections_are_counted_across_workers_and_a_dead_worker_releases_its_own(server):
    a, b = clients(server, 2)
    ga, gb = SharedGate(a, 3, 10), SharedGate(b, 3, 10)
    assert [ga.admit("s"), gb.admit("s"), gb.admit("s")] == [None, None, None]
    assert ga.admit("s") == "too_many_connections" and ga.queued == 1
    ga.release("s")  # one-way; a's next call is answered after it (one channel is read in order)
    assert a.admit("other", 0) == 0 and server.open["s"] == 2
    assert gb.admit("s") is None
    b.sock.close()  # worker b dies with its three connections open: they are released
    wait_for(lambda: server.open.get("s") == 0 or "s" not in server.open)
    assert [ga.admit("s"), ga.admit("s"), ga.admit("s")] == [None, None, None]
    assert ga.admit("s") == "too_many_connections"


def test_a_worker_whose_supervisor_is_gone_decides_alone_with_its_share():
    theirs, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client = LimitClient(ours, RateLimiter(0.001, 2, 2, 3, 4))
    theirs.close()
    assert [client.admit("s", 0.0) for _ in range(3)] == [0, 0, 1000]  # the fallback's burst of 2
    assert client.gone
    gate = SharedGate(client, 2, 10)
    assert [gate.admit("s"), gate.admit("s"), gate.admit("s")] == [None, None, "too_many_connections"]
    gate.release("s")
    assert gate.admit("s") is None


def test_a_supervisor_that_does_not_answer_in_time_is_asked_again_later_and_late_answers_are_dropped():
    theirs, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client = LimitClient(ours, RateLimiter(0.001, 1, 2, 3, 4), timeout=0.05, down_s=0.0)
    assert client.admit("s", 0.0) == 0  # no answer in time: the fallback's one token
    assert not client.gone
    asked = theirs.recv(100)
    theirs.send(b"1 7")  # the late answer to that first call (sequence number 1)...
    theirs.send(b"2 5")  # ...and the answer to the next: only this one is taken
    assert client.admit("s", 0.0) == 5
    assert asked.startswith(b"[1,") and theirs.recv(100).startswith(b"[2,")


def test_an_unreadable_message_is_one_log_line_and_changes_nothing(server, caplog):
    a, = clients(server, 1)
    a.sock.send(b"not json")
    assert a.admit("s", 0) == 0  # the channel still works; nothing was spent by the bad message
    assert "unreadable message" in caplog.text


def test_threads_of_workers_with_several_channels_share_one_budget_exactly(server):
    a, b = (LimitClient(server.channels(4), RateLimiter(1.0, 4, 3)) for _ in range(2))
    answers: list[int] = []
    lock = threading.Lock()

    def ask(client: LimitClient) -> None:
        for _ in range(5):
            got = client.admit("10.0.0.9", 0)
            with lock:
                answers.append(got)

    threads = [threading.Thread(target=ask, args=((a, b)[i % 2],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(answers) == 40 and answers.count(0) == 4  # the burst of 4, whatever thread and channel asked


def test_a_worker_s_connections_are_released_when_its_last_channel_closes(server):
    socks = server.channels(2)
    gate = SharedGate(LimitClient(socks, RateLimiter(1.0, 4, 3)), 3, 10)
    assert gate.admit("s") is None and gate.admit("s") is None
    assert server.open["s"] == 2
    socks[0].close()
    other = LimitClient(server.channel(), RateLimiter(1.0, 4, 3))
    assert other.admit("x", 0) == 0 and server.open["s"] == 2  # one channel left: still its connections
    socks[1].close()
    wait_for(lambda: "s" not in server.open)
