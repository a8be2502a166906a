"""`tessera-agent run`: the device's MQTT session — mTLS with the token key, spool, telemetry, commands, renewal.

One thread runs everything (paho's network loop included), so there is no locking between the parts:
- every QoS 1 message (telemetry, command acks) goes to the SQLite spool first and is deleted only on PUBACK;
  a new connection re-sends what is still there (at-least-once, nothing lost across outages or kill -9);
- reconnects back off exponentially with full jitter; a revoked or expired certificate is recognised from the
  TLS alert, reported in status.json and retried only slowly;
- a CONNACK refusal (0x87 for every reason) is explained by the hub (GET /tessera/v1/credential): `refusal_decision`;
- MQTT 5 first; a broker refusing it (RabbitMQ: 3.1.1 only) gets MQTT 3.1.1 at once, remembered (agent.mqttproto);
- commands run only live and from a commander (agent.commands); `renew` commands are rate limited (agent.renewal);
- at 2/3 of the certificate lifetime (agent.renewal.decide) the agent re-enrolls over mTLS and reconnects with
  the new certificate; a certificate stored by another process (`tessera-agent renew` from a shell) is noticed
  within a second and switched to the same way (agent.sessionrenew); the spool carries the messages across.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from datetime import datetime, timezone
from typing import Callable

import paho.mqtt.client as mqtt

from hsm.errors import KeyNotFound, ModuleNotFound, PinError, TlsRouteError, TokenNotFound

from .backoff import SLOW_CAP, Backoff
from .certwatch import FileWatch
from .commands import CommandHandler, builtin_handlers, command_refusal
from .config import AgentConfig
from .estclient import EstClient
from .mqttproto import V5, V311, after_success, broker_key, choose, forget_memory, load_memory, save_memory, v5_refused
from .refusals import (AUTH_REFUSALS, REFUSED_CAP, SUSPENDED_CAP, Refusal, classify_tls_error,  # noqa: F401
                       refusal_decision)
from .sessionrenew import KeyReload, RenewalMixin
from .spool import Spool
from .state import CERT, IDENTITY, ROOT, SPOOL, StateError, load_identity, write_status
from .telemetry import envelope, make_source

log = logging.getLogger("tessera.agent")

WINDOW = 100            # QoS 1 messages handed to paho at once
CONNECT_TIMEOUT = 15.0
STATUS_EVERY = 5.0
IDLE_WAIT = 0.25        # seconds an idle session waits on its socket per loop turn (busy: 50 ms)
CREDENTIAL_TIMEOUT = 5.0
#: errors building the TLS context that no retry can cure (a PIN file 0644, a wrong PIN, no module, token or key):
#: `run` stops with the error (exit 1) instead of retrying forever
CONFIG_ERRORS = (PinError, ModuleNotFound, TokenNotFound, KeyNotFound, TlsRouteError)


class Agent(RenewalMixin):
    def __init__(self, cfg: AgentConfig, clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 monotonic: Callable[[], float] = time.monotonic, resume: dict | None = None):
        self.cfg, self.clock, self.monotonic = cfg, clock, monotonic
        self.state = cfg.state
        ident = load_identity(self.state)
        if ident is None:
            raise StateError("this device is not enrolled; run `tessera-agent enroll` first")
        self.ident = ident
        self.device = ident.device_id
        self.topics = {k: f"devices/{self.device}/{k}" for k in ("status", "telemetry", "events", "commands")}
        self.topics["ack"] = f"devices/{self.device}/commands/ack"
        self.spool = Spool(self.state / SPOOL, max_messages=cfg.spool.max_messages,
                           drop_policy=cfg.spool.drop_policy)
        self.stop_event = threading.Event()
        self.backoff = Backoff()
        self.source = make_source(cfg.telemetry.source)
        handlers = builtin_handlers(report=self.report, renew=self._request_renewal)
        handlers["renew"] = self._request_renewal  # accepts {"rotate_key": true}
        self.commands = CommandHandler(handlers)
        self.status: dict = {"device_id": self.device, "state": "starting", "pid": os.getpid(), "last_error": ""}
        self._ctx = None
        self._client: mqtt.Client | None = None
        self._connected = False
        self._handed: dict[int, int] = {}   # paho mid -> spool row id
        self._acked: list[int] = []         # spool rows PUBACKed since the last loop turn
        self._cursor = 0
        self._spool_dirty = True  # the spool may hold messages not handed to paho yet
        self._seq = 0
        self._renew_requested: str | None = None   # None, "renew" or "rotate"
        self._renew_command_at: float | None = None  # monotonic time of the last accepted `renew` command
        self._connack: int | None = None            # the refusal code of the last CONNACK, if it was one
        self.protocol = V5                           # the MQTT protocol of the current (or last) connection
        self._handshake_done = self._no_connack = False  # how the last attempt ended (agent.mqttproto.v5_refused)
        self._last_log = ""
        self.connected_at: float | None = None
        self._identity_watch = FileWatch(self.state / IDENTITY, monotonic=monotonic)  # renewals by other processes
        self._resume(resume)  # handed over by this process' previous image (agent.sessionrenew)

    # --- status -------------------------------------------------------------------------------------------------
    def _set_state(self, state: str, error: str = "") -> None:
        if state != self.status.get("state"):
            log.info("state: %s%s", state, f" ({error})" if error else "")
            self.status["since"] = self.clock().isoformat()
        self.status["state"] = state
        if error or state == "online":
            self.status["last_error"] = error
        self._write_status()

    def _write_status(self) -> None:
        self.status.update(updated=self.clock().isoformat(), cert_serial=self.ident.serial,
                           cert_not_after=self.ident.not_after, key_uri=self.ident.key_uri,
                           spool_depth=self.spool.depth(), broker=f"{self.cfg.broker_host}:{self.cfg.mqtt_port}",
                           telemetry_seq=self._seq,  # the last telemetry seq spooled (this process counts from 1)
                           mqtt_protocol=self.protocol)
        try:
            write_status(self.state, self.status)
        except OSError as exc:
            log.warning("cannot write status: %s", exc)

    def report(self) -> dict:
        return {"device": self.device, "state": self.status.get("state"), "cert_not_after": self.ident.not_after,
                "spool": self.spool.stats(time.time()), "pid": os.getpid()}

    # --- connection ---------------------------------------------------------------------------------------------------
    def _context(self):
        if self._ctx is None:
            from hsm.tls import client_context

            self._ctx = self._key_context(lambda: client_context(self.state / ROOT, self.state / CERT,
                                                                 self.ident.key_uri, self.cfg.token_config))
        return self._ctx

    def _new_client(self, protocol: str = V5) -> mqtt.Client:
        # 3.1.1: a clean session, as the MQTT 5 one (no session expiry: it ends at disconnect; commands are live only)
        c = (mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.device, protocol=mqtt.MQTTv5)
             if protocol == V5 else
             mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.device, protocol=mqtt.MQTTv311,
                         clean_session=True))
        c.will_set(self.topics["status"], json.dumps({"state": "offline"}), qos=1, retain=True)
        c.tls_set_context(self._context())
        c.max_inflight_messages_set(WINDOW)
        c.on_connect, c.on_disconnect = self._on_connect, self._on_disconnect
        c.on_publish, c.on_message, c.on_log = self._on_publish, self._on_message, self._on_log
        return c

    def _on_log(self, client, userdata, level, buf) -> None:
        if level <= mqtt.MQTT_LOG_ERR or "SSL" in buf or "certificate" in buf:
            self._last_log = buf

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._connack = reason_code.value
            self._last_log = f"broker refused the connection: {reason_code}"
            return
        self._connected = True
        self.connected_at = self.monotonic()
        client.subscribe(self.topics["commands"], qos=1)
        client.publish(self.topics["status"], json.dumps({"state": "online", "pid": os.getpid()}), qos=1,
                       retain=True)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected = False

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        row = self._handed.pop(mid, None)
        if row is None:
            return
        if reason_code.is_failure:
            log.error("broker refused a message (%s); dropping it from the spool", reason_code)
        self._acked.append(row)

    def _on_message(self, client, userdata, msg) -> None:
        if msg.topic != self.topics["commands"]:
            return
        refused = command_refusal(msg.retain, getattr(msg.properties, "UserProperty", None), self.protocol)
        if refused:
            log.warning("ignoring a message on %s: %s", msg.topic, refused)
            return
        ack = self.commands.handle(msg.payload, self.clock())
        self.spool.put(self.topics["ack"], ack, qos=1, retain=False, now=time.time())
        self._spool_dirty = True

    def _connect(self) -> mqtt.Client:
        """Connect with the protocol agent.mqttproto chooses; with `auto`, an MQTT 5 attempt the broker refuses as a
        protocol is followed at once by MQTT 3.1.1, and that choice recorded for this broker address."""
        setting, broker = self.cfg.mqtt.protocol, broker_key(self.cfg.broker_host, self.cfg.mqtt_port)
        memory = load_memory(self.state)
        self.protocol = proto = choose(setting, memory, broker, self.clock())
        fell_back = False
        try:
            client = self._connect_with(proto)
        except ConnectionError as exc:
            if not (setting == "auto" and proto == V5 and v5_refused(self._connack, self._handshake_done,
                                                                      self._no_connack,
                                                                      classify_tls_error(self._last_log))):
                raise
            log.warning("the broker at %s refused MQTT 5 (%s); connecting with MQTT 3.1.1", broker, exc)
            self.protocol, fell_back = V311, True
            client = self._connect_with(V311)
        try:
            action = after_success(setting, self.protocol, fell_back, memory)
            if action == "save":
                save_memory(self.state, broker, V311, self.clock())
            elif action == "forget":
                forget_memory(self.state)
        except OSError as exc:  # only costs a refused MQTT 5 attempt at the next start
            log.warning("cannot record the MQTT protocol for %s: %s", broker, exc)
        return client

    def _connect_with(self, protocol: str) -> mqtt.Client:
        client = self._new_client(protocol)
        self._connected, self._last_log, self._connack = False, "", None
        self._handshake_done = self._no_connack = False
        self._handed.clear()
        self._cursor = 0
        self._spool_dirty = True  # a new session: everything still in the spool goes out again
        client.connect(self.cfg.broker_host, self.cfg.mqtt_port, keepalive=30)  # TCP and the TLS handshake
        self._handshake_done = True
        deadline = self.monotonic() + CONNECT_TIMEOUT
        while not self._connected and self.monotonic() < deadline and not self.stop_event.is_set():
            try:
                rc = client.loop(timeout=0.05)
            except ValueError as exc:  # a CONNACK paho cannot read as MQTT 5 (a 3.1.1 return code such as 1)
                self._no_connack = True
                raise ConnectionError(f"unreadable CONNACK ({exc})") from None
            if rc != mqtt.MQTT_ERR_SUCCESS:
                self._no_connack = self._connack is None
                raise ConnectionError(self._last_log or f"connection lost ({mqtt.error_string(rc)})")
        if not self._connected:
            client.disconnect()
            raise ConnectionError(self._last_log or "no CONNACK from the broker")
        return client

    # --- main loop --------------------------------------------------------------------------------------------------
    def _pump(self, client: mqtt.Client) -> None:
        if self._acked:  # one transaction for every PUBACK of this loop turn
            self.spool.ack_many(self._acked)
            self._acked = []
        room = WINDOW - len(self._handed)
        if room <= 0 or not self._spool_dirty:  # nothing new since the spool last had less than a window
            return
        pending = self.spool.pending(room, after_id=self._cursor)
        self._spool_dirty = len(pending) >= room  # a full window: there may be more behind it
        for m in pending:
            info = client.publish(m.topic, m.payload, qos=m.qos, retain=m.retain)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                self._spool_dirty = True
                break
            self._cursor = m.id
            if m.qos == 0:
                self.spool.ack(m.id)
            else:
                self._handed[info.mid] = m.id

    def _telemetry(self) -> None:
        self._seq += 1
        try:
            readings = self.source()
        except Exception as exc:
            readings = {"error": str(exc)[:200]}
        self.spool.put(self.topics["telemetry"], envelope(self.device, readings, self.clock(), self._seq),
                       qos=1, retain=False, now=time.time())
        self._spool_dirty = True

    def run(self, max_seconds: float | None = None) -> int:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop_event.set())
        started = self.monotonic()
        self._next_renew_try = 0.0
        next_telemetry = self.monotonic()
        while not self.stop_event.is_set():
            if max_seconds is not None and self.monotonic() - started > max_seconds:
                break
            if self.clock() >= datetime.fromisoformat(self.ident.not_after):
                self._set_state("expired", "certificate expired: get a new enrollment token from the fleet manager "
                                           "and run `tessera-agent enroll` again")
                self._wait_or_renewed(Backoff.slow().next())
                continue
            self._renewed_elsewhere(now=True)  # e.g. renewed by hand while this agent waited to reconnect
            self._set_state("connecting")
            try:
                client = self._connect()
            except CONFIG_ERRORS as exc:
                self._set_state("failed", f"configuration error: {exc}")
                self.spool.close()
                raise
            except KeyReload as exc:
                return self._stop_for_restart(exc)
            except Exception as exc:
                self._retry_after("connect failed", str(exc) or exc.__class__.__name__)
                continue
            self.backoff.reset()
            self._slow = self._capped = None
            self.status["session_serial"] = self.ident.serial  # the certificate this session authenticated with
            self._set_state("online")
            last_status = self.monotonic()
            switch = False
            while self._connected and not self.stop_event.is_set() and not switch:
                # idle (nothing to send): wait on the socket up to IDLE_WAIT, not 50 ms, so 200 idle agents on a
                # gateway do not wake 20 times a second each; a command or PUBACK still wakes it at once
                idle = not self._spool_dirty and not self._acked
                client.loop(timeout=max(0.0, min(IDLE_WAIT, next_telemetry - self.monotonic())) if idle else 0.05)
                now = self.monotonic()
                if now >= next_telemetry:
                    self._telemetry()
                    next_telemetry = now + self.cfg.telemetry.interval
                self._pump(client)
                if (self._renew_requested or now >= self._next_renew_try) and (mode := self._renewal_due()):
                    switch = self._renew(mode)
                switch = switch or self._renewed_elsewhere()
                if now - last_status >= STATUS_EVERY:
                    self._write_status()
                    last_status = now
                if max_seconds is not None and now - started > max_seconds:
                    break
            if self._connected:
                if not switch:  # a clean stop: say so, the will is for crashes
                    client.publish(self.topics["status"], json.dumps({"state": "offline"}), qos=1, retain=True)
                    for _ in range(20):
                        client.loop(timeout=0.05)
                client.disconnect()
                client.loop(timeout=0.1)
            elif not self.stop_event.is_set():
                self._retry_after("disconnected", self._last_log or "connection lost")
        if self._acked:  # PUBACKs that arrived while closing
            self.spool.ack_many(self._acked)
            self._acked = []
        self._set_state("stopped")
        self.spool.close()
        return 0

    # --- after a failed or lost connection -----------------------------------------------------------------------
    def _retry_after(self, what: str, text: str) -> None:
        """Set the state this failure means and wait its backoff (SIGTERM ends the wait). A CONNACK refusal is
        explained by the hub, asked once per failed attempt."""
        refusal = refusal_decision(self._connack, self._ask_hub()) if self._connack in AUTH_REFUSALS else None
        kind = classify_tls_error(text)
        if refusal is not None:
            self._set_state(refusal.state, f"the hub refuses this device's certificate ({text}): {refusal.hint}")
            delay = self._refusal_backoff(refusal.cap).next()
        elif kind is not None:
            self._set_state(kind, f"the hub refuses this device's certificate ({text})")
            delay = self.slow_backoff().next()
        else:
            self._set_state("offline", text)
            delay = self.backoff.next()
        log.warning("%s: %s; retrying in %.1f s", what, text, delay)
        self.stop_event.wait(delay)

    def _ask_hub(self) -> str | None:
        """The hub's status of our certificate (GET /tessera/v1/credential, mTLS as for renewal); None if unknown."""
        if self.stop_event.is_set():
            return None
        try:
            cred = EstClient(self.cfg.hub_url, str(self.state / ROOT), context=self._context(),
                             timeout=CREDENTIAL_TIMEOUT).credential()
        except Exception as exc:  # hub down, refusing, TLS or token trouble: the refusal stays unexplained
            log.warning("cannot ask the hub why the broker refused us: %s", exc)
            return None
        if cred.device not in (None, self.device):
            log.warning("the hub answered for device %r, not %r", cred.device[:64], self.device)
            return "unknown"
        log.debug("the hub says this device's certificate is %s", cred.status)
        return cred.status

    _slow: Backoff | None = None
    _capped: Backoff | None = None

    def slow_backoff(self) -> Backoff:
        if self._slow is None:
            self._slow = Backoff.slow()
        return self._slow

    def _refusal_backoff(self, cap: float) -> Backoff:
        """The slow backoff for the slow cap, else full jitter from 0.5 s capped at `cap` (kept while cap holds)."""
        if cap >= SLOW_CAP:
            return self.slow_backoff()
        if self._capped is None or self._capped.cap != cap:
            self._capped = Backoff(cap=cap)
        return self._capped
