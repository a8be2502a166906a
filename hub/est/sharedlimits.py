"""The `[est]` limits exact across the EST worker pool: the supervisor holds every budget, workers ask it.

One `LimitServer` thread in the supervisor (hub/est/pool.py) owns the hub's one RateLimiter (request bucket per
source, failure budgets per (source, device), per source and hub-wide: hub/est/ratelimit.py, with the budgets of
fleet.toml as they are, not 1/N shares) and the count of connections open per source across all workers. Each
worker gets CHANNELS SOCK_SEQPACKET socketpairs (one message a datagram, in order; a thread asks over whichever is
free) and a `LimitClient` on their ends, which
has RateLimiter's `admit` / `check` / `fail` and the gate's `open` / `close`: every decision is made in the
supervisor, one request at a time, so a budget of B admits exactly B whatever worker each request reaches.

Costs: one round trip on the Unix socket per admit, per failure budget check and per failure (a few tens of
microseconds; the supervisor thread does a dict operation), one per connection opened; a close is one-way.
Clocks: the supervisor's `monotonic` decides (the `now` a worker passes is ignored: the processes' calls are
ordered by arrival, and a fake clock is passed to the LimitServer). A worker that dies has its open connections
released by the supervisor (its socket's EOF); its budgets stay spent (they are the hub's, not the worker's).
When the supervisor does not answer within TIMEOUT s (stopped, or gone: the worker is then stopping and finishes
what it serves), the worker decides alone with its 1/N share of the budgets (the old per-worker design) for
DOWN_S s, then asks again; answers are numbered, so a late one is never taken for the next call's.
"""

from __future__ import annotations

import json
import logging
import queue
import selectors
import socket
import threading
import time
from typing import Callable

from hub.est.connlimits import ConnectionGate
from hub.est.ratelimit import RateLimiter

log = logging.getLogger("tessera.hub.est")

MAX_MESSAGE = 4096  # a source address and a checked device id, JSON
CHANNELS = 8       # per worker: its threads' round trips at once (one channel each)
TIMEOUT = 2.0       # a worker waits this long for the supervisor's answer, then decides alone...
DOWN_S = 5.0        # ...for this long before it asks again


class _Owner:
    """One worker's connections open per source, and how many of its channels are still open."""

    def __init__(self, channels: int):
        self.open: dict[str, int] = {}
        self.channels = channels


class LimitServer:
    """The supervisor's side: `channels(k)` -> a worker's sockets (pass their fds to it); `stop()`."""

    def __init__(self, limiter: RateLimiter, max_per_source: int, monotonic: Callable[[], float] = time.monotonic):
        self.limiter, self.max_per_source, self.monotonic = limiter, max_per_source, monotonic
        self.open: dict[str, int] = {}            # connections open per source, all workers
        self._by_channel: dict[socket.socket, _Owner] = {}
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._pending: list[tuple[socket.socket, _Owner]] = []
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="est-limits", daemon=True)
        self._thread.start()

    def channels(self, k: int = CHANNELS) -> list[socket.socket]:
        """A new worker's `k` channels (its threads ask over whichever is free): the worker's ends (the caller
        closes them once passed)."""
        owner, theirs = _Owner(k), []
        with self._lock:
            for _ in range(k):
                ours, their = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                self._pending.append((ours, owner))
                theirs.append(their)
        self._wake_w.send(b"x")
        return theirs

    def channel(self) -> socket.socket:
        """A worker with one channel."""
        return self.channels(1)[0]

    def stop(self) -> None:
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join(timeout=5)
        for sock in list(self._by_channel):
            sock.close()
        self._by_channel.clear()
        self._wake_r.close()
        self._wake_w.close()
        self._selector.close()

    def _run(self) -> None:
        while not self._stopping:
            for key, _ in self._selector.select():
                sock = key.fileobj
                if sock is self._wake_r:
                    try:
                        self._wake_r.recv(4096)
                    except BlockingIOError:
                        pass
                    with self._lock:
                        pending, self._pending = self._pending, []
                    for new, owner in pending:
                        self._by_channel[new] = owner
                        self._selector.register(new, selectors.EVENT_READ)
                    continue
                try:
                    data = sock.recv(MAX_MESSAGE)
                except OSError:
                    data = b""
                if not data:
                    self._gone(sock)
                    continue
                try:
                    reply = self._answer(sock, json.loads(data))
                except (ValueError, TypeError, KeyError, IndexError) as exc:
                    log.error("EST limits: an unreadable message from a worker (%s)", type(exc).__name__)
                    reply = None
                if reply is not None:
                    try:
                        sock.send(b"%d %d" % (reply[0], reply[1]))
                    except OSError:
                        self._gone(sock)

    def _answer(self, sock: socket.socket, msg: list) -> tuple[int, int] | None:
        """(sequence number, answer) for a [seq, op, source, ...] message; None for a one-way close."""
        answer = self._decide(sock, msg[1:])
        return None if answer is None else (int(msg[0]), answer)

    def _decide(self, sock: socket.socket, msg: list) -> int | None:
        op, source = msg[0], str(msg[1])
        now = self.monotonic()
        if op == "admit":
            return self.limiter.admit(source, now)
        if op == "check":
            return self.limiter.check(source, msg[2], now)
        if op == "fail":
            self.limiter.fail(source, msg[2], now)
            return 0
        mine = self._by_channel[sock].open
        if op == "open":
            if self.open.get(source, 0) >= self.max_per_source:
                return 1
            self.open[source] = self.open.get(source, 0) + 1
            mine[source] = mine.get(source, 0) + 1
            return 0
        if op == "close":
            self._release(mine, source, 1)
            return None
        raise KeyError(op)

    def _release(self, mine: dict[str, int], source: str, n: int) -> None:
        n = min(n, mine.get(source, 0))
        for table in (mine, self.open):
            left = table.get(source, 0) - n
            if left > 0:
                table[source] = left
            else:
                table.pop(source, None)

    def _gone(self, sock: socket.socket) -> None:
        """A worker's channel closed; the last of them (it exited or died): its connections are no longer open."""
        owner = self._by_channel.pop(sock, None)
        self._selector.unregister(sock)
        sock.close()
        if owner is not None:
            owner.channels -= 1
            if owner.channels == 0:
                for source, n in list(owner.open.items()):
                    self._release(owner.open, source, n)


