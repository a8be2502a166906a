"""`tessera-hub serve`: the hub's supervisor — EST, Mosquitto with the authz plugin, admin MQTT, admin socket, CRLs."""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import threading
from datetime import datetime, timedelta, timezone
from typing import Callable

from cryptography import x509

from hub.serve import admin

from hub.authz.identities import ensure_hub_identity
from hub.broker.mosquitto import Limits, MosquittoBroker
from hub.broker.mqttadmin import AdminClient
from hub.ca.authority import load_ca
from hub.config import HubConfig
from hub.est.pool import EstPool
from hub.serve.guard import DirectoryLock, check_ports_free, check_private_files, check_registry
from hub.serve.live import LiveHub

log = logging.getLogger("tessera.hub")

AUTHZ_EVENTS_KEPT = timedelta(days=1)


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
        if op in ("authz_sync", "acl"):
            return live.authz_sync()
        if op == "traffic":
            return live.traffic()
        if op == "send":
            return {"id": live.send_command(str(req["device"]), str(req["command"]), dict(req.get("args") or {}),
                                            actor=str(req.get("actor", "cli")))}
        if op == "ack":
            return live.command_ack(str(req["id"]))
        raise ValueError(f"unknown admin operation {op!r}")
    return dispatch


def run(cfg: HubConfig, host: str, est_port: int, mqtt_port: int, verbose: bool = False,
        announce: Callable[[str], None] = print, stop: threading.Event | None = None,
        api_port: int | None = None, est_workers: int | None = None, crl_port: int | None = None) -> None:
    """Run the hub until `stop` (or SIGTERM/SIGINT). Before anything is written: this directory must not be served
    already, its private keys must be private and its ports free (hub/serve/guard.py; ConfigError otherwise)."""
    lock = DirectoryLock(cfg).acquire()
    try:
        check_private_files(cfg)
        explicit_api = api_port if api_port is not None else cfg.api_port
        explicit_crl = crl_port if crl_port is not None else cfg.crl_http_port
        broker_ports = ({"MQTT": mqtt_port} if cfg.broker_kind == "mosquitto"  # a RabbitMQ node has the MQTT port
                        else {"RabbitMQ auth": cfg.rabbitmq_auth_port})
        check_ports_free(host, {"EST": est_port, **broker_ports, "API": explicit_api or 0,
                                "CRL": explicit_crl or 0})
        _run(cfg, host, est_port, mqtt_port, verbose, announce, stop, api_port, est_workers, crl_port)
    finally:
        lock.release()


