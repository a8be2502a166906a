"""RabbitMQ's HTTP auth back end, decided from the registry and hub/authz/policy.py (no HTTP here: authserver.py).

RabbitMQ asks four questions (rabbitmq_auth_backend_http, POST form fields), each answered "allow"/"deny":
- user: `username` is the certificate's CN (ssl_cert_login). Any request carrying a `password` is a CONNECT
  with a username and password, which RabbitMQ puts before the certificate: refused, whoever it names, except the
  hub's own management user with its secret (tag administrator; it gets no vhost, so no MQTT/AMQP). Otherwise the
  principal must be active with a usable certificate (hub.authz.decide.by_name).
- vhost: the principal again (its status may have changed since connect); the MQTT client id, when RabbitMQ
  passes it, must be the principal.
- resource: only the MQTT plugin's own needs: the exchange amq.topic (write: publish, read: bind) and the
  principal's own subscription queues mqtt-subscription-<principal>qos0/qos1 (so a session can never be on
  another principal's client id).
- topic: the routing key turned back into an MQTT topic (RabbitMQ routes by the key, so that is what is decided):
  write = publish (`allows(grants, "publish", ...)`; RabbitMQ does not tell a retained PUBLISH apart, so retain
  rights are not separate here), read = subscribe, which also needs the filter covered by the receive rules
  (RabbitMQ cannot refuse single deliveries). `$share/...` is refused: 3.10 has no shared subscriptions.
Every refusal is logged once with the reason (names escaped); registry errors refuse.

The registry is read over a connection of the back end's own, per thread: on SQLite a read-only one on the file
(WAL readers never wait for the hub's writers); on PostgreSQL one from a small engine of its own (the hub's pool
serves its writers; a back end stuck behind them would stall every connect of the fleet). A connection that
failed is dropped, and the next question opens a fresh one.
"""

from __future__ import annotations

import hmac
import logging
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

from hub.authz.decide import Principal, by_name
from hub.authz.policy import allows, filter_covered, valid_filter
from hub.registry import sql as dbsql
from hub.registry.errors import RegistryError

from .config import EXCHANGE, VHOST

log = logging.getLogger("tessera.hub.broker.rabbitmq")

MGMT_USER = "tessera.mgmt"  # a '.' and no 'svc.' prefix: never a device id or a service principal


def amqp_to_mqtt(routing_key: str) -> str:
    """The MQTT topic (or filter) a routing key stands for (rabbitmq_mqtt: '/' <-> '.', '+' <-> '*')."""
    return routing_key.replace("*", "+").replace(".", "/")


def _safe(text: str | None) -> str:
    return (text or "-").encode("unicode_escape").decode("ascii")[:200]


