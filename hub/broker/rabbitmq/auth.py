"""RabbitMQ's HTTP auth back end, decided from the registry and hub/authz/policy.py (no HTTP here: authserver.py).

RabbitMQ asks four questions (rabbitmq_auth_backend_http, POST form fields), each answered "allow"/"deny":
- user: `username` is the certificate's credential URI (ssl_cert_login from the first URI subjectAltName:
  hub/ca/credential.py, the issuing CA and the serial). Any request carrying a `password` is a CONNECT with a
  username and password, which RabbitMQ puts before the certificate: refused, whoever it names, except the hub's
  own management user with its secret (tag administrator; it gets no vhost, so no MQTT/AMQP). Otherwise the
  decision is the Mosquitto plugin's for that certificate (hub.authz.decide.by_credential: unknown, superseded,
  revoked, held, expired refused; the client id must be the principal). A login on the principal's current
  certificate ends the grace of its superseded ones (`on_active`: the plugin's "once the new one connected").
- vhost: the credential again (its status may have changed since connect); the MQTT client id, when RabbitMQ
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
import re
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

from hub.authz.decide import Principal, by_credential, by_name, superseded_in_grace
from hub.ca.credential import parse_credential
from hub.authz.policy import allows, client_id_allowed, filter_covered, valid_filter
from hub.registry import sql as dbsql
from hub.registry.errors import RegistryError

from .config import EXCHANGE, VHOST

log = logging.getLogger("tessera.hub.broker.rabbitmq")

_QUEUE_RE = re.compile(r"mqtt-subscription-(.+)qos[01]")
MGMT_USER = "tessera.mgmt"  # a '.' and no 'svc.' prefix: never a device id or a service principal


def amqp_to_mqtt(routing_key: str) -> str:
    """The MQTT topic (or filter) a routing key stands for (rabbitmq_mqtt: '/' <-> '.', '+' <-> '*')."""
    return routing_key.replace("*", "+").replace(".", "/")


def _safe(text: str | None) -> str:
    return (text or "-").encode("unicode_escape").decode("ascii")[:200]


class AuthBackend:
    """The decisions, over a read-only registry connection per thread."""

    def __init__(self, registry: Path | str, mgmt_secret: str, clock: Callable[[], datetime] | None = None,
                 connect_rate: int = 30, connect_burst: int = 10, on_active: Callable[[str], None] | None = None):
        """`registry`: the SQLite file, or the PostgreSQL URL, of the fleet's registry. `on_active(principal)`:
        called when a principal with a superseded certificate still in its grace logs in with its current one."""
        self.on_active = on_active
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

    def _deny(self, what: str, params: Mapping[str, str], reason: str, principal: str | None = None) -> str:
        """Log the refusal once (the user name is the credential URI; `principal`: whose it is, if known)."""
        log.info("rabbitmq auth: refused %s user=%s principal=%s client_id=%s: %s", what,
                 _safe(params.get("username")), _safe(principal), _safe(_client_id(params)), reason)
        return f"deny {reason}"

    def _credential(self, what: str, params: Mapping[str, str]) -> tuple[Principal | None, str | None, Mapping | None]:
        """(principal, None, row) for the credential the username names, or (None, the deny answer, row)."""
        name = params.get("username", "")
        cred = parse_credential(name)
        if cred is None:
            return None, self._deny(what, params, "the certificate carries no Tessera credential URI (issued before "
                                    "this release: renew it)"), None
        try:
            principal, reason, row = by_credential(self._db(), *cred, _client_id(params), self.clock())
        except (sqlite3.Error, RegistryError, *dbsql.driver_errors()) as exc:
            log.error("rabbitmq auth: registry error: %s", " ".join(str(exc).split())[:300])
            self._drop()
            return None, self._deny(what, params, "registry unreadable"), None
        if principal is None:
            return None, self._deny(what, params, reason or "refused", row["principal"] if row else None), row
        return principal, None, row

    def user(self, params: Mapping[str, str]) -> str:
        name = params.get("username", "")
        if "password" in params:
            if name == MGMT_USER and self._secret and hmac.compare_digest(params["password"].encode(),
                                                                          self._secret.encode()):
                return "allow administrator"
            return self._deny("login", params, "password login refused (identity comes from the certificate)")
        if name == MGMT_USER:
            return self._deny("login", params, "management user without its secret")
        principal, denied, row = self._credential("login", params)
        if principal is None:
            return denied or "deny"
        if not self._take_token(principal.name):
            return self._deny("login", params, "rate limited", principal.name)
        if row is not None and row["cert_status"] == "active":
            self._first_active(principal.name)
        return "allow"

    def _first_active(self, principal: str) -> None:
        """A session on the principal's current certificate: a superseded one still in its grace is done with
        (the Mosquitto plugin's rule, here for the whole cluster: `on_active` ends that grace in the registry)."""
        if self.on_active is None:
            return
        try:
            rows = superseded_in_grace(self._db(), principal, self.clock())
        except (sqlite3.Error, RegistryError, *dbsql.driver_errors()) as exc:
            log.error("rabbitmq auth: registry error: %s", " ".join(str(exc).split())[:300])
            self._drop()
            return
        if rows:
            self.on_active(principal)

    def vhost(self, params: Mapping[str, str]) -> str:
        name = params.get("username", "")
        if params.get("vhost") != VHOST or name == MGMT_USER:
            return self._deny("vhost", params, "no such vhost for this user")
        principal, denied, _ = self._credential("vhost", params)
        return "allow" if principal else (denied or "deny")

    def resource(self, params: Mapping[str, str]) -> str:
        name, kind, res = params.get("username", ""), params.get("resource"), params.get("name", "")
        if params.get("vhost") != VHOST or name == MGMT_USER:
            return self._deny("resource", params, "no such vhost for this user")
        principal, denied, _ = self._credential("resource", params)
        if principal is None:
            return denied or "deny"
        if kind == "exchange" and res == EXCHANGE and params.get("permission") in ("read", "write"):
            ok = True
        elif kind == "queue":  # the MQTT plugin's queues of the session's client id
            m = _QUEUE_RE.fullmatch(res)
            ok = m is not None and client_id_allowed(principal.name, m.group(1))
        else:
            ok = False
        if not ok:
            return self._deny("resource", params, f"{kind} {_safe(res)} {params.get('permission')} not allowed",
                              principal.name)
        return "allow"

    def topic(self, params: Mapping[str, str]) -> str:
        name, perm = params.get("username", ""), params.get("permission")
        if params.get("vhost") != VHOST or params.get("name") != EXCHANGE or name == MGMT_USER:
            return self._deny("topic", params, "not the MQTT exchange")
        principal, denied, _ = self._credential("topic", params)
        if principal is None:
            return denied or "deny"
        topic = amqp_to_mqtt(params.get("routing_key", ""))
        if perm == "write":
            ok = allows(principal.grants, "publish", topic)
        elif perm == "read":
            ok = (not topic.startswith("$share/") and valid_filter(topic)
                  and allows(principal.grants, "subscribe", topic)
                  and any(filter_covered(p, topic) for p in principal.grants.receive))
        else:
            ok = False
        return "allow" if ok else self._deny("topic", params, f"{perm} {_safe(topic)} not allowed", principal.name)

    def answer(self, path: str, params: Mapping[str, str]) -> str:
        handler = {"user": self.user, "vhost": self.vhost, "resource": self.resource, "topic": self.topic}.get(path)
        return handler(params) if handler else "deny"


def _client_id(params: Mapping[str, str]) -> str | None:
    """The MQTT client id RabbitMQ passes: `client_id` (user_path, vhost_path) or `variable_map.client_id`
    (topic_path); every handler reads both, so none can be passed the one it does not look at."""
    return params.get("client_id", params.get("variable_map.client_id"))