def _run(cfg: HubConfig, host: str, est_port: int, mqtt_port: int, verbose: bool,
         announce: Callable[[str], None], stop: threading.Event | None, api_port: int | None,
         est_workers: int | None = None, crl_port: int | None = None) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    cfg = dataclasses.replace(cfg, est_host=host, est_port=est_port, mqtt_port=mqtt_port)

    ca = load_ca(cfg.ca_dir, cfg.ca_token)
    registry = cfg.open_registry()  # PostgreSQL: an empty database gets the core schema here (pgschema)
    try:
        check_registry(cfg, registry)  # a shared registry: this fleet's, with this hub's root CA and audit key
    except BaseException:
        registry.close()
        ca.close()
        raise
    tls_dir = cfg.tls_dir

    def event(kind: str, detail: str) -> None:
        registry.audit(kind, "error" if kind in ("broker.died", "broker.fail_closed", "broker.error") else "ok",
                       _now(), actor="hub", detail=detail)

    ensure_hub_identity(registry, x509.load_pem_x509_certificate((tls_dir / "admin.pem").read_bytes()), _now())
    from hub.api.identityroutes import ensure_local_operator

    ensure_local_operator(cfg, ca, registry, _now())  # the local CLI's operator identity (older hub directories)
    registry.prune_authz_events(_now() - AUTHZ_EVENTS_KEPT)
    limits = Limits(max_payload=cfg.max_payload, max_queued_bytes=cfg.max_queued_bytes,
                    connect_rate=cfg.connect_rate, connect_burst=cfg.connect_burst)
    if cfg.broker_kind == "rabbitmq":
        from hub.broker.rabbitmq import RabbitMQBroker

        broker = RabbitMQBroker.for_hub(cfg, registry, ca, on_event=event)
    else:
        broker = MosquittoBroker(cfg.broker_dir, host, mqtt_port, cafile=cfg.ca_dir / "device-chain.pem",
                                 certfile=tls_dir / "est.pem", keyfile=tls_dir / "est.key",
                                 registry_path=cfg.registry_path, device_ca=cfg.ca_dir / "device-ca.pem",
                                 service_ca=cfg.ca_dir / "service-ca.pem", limits=limits, on_event=event)
    live = LiveHub(cfg, ca, registry, broker)
    from hub.jobs import schema as jobs_schema
    from hub.jobs.runner import JobRunner

    jobs = JobRunner(live)  # takes acks from the first MQTT message on (its thread starts below)
    live.ack_listeners.append(jobs.on_ack)
    stack: list[Callable[[], None]] = []
    try:
        jobs_schema.apply_schema(registry)
        broker.start()
        stack.append(broker.stop)
        stack.append(jobs.flush)  # after the hub's MQTT session ended: every ack it received is applied
        admin_mqtt = AdminClient(host, mqtt_port, cfg.ca_dir / "root.pem", tls_dir / "admin.pem",
                                 tls_dir / "admin.key", on_status=live.on_status,
                                 on_device_message=live.on_device_message, protocol=broker.mqtt_protocol,
                                 client_id=cfg.admin_client_id)
        admin_mqtt.start()
        stack.append(admin_mqtt.stop)
        broker.attach_admin(admin_mqtt)
        live.admin = admin_mqtt

        # EST in worker processes on one listening socket (hub/est/pool.py: why, and what is per worker)
        est = EstPool(cfg, registry, est_workers or cfg.workers, verbose, on_event=lambda kind, detail:
                      registry.audit(kind, "error", _now(), actor="hub", detail=detail), hub_stopping=stop)
        stack.append(est.stop)
        est.start()

        from hub.api.server import configured_port, start_api

        api_port, api_explicit = (api_port, True) if api_port is not None else configured_port(cfg)
        try:
            api = start_api(cfg, live, host, api_port)
            stack.append(api)
            (cfg.root / "api.addr").write_text(f"{host} {api.port}\n")  # where the local CLI finds the API
            stack.append(lambda: (cfg.root / "api.addr").unlink(missing_ok=True))
            api_line = f"API   https://{host}:{api.port}/api/v1/"
        except OSError as exc:  # the default port taken (e.g. another hub on this machine): run without the API
            if api_explicit:
                raise
            log.error("fleet API not started: %s:%d: %s (set [api] port in fleet.toml)", host, api_port, exc)
            registry.audit("api.start", "error", _now(), actor="hub", detail=f"{host}:{api_port}: {exc}")
            api_line = f"API   not started: port {api_port} unavailable ({exc.strerror or exc})"

        from hub.serve.crlhttp import serve_crls  # CRLs over plain HTTP (RFC 5280), read-only

        crl_http, crl_line = serve_crls(cfg, host, crl_port, lambda detail: registry.audit(
            "crl_http.start", "error", _now(), actor="hub", detail=detail))
        if crl_http is not None:
            stack.append(crl_http)

        jobs.start()  # running jobs resume (acks of commands sent before a restart still match)
        stack.append(jobs.stop)

        sock_server, _ = admin.serve(cfg.admin_socket, _dispatch(live))
        stack.append(lambda: (sock_server.shutdown(), sock_server.server_close(),
                              cfg.admin_socket.unlink(missing_ok=True)))

        registry.audit("hub.start", "ok", _now(), actor="hub",
                       detail=f"EST {host}:{est.port} MQTT {host}:{mqtt_port} broker pid {broker.pid}")
        announce(f"EST   https://{host}:{est.port}/.well-known/est/  (fleet {cfg.fleet}, {est.workers} "
                 "worker processes)")
        announce(f"MQTT  mqtts://{host}:{mqtt_port}  (mTLS: devices and service identities)")
        announce(f"CRL   https://{host}:{est.port}/crl/device.crl")
        announce(crl_line)
        announce(api_line)
        announce(f"admin {cfg.admin_socket}")
        announce("hub ready")
        # CRLs are for third parties (the broker decides from the registry): published off the request path,
        # so start-up and revocation cost nothing per revoked certificate. Short waits: a SIGTERM delivered to
        # another thread only runs its handler when the main thread wakes.
        live.crl.start(stop)
        while not stop.wait(0.5):
            pass
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