class AuthBackend:
    """The decisions, over a read-only registry connection per thread."""

    def __init__(self, registry: Path | str, mgmt_secret: str, clock: Callable[[], datetime] | None = None,
                 connect_rate: int = 30, connect_burst: int = 10):
        """`registry`: the SQLite file, or the PostgreSQL URL, of the fleet's registry."""
        self._secret = mgmt_secret
        self._pg_url = str(registry) if dbsql.is_postgresql(registry) else None
        self.registry_path = None if self._pg_url else Path(registry)
        self._engine = dbsql.pg_engine(self._pg_url, pool_size=2) if self._pg_url else None
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self._local = threading.local()
        # connects per principal per minute, token bucket (fleet.toml [mqtt] connect_rate/connect_burst, as the
        # Mosquitto plugin's): principal -> (tokens, at)
        self.rate, self.burst = connect_rate / 60.0, float(connect_burst)
        self._buckets: dict[str, tuple[float, datetime]] = {}
        self._bucket_lock = threading.Lock()

    def _take_token(self, name: str) -> bool:
        now = self.clock()
        with self._bucket_lock:
            tokens, at = self._buckets.get(name, (self.burst, now))
            tokens = self._refilled(tokens, at, now)
            ok = tokens >= 1.0
            self._buckets[name] = (tokens - 1.0 if ok else tokens, now)
            if len(self._buckets) > 100_000:  # buckets full by now carry no state: forget them
                self._buckets = {k: v for k, v in self._buckets.items() if self._refilled(*v, now) < self.burst}
            return ok

    def _refilled(self, tokens: float, at: datetime, now: datetime) -> float:
        return min(self.burst, tokens + max(0.0, (now - at).total_seconds()) * self.rate)

    def _db(self) -> Any:
        db = getattr(self._local, "db", None)
        if db is None and self._engine is not None:
            db = dbsql.PgDb(dbsql.pg_connect(self._engine, self._pg_url))
            db.execute("SET default_transaction_read_only = on")
            self._local.db = db
        elif db is None:
            db = sqlite3.connect(f"file:{self.registry_path}?mode=ro", uri=True, check_same_thread=False)
            db.execute("PRAGMA busy_timeout = 2000")
            self._local.db = db
        return db

    def _principal(self, name: str) -> tuple[Principal | None, str | None]:
        try:
            return by_name(self._db(), name, self.clock())
        except (sqlite3.Error, RegistryError, *dbsql.driver_errors()) as exc:
            log.error("rabbitmq auth: registry error: %s", " ".join(str(exc).split())[:300])
            self._drop()
            return None, "registry unreadable"

    def _drop(self) -> None:
        db, self._local.db = getattr(self._local, "db", None), None
        try:
            if db is not None:
                db.close()
        except Exception:  # noqa: BLE001 - a broken connection may fail to close as well; it is gone either way
            pass

    def close(self) -> None:
        """This thread's connection and the PostgreSQL engine (the other threads' connections go with it)."""
        self._drop()
        if self._engine is not None:
            self._engine.dispose()

    def _deny(self, what: str, params: Mapping[str, str], reason: str) -> str:
        log.info("rabbitmq auth: refused %s user=%s client_id=%s: %s", what, _safe(params.get("username")),
                 _safe(_client_id(params)), reason)
        return f"deny {reason}"

    def user(self, params: Mapping[str, str]) -> str:
        name = params.get("username", "")
        if "password" in params:
            if name == MGMT_USER and self._secret and hmac.compare_digest(params["password"].encode(),
                                                                          self._secret.encode()):
                return "allow administrator"
            return self._deny("login", params, "password login refused (identity comes from the certificate)")
        if name == MGMT_USER:
            return self._deny("login", params, "management user without its secret")
        client_id = _client_id(params)
        if client_id is not None and client_id != name:
            return self._deny("login", params, "client id mismatch")
        principal, reason = self._principal(name)
        if principal is None:
            return self._deny("login", params, reason or "refused")
        return "allow" if self._take_token(name) else self._deny("login", params, "rate limited")

    def vhost(self, params: Mapping[str, str]) -> str:
        name = params.get("username", "")
        if params.get("vhost") != VHOST or name == MGMT_USER:
            return self._deny("vhost", params, "no such vhost for this user")
        client_id = _client_id(params)
        if client_id is not None and client_id != name:
            return self._deny("vhost", params, "client id mismatch")
        principal, reason = self._principal(name)
        return "allow" if principal else self._deny("vhost", params, reason or "refused")

    def resource(self, params: Mapping[str, str]) -> str:
        name, kind, res = params.get("username", ""), params.get("resource"), params.get("name", "")
        if params.get("vhost") != VHOST or name == MGMT_USER:
            return self._deny("resource", params, "no such vhost for this user")
        if kind == "exchange" and res == EXCHANGE and params.get("permission") in ("read", "write"):
            ok = True
        elif kind == "queue":
            ok = res in (f"mqtt-subscription-{name}qos0", f"mqtt-subscription-{name}qos1")
        else:
            ok = False
        if not ok:
            return self._deny("resource", params, f"{kind} {_safe(res)} {params.get('permission')} not allowed")
        principal, reason = self._principal(name)
        return "allow" if principal else self._deny("resource", params, reason or "refused")

    def topic(self, params: Mapping[str, str]) -> str:
        name, perm = params.get("username", ""), params.get("permission")
        client_id = _client_id(params)
        if params.get("vhost") != VHOST or params.get("name") != EXCHANGE or name == MGMT_USER:
            return self._deny("topic", params, "not the MQTT exchange")
        if client_id is not None and client_id != name:
            return self._deny("topic", params, "client id mismatch")
        principal, reason = self._principal(name)
        if principal is None:
            return self._deny("topic", params, reason or "refused")
        topic = amqp_to_mqtt(params.get("routing_key", ""))
        if perm == "write":
            ok = allows(principal.grants, "publish", topic)
        elif perm == "read":
            ok = (not topic.startswith("$share/") and valid_filter(topic)
                  and allows(principal.grants, "subscribe", topic)
                  and any(filter_covered(p, topic) for p in principal.grants.receive))
        else:
            ok = False
        return "allow" if ok else self._deny("topic", params, f"{perm} {_safe(topic)} not allowed")

    def answer(self, path: str, params: Mapping[str, str]) -> str:
        handler = {"user": self.user, "vhost": self.vhost, "resource": self.resource, "topic": self.topic}.get(path)
        return handler(params) if handler else "deny"


def _client_id(params: Mapping[str, str]) -> str | None:
    """The MQTT client id RabbitMQ passes: `client_id` (user_path, vhost_path) or `variable_map.client_id`
    (topic_path); every handler reads both, so none can be passed the one it does not look at."""
    return params.get("client_id", params.get("variable_map.client_id"))
