"""hub.est.connlimits: per-source connection cap, bounded queue, deadlines that cut a blocked reader."""

from __future__ import annotations

import socket
import threading

from hub.est.connlimits import ConnectionGate, Reaper


def test_gate_caps_connections_per_source_and_the_queue():
    gate = ConnectionGate(max_per_source=2, max_queue=3)
    assert gate.admit("a") is None and gate.admit("a") is None
    assert gate.admit("a") == "too_many_connections"
    assert gate.admit("b") is None
    assert gate.admit("c") == "server_busy"        # three wait for a worker already
    gate.started()
    assert gate.admit("c") is None
    gate.release("a")
    assert gate.admit("a") == "server_busy"
    gate.started(), gate.started()
    assert gate.admit("a") is None and gate.open_from("a") == 2
    for source in ("a", "a", "b", "c"):
        gate.release(source)
    assert gate.open_from("a") == 0 and gate._open == {}


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_reaper_cuts_a_blocked_read_at_the_deadline_and_extend_moves_it():
    clock = Clock()
    reaper = Reaper(monotonic=clock, tick=3600)   # reap() by hand
    left, right = socket.socketpair()
    try:
        ticket = reaper.watch(left, 10.0)
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(left.recv(10)))
        reader.start()
        clock.t = 9.0
        assert reaper.reap() == 0
        reaper.extend(ticket, 30.0)
        clock.t = 29.0
        assert reaper.reap() == 0 and reader.is_alive()
        clock.t = 30.0
        assert reaper.reap() == 1
        reader.join(timeout=5)
        assert not reader.is_alive() and got == [b""] and ticket.expired
        reaper.done(ticket)                        # after the cut: harmless
    finally:
        reaper.stop()
        left.close()
        right.close()


def test_reaper_done_stops_watching():
    clock = Clock()
    reaper = Reaper(monotonic=clock, tick=3600)
    left, right = socket.socketpair()
    try:
        ticket = reaper.watch(left, 1.0)
        reaper.done(ticket)
        clock.t = 5.0
        assert reaper.reap() == 0 and not ticket.expired
        right.sendall(b"x")
        assert left.recv(1) == b"x"                # the connection itself is untouched
    finally:
        reaper.stop()
        left.close()
        right.close()