class _Channel:
    __slots__ = ("sock", "seq")

    def __init__(self, sock: socket.socket):
        self.sock, self.seq = sock, 0


class LimitClient:
    """A worker's side: RateLimiter's admit / check / fail, decided by the supervisor (thread-safe).

    `fallback` (this worker's 1/N share of the budgets: hub/est/pool.py `share`) decides when the supervisor does
    not answer within `timeout` s (then for `down_s` s without asking) or is gone (a stopping worker finishing
    what it serves): never exact, never more than the old per-worker shares allowed."""

    def __init__(self, socks: socket.socket | list[socket.socket], fallback: RateLimiter, timeout: float = TIMEOUT,
                 down_s: float = DOWN_S):
        socks = [socks] if isinstance(socks, socket.socket) else list(socks)
        self.sock, self.fallback, self.timeout, self.down_s = socks[0], fallback, timeout, down_s
        self._free: queue.SimpleQueue[_Channel] = queue.SimpleQueue()  # a thread takes one for its round trip
        for sock in socks:
            self._free.put(_Channel(sock))
        self._down_until = 0.0
        self.gone = False

    def _ask(self, *msg) -> int | None:
        """The supervisor's answer; None: no answer (the caller uses the fallback)."""
        if self.gone or time.monotonic() < self._down_until:
            return None
        chan = self._free.get()
        try:
            chan.seq += 1
            try:
                chan.sock.settimeout(self.timeout)
                chan.sock.send(json.dumps([chan.seq, *msg], separators=(",", ":")).encode())
                deadline = time.monotonic() + self.timeout
                while True:
                    data = chan.sock.recv(64)
                    if not data:
                        break
                    seq, _, value = data.partition(b" ")
                    if int(seq) == chan.seq:
                        return int(value)
                    # the late answer to a call that timed out: dropped
                    chan.sock.settimeout(max(0.001, deadline - time.monotonic()))
            except socket.timeout:
                self._down_until = time.monotonic() + self.down_s
                log.warning("EST limits: the supervisor did not answer within %g s; this worker decides alone "
                            "(its share of the limits) for %g s", self.timeout, self.down_s)
                return None
            except (OSError, ValueError):
                pass
            if not self.gone:
                log.warning("EST limits: the supervisor is gone; this worker decides alone (its share of the limits)")
            self.gone = True
            return None
        finally:
            self._free.put(chan)

    def admit(self, source: str, now: float) -> int:
        answer = self._ask("admit", source)
        return self.fallback.admit(source, now) if answer is None else answer

    def check(self, source: str, device: str | None, now: float) -> int:
        answer = self._ask("check", source, device)
        return self.fallback.check(source, device, now) if answer is None else answer

    def fail(self, source: str, device: str | None, now: float) -> None:
        if self._ask("fail", source, device) is None:
            self.fallback.fail(source, device, now)

    def open(self, source: str) -> bool | None:
        """Count a connection of `source` open across workers: True, False when max_per_source are open already,
        None when the supervisor did not answer (not counted there)."""
        answer = self._ask("open", source)
        return None if answer is None else answer == 0

    def close(self, source: str) -> None:
        """A connection counted by open() closed (one-way: never waits for the supervisor)."""
        try:
            self.sock.send(json.dumps([0, "close", source], separators=(",", ":")).encode(), socket.MSG_DONTWAIT)
        except OSError:
            pass  # gone: its counts died with the channel; full (supervisor stopped): counted until this one exits


class SharedGate(ConnectionGate):
    """The listener's ConnectionGate with the per-source cap counted across workers (the queue stays local);
    `max_per_source` is this worker's own cap when the supervisor does not answer."""

    def __init__(self, client: LimitClient, max_per_source: int, max_queue: int):
        super().__init__(max_per_source, max_queue)
        self.client = client
        self._remote: dict[str, int] = {}  # connections counted by the supervisor, per source

    def admit(self, source: str) -> str | None:
        with self._lock:
            if self.queued >= self.max_queue:
                return "server_busy"
            self.queued += 1  # the place is held while the supervisor is asked
        remote = self.client.open(source)
        with self._lock:
            if remote is False or (remote is None and self._open.get(source, 0) >= self.max_per_source):
                self.queued -= 1
                return "too_many_connections"
            self._open[source] = self._open.get(source, 0) + 1
            if remote:
                self._remote[source] = self._remote.get(source, 0) + 1
        return None

    def release(self, source: str) -> None:
        super().release(source)
        with self._lock:
            remote = self._remote.get(source, 0)
            if remote > 1:
                self._remote[source] = remote - 1
            else:
                self._remote.pop(source, None)
        if remote:
            self.client.close(source)
