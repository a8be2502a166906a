"""`tessera-hub serve`: the hub's supervisor — EST server and CRL refresher, stopped by SIGTERM/SIGINT."""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import threading
from datetime import datetime, timezone
from typing import Callable

from . import estserver
from .ca import load_ca
from .config import HubConfig
from .estservice import EstService
from .ratelimit import RateLimiter
from .registry import Registry
from .revocation import refresh_if_due

log = logging.getLogger("tessera.hub")

CRL_CHECK_INTERVAL = 60.0


def _now() -> datetime:
    return datetime.now(timezone.utc)


def run(cfg: HubConfig, host: str, est_port: int, mqtt_port: int, verbose: bool = False,
        announce: Callable[[str], None] = print, stop: threading.Event | None = None) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = stop or threading.Event()
    cfg = dataclasses.replace(cfg, est_host=host, est_port=est_port, mqtt_port=mqtt_port)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())

    ca = load_ca(cfg.ca_dir, cfg.ca_token)
    registry = Registry(cfg.registry_path)
    refresh_if_due(ca, registry, cfg.crl_dir, _now())
    limiter = RateLimiter(cfg.rate_per_source, cfg.rate_burst, cfg.failures_per_minute)
    service = EstService(ca, registry, cfg.policy, cfg.crl_dir, cfg.crl_url, limiter)
    tls = estserver.server_context(cfg.tls_dir / "est.pem", cfg.tls_dir / "est.key", cfg.ca_dir / "device-ca.pem")
    server, thread = estserver.start(service, host, est_port, tls)
    registry.audit("hub.start", "ok", _now(), actor="hub", detail=f"EST on {host}:{server.server_address[1]}")
    announce(f"EST  https://{host}:{server.server_address[1]}/.well-known/est/  (fleet {cfg.fleet})")
    announce(f"CRL  https://{host}:{server.server_address[1]}/crl/device.crl")
    try:
        while not stop.wait(CRL_CHECK_INTERVAL):
            try:
                if refresh_if_due(ca, registry, cfg.crl_dir, _now()):
                    log.info("CRL re-issued before its next update")
            except Exception:  # keep serving; the old CRL stays in place
                log.exception("CRL refresh failed; the previous CRL stays in place")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        registry.audit("hub.stop", "ok", _now(), actor="hub")
        registry.close()
        ca.close()
        announce("hub stopped")
