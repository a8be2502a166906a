"""Connection limits of the EST listener: who gets a worker (per-source cap, bounded queue) and for how long.

A slow client must not hold a worker: every connection has a deadline -- `header_timeout` from accept() to the
end of its request headers (the TLS handshake included), then `request_timeout` from accept() for the whole
request; a kept-alive connection's next request gets the same from the end of the previous answer -- and the `Reaper` shuts its socket down when the deadline passes, whatever the worker is blocked in
(handshake, reading, writing). The per-read timeout alone never ends a client that trickles a byte every few
seconds. `ConnectionGate` caps the connections open at once per source address and the accepted connections
waiting for a worker; the excess is closed at once (one TCP close, no TLS).
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("tessera.hub.est")


@dataclass(frozen=True)
class Limits:
    """The listener's limits (fleet.toml [est]: header_timeout, request_timeout, max_connections_per_source)."""

    header_timeout: float = 10.0    # accept() to the end of the request headers, TLS handshake included
    request_timeout: float = 30.0   # accept() to the response sent
    io_timeout: float = 10.0        # one read or write
    workers: int = 64               # connections served at once
    max_queue: int = 256            # accepted connections waiting for a worker
    max_per_source: int = 32        # connections open at once from one address (queued or served)
    keepalive_requests: int = 100   # requests one connection may carry (HTTP/1.1 keep-alive), then it is closed

    @classmethod
    def from_config(cls, cfg) -> "Limits":
        return cls(header_timeout=float(cfg.header_timeout), request_timeout=float(cfg.request_timeout),
                   max_per_source=int(cfg.max_connections_per_source))


class ConnectionGate:
    """Admission at accept(): `admit(source)` -> None (admitted) or the refusal code; `started()` when a worker
    takes the connection; `release(source)` when it is closed. Thread-safe."""

    def __init__(self, max_per_source: int, max_queue: int):
        self.max_per_source, self.max_queue = max_per_source, max_queue
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}
        self.queued = 0

    def admit(self, source: str) -> str | None:
        with self._lock:
            if self._open.get(source, 0) >= self.max_per_source:
                return "too_many_connections"
            if self.queued >= self.max_queue:
                return "server_busy"
            self._open[source] = self._open.get(source, 0) + 1
            self.queued += 1
            return None

    def started(self) -> None:
        with self._lock:
            self.queued -= 1

    def release(self, source: str) -> None:
        with self._lock:
            left = self._open.get(source, 0) - 1
            if left > 0:
                self._open[source] = left
            else:
                self._open.pop(source, None)

    def open_from(self, source: str) -> int:
        with self._lock:
            return self._open.get(source, 0)


class Ticket:
    """One watched connection: `accepted` (monotonic; a kept-alive connection's next request restarts it), its
    current `deadline`, `expired` once cut, `idle` while it waits for its next request after an answered one."""

    __slots__ = ("id", "accepted", "deadline", "expired", "idle", "_sock")

    def __init__(self, ident: int, accepted: float, deadline: float, sock: socket.socket):
        self.id, self.accepted, self.deadline, self.expired, self._sock = ident, accepted, deadline, False, sock
        self.idle = False


class Reaper:
    """A thread that shuts down the sockets of connections past their deadline (checked every `tick` s).

    It holds a dup() of each socket (the TLS wrapper takes over the original): shutdown() on it wakes the worker
    blocked on the connection, which then closes it as usual."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic, tick: float = 0.2):
        self.monotonic, self.tick = monotonic, tick
        self._lock = threading.Lock()
        self._watched: dict[int, Ticket] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="est-reaper", daemon=True)
        self._thread.start()

    def watch(self, sock: socket.socket, seconds: float) -> Ticket:
        now = self.monotonic()
        ticket = Ticket(next(self._ids), now, now + seconds, sock.dup())
        with self._lock:
            self._watched[ticket.id] = ticket
        return ticket

    def extend(self, ticket: Ticket, seconds_from_accept: float) -> None:
        """Move the deadline to `seconds_from_accept` after accept() (e.g. headers read: the request deadline)."""
        with self._lock:
            ticket.deadline = ticket.accepted + seconds_from_accept

    def next_request(self, ticket: Ticket, seconds: float) -> None:
        """A kept-alive connection waits for its next request: idle, `seconds` from now for its headers."""
        with self._lock:
            ticket.accepted, ticket.idle = self.monotonic(), True
            ticket.deadline = ticket.accepted + seconds

    def done(self, ticket: Ticket) -> None:
        with self._lock:
            self._watched.pop(ticket.id, None)
            ticket._sock.close()

    def _run(self) -> None:
        while not self._stop.wait(self.tick):
            self.reap()

    def cut_all(self) -> int:
        """Cut every watched connection now, whatever its deadline (a server that stops); returns how many."""
        return self.reap(everything=True)

    def cut_idle(self) -> int:
        """Cut the kept-alive connections waiting for their next request (a server that stops)."""
        return self.reap(idle=True)

    def reap(self, everything: bool = False, idle: bool = False) -> int:
        """Cut every connection past its deadline now (`everything`: every one; `idle`: the idle ones)."""
        now, cut = self.monotonic(), 0
        with self._lock:
            for ticket in [t for t in self._watched.values()
                           if everything or (t.idle if idle else t.deadline <= now)]:
                del self._watched[ticket.id]
                ticket.expired = True
                try:
                    ticket._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed by the peer
                ticket._sock.close()
                cut += 1
        return cut

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
