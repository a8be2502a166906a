"""One EST worker process (`python -m hub.est.worker LISTEN_FD CONTROL_FD LIMITS_FD,...`, started by hub/est/pool.py).

It serves the listening socket it inherited with its own EstService: its own registry connection, its own CA
(file keys loaded from ca/, token keys through its own PKCS#11 session: it is a fresh interpreter, nothing of the
supervisor's sessions is inherited); the limits are the hub's, held by the supervisor (LIMITS_FDs: a
hub/est/sharedlimits.py LimitClient). The control socket
carries JSON lines: the supervisor sends the settings first; the worker answers {"ready": pid} once it serves,
then {"counts": delta} with its EST event counters (enrollments, renewals, denials by reason) whenever they moved,
so the supervisor's Prometheus counters (hub/serve/stats.py) count every worker's events. EOF on the control
socket means the supervisor is gone (even kill -9): the worker stops listening at once (the port is free for the
next `serve`), finishes what it serves and exits. SIGTERM: the same, the supervisor's way to stop it. SIGINT is
ignored (a Ctrl-C reaches the whole process group; the supervisor then stops its workers itself).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import ssl
import sys
import threading
from datetime import timedelta
from pathlib import Path

log = logging.getLogger("tessera.hub.est")

#: after a counts message, at most this often again (a flood of denials is a few messages a second)
MIN_REPORT_INTERVAL = 0.01


class _Control:
    """The worker's end of the control socket: JSON lines out (thread-safe), the settings line in."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._lock = threading.Lock()
        self._reader = sock.makefile("rb")

    def read(self) -> dict | None:
        """The next message; None once the supervisor is gone: EOF, or a reset (a supervisor killed with our
        counts still unread in its socket resets the connection instead of closing it)."""
        try:
            line = self._reader.readline()
        except OSError:
            return None
        return json.loads(line) if line else None

    def send(self, message: dict) -> None:
        data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
        with self._lock:
            try:
                self.sock.sendall(data)
            except OSError:  # the supervisor is gone; the EOF on read stops us
                pass


def _reporting_stats(changed: threading.Event):
    from hub.serve import stats

    class ReportingStats(stats.HubStats):
        """This process's counters; every change is also kept as not yet sent (`take()`) and wakes the reporter
        thread (collecting the Prometheus registry for each report cost a twelfth of a busy worker's time)."""

        def __init__(self) -> None:
            super().__init__()
            self._unsent_lock = threading.Lock()
            self._unsent: dict = {}

        def _moved(self, key: str, reason: str | None = None) -> None:
            with self._unsent_lock:
                if reason is None:
                    self._unsent[key] = self._unsent.get(key, 0) + 1
                else:
                    by = self._unsent.setdefault(key, {})
                    by[reason] = by.get(reason, 0) + 1
            changed.set()

        def take(self) -> dict:
            """The changes since the last take(), in the shape of stats.counts() (only what moved)."""
            with self._unsent_lock:
                out, self._unsent = self._unsent, {}
            return out

        def enrolled(self) -> None:
            super().enrolled()
            self._moved("enrollments")

        def renewed(self) -> None:
            super().renewed()
            self._moved("renewals")

        def denied(self, code: str, status: int | None = None) -> None:
            super().denied(code, status)
            self._moved("denials", stats.denial_reason(code, status))

    return ReportingStats()


def _report(control: _Control, hub_stats, changed: threading.Event, stop: threading.Event) -> None:
    """Send the counters' changes until `stop` (the caller sends what is left)."""
    while not stop.is_set():
        if not changed.wait(0.5):
            continue
        changed.clear()
        delta = hub_stats.take()
        if delta:
            control.send({"counts": delta})
        stop.wait(MIN_REPORT_INTERVAL)


def main(argv: list[str]) -> int:
    listen_fd, control_fd, limits_fds = int(argv[0]), int(argv[1]), [int(fd) for fd in argv[2].split(",")]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control = _Control(socket.socket(fileno=control_fd))
    settings = control.read()
    if settings is None:
        return 1  # the supervisor went away before it sent anything
    index = int(settings["index"])
    logging.basicConfig(level=logging.DEBUG if settings.get("verbose") else logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s[est-{index}]: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    from hsm.errors import HsmError
    from hub.ca.authority import CaError, load_ca
    from hub.config import HubConfig
    from hub.est import server as estserver
    from hub.est.connlimits import Limits
    from hub.est.pool import share
    from hub.est.sharedlimits import LimitClient, SharedGate
    from hub.est.service import EstService
    from hub.registry.store import RegistryError
    from hub.serve import stats

    config = settings["config"]
    cfg = HubConfig(**{**config, "root": Path(config["root"])})
    listener = socket.socket(fileno=listen_fd)
    try:  # what serve checked already can still fail here (a token gone, a PIN file changed): one line, exit 1
        ca = load_ca(cfg.ca_dir, cfg.ca_token)
        registry = cfg.open_registry()
        tls = estserver.server_context(cfg.tls_dir / "est.pem", cfg.tls_dir / "est.key",
                                       cfg.ca_dir / "device-ca.pem")
    except (CaError, HsmError, RegistryError, OSError, ssl.SSLError) as exc:
        log.error("EST worker %d cannot start: %s", index, exc)
        return 1
    changed = threading.Event()
    hub_stats = stats.install(registry, _reporting_stats(changed))
    own_limiter, own_limits = share(cfg, int(settings["workers"]))  # when the supervisor does not answer
    limiter = LimitClient([socket.socket(fileno=fd) for fd in limits_fds], own_limiter)  # the supervisor's budgets
    limits = Limits.from_config(cfg)
    service = EstService(ca, registry, cfg.policy, cfg.crl_dir, cfg.crl_urls, limiter,
                         supersede_grace=timedelta(seconds=cfg.supersede_grace_seconds))
    server = estserver.EstHTTPServer(listener.getsockname(), service, tls, limits, sock=listener,
                                     gate=SharedGate(limiter, own_limits.max_per_source, limits.max_queue))
    serving = threading.Thread(target=server.serve_forever, name="est-server", daemon=True)
    serving.start()

    def watch_supervisor() -> None:
        while control.read() is not None:
            pass
        if not stop.is_set():
            log.warning("the supervisor is gone: this EST worker stops")
            try:  # the one listening socket of every worker: the port is free at once
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            stop.set()

    threading.Thread(target=watch_supervisor, name="est-control", daemon=True).start()
    reporter = threading.Thread(target=_report, args=(control, hub_stats, changed, stop), name="est-report",
                                daemon=True)
    reporter.start()
    control.send({"ready": os.getpid()})
    log.debug("EST worker %d serving (pid %d)", index, os.getpid())
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.shutdown()
        serving.join(timeout=5)
        server.server_close()  # also writes the denial counts still aggregated
        reporter.join(timeout=5)
        last = hub_stats.take()
        if last:
            control.send({"counts": last})
        registry.close()
        ca.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
