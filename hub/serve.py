"""`tessera-hub serve`: the hub's supervisor — EST, Mosquitto, admin MQTT client, admin socket, CRL refresher."""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Callable

from . import admin, estserver
from .broker.mosquitto import MosquittoBroker
from .broker.mqttadmin import AdminClient
from .ca import load_ca
from .config import HubConfig
from .crl import crl_needs_refresh, current_crl
from .estservice import EstService
from .live import LiveHub
from .ratelimit import RateLimiter
from .registry import Registry

log = logging.getLogger("tessera.hub")

CRL_CHECK_INTERVAL = 60.0
CANARY_REFRESH = timedelta(minutes=10)  # canaries live 15 minutes


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _dispatch(live: LiveHub) -> Callable[[dict], object]:
    def dispatch(req: dict) -> object:
        op = req.get("op")
        if op == "ping":
            return {"pong": True}
        if op == "set_status":
            return live.set_status(str(req["device"]), str(req["status"]), str(req.get("reason", "")),
                                   actor=str(req.get("actor", "cli")))
        if op == "acl":
            live.refresh_acl()
            return {"acl": "reloaded"}
        if op == "traffic":
            return live.traffic()
        if op == "send":
            return {"id": live.send_command(str(req["device"]), str(req["command"]), dict(req.get("args") or {}))}
        if op == "ack":
            return live.command_ack(str(req["id"]))
        raise ValueError(f"unknown admin operation {op!r}")
    return dispatch


def run(cfg: HubConfig, host: str, est_port: int, mqtt_port: int, verbose: bool = False,
        announce: Callable[[str], None] = print, stop: threading.Event | None = None) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    cfg = dataclasses.replace(cfg, est_host=host, est_port=est_port, mqtt_port=mqtt_port)

    ca = load_ca(cfg.ca_dir, cfg.ca_token)
    registry = Registry(cfg.registry_path)
    tls_dir = cfg.tls_dir

    def event(kind: str, detail: str) -> None:
        registry.audit(kind, "error" if kind in ("broker.died", "broker.fail_closed", "broker.error") else "ok",
                       _now(), actor="hub", detail=detail)

    broker = MosquittoBroker(cfg.broker_dir, host, mqtt_port, cafile=cfg.ca_dir / "device-chain.pem",
                             certfile=tls_dir / "est.pem", keyfile=tls_dir / "est.key",
                             server_ca=cfg.ca_dir / "root.pem", on_event=event)
    live = LiveHub(cfg, ca, registry, broker)
    stack: list[Callable[[], None]] = []
    try:
        bundle, canary = live.prepare_crl(_now())
        broker.set_initial(bundle, canary, live.acl())
        broker.start()
        stack.append(broker.stop)
        admin_mqtt = AdminClient(host, mqtt_port, cfg.ca_dir / "root.pem", tls_dir / "admin.pem",
                                 tls_dir / "admin.key", on_status=live.on_status,
                                 on_device_message=live.on_device_message)
        admin_mqtt.start()
        stack.append(admin_mqtt.stop)
        broker.attach_admin(admin_mqtt)
        live.admin = admin_mqtt

        limiter = RateLimiter(cfg.rate_per_source, cfg.rate_burst, cfg.failures_per_minute)
        service = EstService(ca, registry, cfg.policy, cfg.crl_dir, cfg.crl_url, limiter)
        tls = estserver.server_context(tls_dir / "est.pem", tls_dir / "est.key", cfg.ca_dir / "device-ca.pem")
        server, thread = estserver.start(service, host, est_port, tls)
        stack.append(lambda: (server.shutdown(), server.server_close(), thread.join(timeout=5)))

        sock_server, _ = admin.serve(cfg.admin_socket, _dispatch(live))
        stack.append(lambda: (sock_server.shutdown(), sock_server.server_close(),
                              cfg.admin_socket.unlink(missing_ok=True)))

        registry.audit("hub.start", "ok", _now(), actor="hub",
                       detail=f"EST {host}:{server.server_address[1]} MQTT {host}:{mqtt_port} broker pid {broker.pid}")
        announce(f"EST   https://{host}:{server.server_address[1]}/.well-known/est/  (fleet {cfg.fleet})")
        announce(f"MQTT  mqtts://{host}:{mqtt_port}  (mTLS, device certificates only)")
        announce(f"CRL   https://{host}:{server.server_address[1]}/crl/device.crl")
        announce(f"admin {cfg.admin_socket}")
        announce("hub ready")
        next_check = time.monotonic() + CRL_CHECK_INTERVAL
        # Short waits: a SIGTERM delivered to another thread only runs its handler when the main thread wakes.
        while not stop.wait(0.5):
            if live.canary_age() > CANARY_REFRESH:
                try:  # a fresh canary (and CRL) long before the broker's proof certificate expires
                    live.enforce_crl()
                except Exception:
                    log.exception("re-issuing the CRL with a fresh canary failed")
            if time.monotonic() < next_check:
                continue
            next_check = time.monotonic() + CRL_CHECK_INTERVAL
            try:
                crl = current_crl(cfg.crl_dir, ca.device_ca)
                if crl is None or crl_needs_refresh(crl, _now()):
                    live.enforce_crl()
                    log.info("CRL re-issued before its next update")
            except Exception:  # keep serving; the previous CRL stays in force
                log.exception("CRL refresh failed; the previous CRL stays in place")
    finally:
        for undo in reversed(stack):
            try:
                undo()
            except Exception:
                log.exception("shutdown step failed")
        registry.audit("hub.stop", "ok", _now(), actor="hub")
        registry.close()
        ca.close()
        announce("hub stopped")
