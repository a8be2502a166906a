"""EST on every core: `[est] workers` processes (hub/est/worker.py) serve one listening socket; the supervisor's side.

One `serve` process runs Python on one core at a time (the GIL), and an enrollment is mostly Python and OpenSSL
work under it (TLS handshake, CSR checks, signing, the registry transaction, PKCS#7). So EST runs in worker
processes, and the supervisor keeps the broker, the fleet API, jobs and CRLs. How, and why:

- One listening socket, bound here (so a port in use is still the one-line error of `serve`), inherited by every
  worker. Not SO_REUSEPORT: with one socket per worker the kernel hashes each connection to one worker's queue at
  SYN time, so the connections queued on a worker that dies are reset, a busy worker gets its share all the same,
  and any process of the same user may bind the port too. One socket is one accept queue: whichever worker is
  free takes the next connection, and a worker replaced loses nothing queued. Workers accept non-blocking (another
  may take the connection first).
- Fresh interpreters (fork + exec of `python -m hub.est.worker`: spawn semantics), never a bare fork: a forked
  child would inherit the supervisor's PKCS#11 session (the CA may be in a token; PKCS#11 forbids using a
  session across fork), its SQLite connections and its threads' locks. Each worker loads the CA itself: file keys
  from ca/ (the 0600 check ran at `serve` start), token keys through its own session with the PIN from the
  configured pin source (never in argv or the environment). Nothing secret crosses the control socket: it
  carries the supervisor's configuration as serve runs it (paths, limits, the PIN's source, never a PIN).
- Single-use tokens stay exactly-once across processes: the registry is SQLite in WAL mode, every write is a
  BEGIN IMMEDIATE transaction with a busy timeout (hub/registry/store.py), and `enroll` checks and spends the
  token inside one such transaction; a second process waits for the lock and then finds the token used
  (tests/integration/test_est_workers.py races processes on one token). The audit chain reads its head inside
  the same transaction, so rows from several processes still chain. SQLite has one writer at a time, so what
  scales is what happens outside its lock: the certificate is signed before the transaction (after a read-only
  check of the token), writers of all processes queue on an flock instead of SQLite's sleeping busy handler, and
  the issuing transactions a process has queued meanwhile share one transaction and its fsync
  (hub/registry/groupcommit.py: one commit per enrollment capped the hub near 1/fsync whatever the workers).
- Limits are the hub's, exact across workers: the supervisor holds every `[est]` budget as fleet.toml says it
  (request rate and burst per source, failures per source and device, per source and hub-wide, connections open
  at once per source) in one LimitServer thread (hub/est/sharedlimits.py), and each worker asks it over its own
  socketpairs (a round trip of some tens of microseconds per decision, a dict operation here). So a source gets
  exactly its budget whichever workers its requests reach, and a worker restarted does not reset a budget. A
  worker whose supervisor does not answer (stopped; gone while the worker finishes what it serves) decides alone
  meanwhile with its `share`: 1/N of every budget (rounded up, at least 1), which was the design before.
- Denials are audited aggregated per worker: at most one row per worker, action, source and reason a minute
  (hub/est/denials.py), so a flood writes N rows a minute per key rather than one.
- Events: EstService calls back only into its Prometheus counters (enrollments, renewals, denials by reason;
  hub/serve/stats.py); each worker sends their changes over its control socket and the monitor thread here adds
  them to the supervisor's counters, so /metrics counts every worker. A renewal needs nothing else: its registry
  transaction writes an authz event, which the broker plugin follows by itself. Counts not yet sent by a worker
  killed with SIGKILL are lost (a few milliseconds' worth).
- The monitor restarts a worker that died (audited `est.worker_died`), after 1 s, doubling to 30 s while
  workers keep dying young. `stop()` sends SIGTERM to all and waits (SIGKILL after 10 s); a worker whose
  supervisor died sees its control socket close and exits by itself, so nothing outlives `serve`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hub.config import ConfigError, HubConfig
from hub.est.connlimits import Limits
from hub.est.ratelimit import RateLimiter
from hub.est.sharedlimits import LimitServer
from hub.serve import stats

log = logging.getLogger("tessera.hub.est")

READY_TIMEOUT = 60.0     # spawn, imports and the CA load of a worker, on a busy machine
STOP_TIMEOUT = 10.0
RESTART_DELAYS = (1.0, 30.0)  # first delay, cap (doubling while workers die within YOUNG seconds)
YOUNG = 10.0


class WorkerError(ConfigError):
    """A worker could not start (the message names it and its exit status; its log says why)."""


def share(cfg: HubConfig, workers: int) -> tuple[RateLimiter, Limits]:
    """One worker's own rate limiter and listener limits, for when the supervisor does not answer
    (hub/est/sharedlimits.py): 1/`workers` of each hub-wide `[est]` budget (ceil, >= 1)."""
    def part(value: float) -> int:
        return max(1, math.ceil(value / workers))

    limiter = RateLimiter(cfg.rate_per_source / workers, part(cfg.rate_burst), part(cfg.failures_per_minute),
                          part(cfg.source_failures_per_minute), part(cfg.global_failures_per_minute))
    base = Limits.from_config(cfg)
    return limiter, Limits(header_timeout=base.header_timeout, request_timeout=base.request_timeout,
                           max_per_source=part(base.max_per_source))


def hub_limits(cfg: HubConfig) -> tuple[RateLimiter, Limits]:
    """The hub-wide `[est]` budgets as fleet.toml says (the supervisor's LimitServer holds them for all workers)."""
    limiter = RateLimiter(cfg.rate_per_source, cfg.rate_burst, cfg.failures_per_minute,
                          cfg.source_failures_per_minute, cfg.global_failures_per_minute)
    return limiter, Limits.from_config(cfg)


def listen(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """The EST listening socket (as socketserver would bind it: SO_REUSEADDR, TCP_NODELAY)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen
    control: socket.socket
    started: float
    buf: bytes = b""
    ready: bool = False
    pid: int = 0
    eof: bool = False


class EstPool:
    """`workers` EST worker processes on one listening socket; `start()`, `port`, `pids()`, `stop()`."""

    def __init__(self, cfg: HubConfig, registry: object, workers: int, verbose: bool = False,
                 on_event: Callable[[str, str], None] = lambda kind, detail: None,
                 hub_stopping: threading.Event | None = None):
        """Binds cfg.est_host:cfg.est_port now (OSError if taken); `registry` is the supervisor's (its counters
        get the workers' events); `on_event(kind, detail)` is told when a worker died; once `hub_stopping` is set
        a worker that exits is not restarted (a signal to the whole process group stops the workers too)."""
        self.cfg, self.workers, self.verbose = cfg, workers, verbose
        self.stats = stats.of(registry)
        self.on_event = on_event
        self.listener = listen(cfg.est_host, cfg.est_port)
        limiter, limits = hub_limits(cfg)
        self.limits = LimitServer(limiter, limits.max_per_source)
        self.port = self.listener.getsockname()[1]
        self.cfg = dataclasses.replace(cfg, est_port=self.port)  # port 0: the one bound
        self._lock = threading.Lock()
        self._workers: dict[int, _Worker] = {}
        self._stopping = threading.Event()
        self._hub_stopping = hub_stopping or self._stopping
        self._monitor: threading.Thread | None = None
        self._fails = 0
        self._restart_at: dict[int, float] = {}
        self.restarts = 0

    # --- life cycle ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start every worker and wait until each serves (WorkerError if one exits or stays silent)."""
        try:
            for index in range(self.workers):
                self._spawn(index)
            deadline = time.monotonic() + READY_TIMEOUT
            while not all(w.ready for w in self._workers.values()):
                self._poll(0.1)
                for w in self._workers.values():
                    if w.proc.poll() is not None and not w.ready:
                        raise WorkerError(f"EST worker {w.index} exited {w.proc.returncode} before it served "
                                          "(its error is in the log above)")
                if time.monotonic() > deadline:
                    raise WorkerError(f"EST workers not ready within {READY_TIMEOUT:g} s")
        except BaseException:
            self.stop()
            raise
        self._monitor = threading.Thread(target=self._watch, name="est-pool", daemon=True)
        self._monitor.start()

    def pids(self) -> list[int]:
        with self._lock:
            return [w.proc.pid for w in self._workers.values() if w.proc.poll() is None]

    def stop(self) -> None:
        """SIGTERM every worker, wait for them (SIGKILL after STOP_TIMEOUT), take their last counts; idempotent."""
        self._stopping.set()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
        with self._lock:
            workers = list(self._workers.values())
        for w in workers:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for w in workers:
            try:
                w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("EST worker %d (pid %d) did not stop: killed", w.index, w.proc.pid)
                w.proc.kill()
                w.proc.wait(timeout=5)
        while any(not w.eof for w in workers) and self._poll(0.05):  # the final counts each worker sent
            pass
        for w in workers:
            w.control.close()
        with self._lock:
            self._workers.clear()
        self.limits.stop()
        self.listener.close()

    # --- workers --------------------------------------------------------------------------------------------------
    def _spawn(self, index: int) -> _Worker:
        ours, theirs = socket.socketpair()
        limits = self.limits.channels()
        try:
            cmd = [sys.executable, "-m", "hub.est.worker", str(self.listener.fileno()), str(theirs.fileno()),
                   ",".join(str(c.fileno()) for c in limits)]
            proc = subprocess.Popen(cmd, pass_fds=(self.listener.fileno(), theirs.fileno(),
                                                   *(c.fileno() for c in limits)), stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            for c in limits:
                c.close()
        # the supervisor's configuration as it runs (fleet.toml and what serve's options changed)
        config = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self.cfg).items()}
        settings = {"index": index, "workers": self.workers, "verbose": self.verbose, "config": config}
        ours.sendall((json.dumps(settings) + "\n").encode())
        ours.setblocking(False)
        worker = _Worker(index, proc, ours, time.monotonic())
        with self._lock:
            self._workers[index] = worker
        return worker

    def _poll(self, timeout: float) -> bool:
        """Read what the workers sent (counts, ready) for up to `timeout` s; False when no socket is open."""
        with self._lock:
            open_ = {w.control: w for w in self._workers.values() if not w.eof}
        if not open_:
            return False
        readable, _, _ = select.select(list(open_), [], [], timeout)
        for sock in readable:
            w = open_[sock]
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                w.eof = True
                continue
            w.buf += data
            *lines, w.buf = w.buf.split(b"\n")
            for line in lines:
                self._message(w, line)
        return True

    def _message(self, w: _Worker, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except ValueError:
            log.error("EST worker %d sent an unreadable message", w.index)
            return
        if "counts" in msg:
            stats.add(self.stats, msg["counts"])
        if "ready" in msg:
            w.ready, w.pid = True, int(msg["ready"])
            log.info("EST worker %d ready (pid %d)", w.index, w.pid)

    def _watch(self) -> None:
        """The monitor: counts from the workers; a worker that died is started again (with a delay)."""
        while not self._stopping.is_set():
            self._poll(0.2)
            now = time.monotonic()
            with self._lock:
                workers = list(self._workers.values())
            for w in workers:
                if self._stopping.is_set() or self._hub_stopping.is_set() or w.proc.poll() is None:
                    continue
                if w.index not in self._restart_at:
                    self._poll(0)  # what it sent before it died
                    lived = now - w.started
                    self._fails = self._fails + 1 if lived < YOUNG else 0
                    delay = min(RESTART_DELAYS[1], RESTART_DELAYS[0] * 2 ** max(0, self._fails - 1))
                    detail = (f"EST worker {w.index} (pid {w.proc.pid}) exited {w.proc.returncode} after "
                              f"{lived:.0f} s; restarting in {delay:g} s")
                    log.error("%s", detail)
                    self.on_event("est.worker_died", detail)
                    self._restart_at[w.index] = now + delay
                elif now >= self._restart_at[w.index]:
                    del self._restart_at[w.index]
                    w.control.close()
                    try:
                        self._spawn(w.index)
                        self.restarts += 1
                    except OSError as exc:
                        log.error("EST worker %d could not be started: %s", w.index, exc)
                        self._restart_at[w.index] = now + RESTART_DELAYS[1]
