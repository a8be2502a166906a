"""The RabbitMQ driver: the hub drives a RabbitMQ cluster it is pointed at (it does not run the nodes).

What the hub does for the cluster:
- renders each node's configuration (config.py: mTLS MQTT listener, ssl_cert_login from the CN, the hub's HTTP
  auth back end as the only back end, no password users, no auth cache, a CRL hash directory);
- serves that auth back end (authserver.py over auth.py: the registry and hub/authz/policy.py, the same data the
  Mosquitto plugin enforces) and keeps the listener's CRLs (crl.py: revoked, held and spent superseded
  certificates, which the back end cannot see: it is told a name, never a serial);
- follows authz_events (every FOLLOW_EVERY s, and at once on `sync()`): a principal that is refused now, or whose
  rights changed (groups, role, re-enrolment), has its connections closed by user name through the management
  API, which closes them on every node (RabbitMQ caches a session's topic rights, so a kick is how a change
  bites); user names are credential URIs (hub/ca/credential.py), one per certificate, so a kick names each of the
  principal's certificates, and a superseded certificate whose grace ended (at grace_until, or once the current
  one logged in: `end_grace`) gets into the CRL and only its own sessions are closed.
Secrets (0600 files in the broker directory): the auth path segment RabbitMQ presents and the management
user's password. Differences from Mosquitto (MQTT 3.1.1 only, no sender stamping, retained messages per node,
receive rules enforced at subscribe time): docs in README "RabbitMQ".
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

from hsm.secretfile import PrivateFileError, read_private_file
from hsm.softhsm import write_secret
from hub.authz.decide import credentials_of
from hub.authz.policy import HUB_PRINCIPAL, SERVICE_PREFIX
from hub.ca.credential import credential_uri
from hub.ca.authority import FleetCA
from hub.registry import sql as dbsql
from hub.registry.errors import RegistryError
from hub.registry.store import Registry, _ts

from .. import BrokerDriver, BrokerError, SyncResult
from ..eventcursor import EventCursor
from . import authserver
from .auth import AuthBackend
from .config import DEFAULT_MAX_PAYLOAD, ClusterTls, Node, write_node_files
from .crl import CrlDir
from .mgmt import Mgmt, MgmtError

log = logging.getLogger("tessera.hub.broker.rabbitmq")

FOLLOW_EVERY = 0.2  # seconds between reads of authz_events (and checks for ended graces)
#: authz event reasons after which a live session's cached rights are stale (it is kicked and reconnects)
RIGHTS_CHANGED = ("groups changed", "re-enrolled", "re-provisioned")
#: After a role change every connection is closed; the management API lists a connection only after its stats
#: interval (5 s), so this much later the ones opened before the change that the first pass missed are closed too.
ROLE_RECHECK = 6.0
#: The authz event of end_grace: the principal's superseded certificates are closed, its current one stays
GRACE_ENDED = "superseded grace ended"
SECRET_MIN = 32  # characters of a broker secret (read_secret writes 48 hex digits)


#: What the follower looks up 5 times a second, as index searches at any fleet size (the same text on SQLite and
#: PostgreSQL): superseded certificates by the end of their grace (current ones by expiry: the API schema's
#: certificates_active_expiry).
SCHEMA = ("""CREATE INDEX IF NOT EXISTS certificates_superseded_grace ON certificates(grace_until)
    WHERE status = 'superseded'""",)


def apply_schema(registry: Registry) -> None:
    with registry.write() as db:
        for statement in SCHEMA:
            db.execute(statement)


def read_secret(path: Path) -> str:
    """The secret in `path` (0600), made if missing: random, written whole to a temp file and renamed, so a crash
    never leaves an empty secret behind. A wider mode, or a file holding less than a whole secret (an empty
    secret would let anyone log in as the management user), is refused."""
    if not path.exists():
        tmp = path.with_name(f".{path.name}.tmp")
        write_secret(tmp, secrets.token_hex(24))
        os.replace(tmp, path)
    try:
        text = read_private_file(path, "the broker secret").decode("ascii", "replace").strip()
    except PrivateFileError as exc:
        raise BrokerError(str(exc)) from None
    if len(text) < SECRET_MIN:
        raise BrokerError(f"{path} holds no whole secret ({len(text)} characters, at least {SECRET_MIN}): remove "
                          "it and start again to make a new one")
    return text


class RabbitMQBroker(BrokerDriver):
    mqtt_protocol = "3.1.1"  # the MQTT plugin of RabbitMQ 3.10 (the hub's own client speaks it too)

    def __init__(self, broker_dir: Path, registry: Registry, ca: FleetCA, mgmt_urls: Sequence[str],
                 cafile: Path, certfile: Path, keyfile: Path, device_ca: Path, service_ca: Path,
                 auth_port: int, auth_host: str = "127.0.0.1", connect_rate: int = 30, connect_burst: int = 10,
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 on_event: Callable[[str, str], None] = lambda kind, detail: None,
                 max_payload: int = DEFAULT_MAX_PAYLOAD):
        self.dir = broker_dir / "rabbitmq"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.registry, self.clock, self.on_event = registry, clock, on_event
        self.auth_host, self.auth_port, self.max_payload = auth_host, auth_port, max_payload
        self.tls = ClusterTls(cafile, certfile, keyfile, self.dir / "crl")
        self.auth_secret = read_secret(self.dir / "auth.secret")
        self.mgmt_secret = read_secret(self.dir / "mgmt.secret")
        self.mgmt = Mgmt(mgmt_urls, self.mgmt_secret)
        self.crls = CrlDir(ca, self.tls.crl_dir, device_ca, service_ca)
        self.backend = AuthBackend(registry.url or registry.path, self.mgmt_secret, clock, connect_rate, connect_burst,
                                   on_active=self._on_active)
        self._server = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.cursor = EventCursor()  # the authz_events applied; from the newest at start()
        self._kick_log: list[tuple[int, int]] = []  # (seq, kicked) of recent passes
        self._grace_seen = ""
        self._role_pass: tuple[float, float, set[str]] | None = None  # (due, change time in epoch ms, kicked)

    @classmethod
    def for_hub(cls, cfg, registry: Registry, ca: FleetCA, **kwargs) -> "RabbitMQBroker":
        """The driver of the hub directory `cfg` (hub.config.HubConfig): its TLS files, CAs, auth port, limits."""
        return cls(cfg.broker_dir, registry, ca, cfg.rabbitmq_management or ["http://127.0.0.1:15672"],
                   cafile=cfg.ca_dir / "device-chain.pem", certfile=cfg.tls_dir / "est.pem",
                   keyfile=cfg.tls_dir / "est.key", device_ca=cfg.ca_dir / "device-ca.pem",
                   service_ca=cfg.ca_dir / "service-ca.pem", auth_port=cfg.rabbitmq_auth_port,
                   connect_rate=cfg.connect_rate, connect_burst=cfg.connect_burst, max_payload=cfg.max_payload,
                   **kwargs)

    @property
    def seq(self) -> int:
        """The newest authz event applied."""
        return self.cursor.seq

    @property
    def auth_base(self) -> str:
        return f"http://{self.auth_host}:{self.auth_port}/{self.auth_secret}"

    def render(self, out: Path, nodes: Sequence[Node]) -> list[Path]:
        """Write every node's configuration into out/<node name>/ (0600 files); returns the node directories."""
        self.crls.write(self.registry, self.clock(), force=True)
        dirs = []
        for node in nodes:
            write_node_files(out / node.name, node, self.tls, self.auth_base, self.max_payload)
            dirs.append(out / node.name)
        return dirs

    # --- lifecycle --------------------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        apply_schema(self.registry)
        self.crls.write(self.registry, self.clock(), force=True)
        try:
            self._server = authserver.start(self.backend, self.auth_secret, self.auth_host, self.auth_port)
        except OSError as exc:
            raise BrokerError(f"cannot listen for RabbitMQ's auth requests on {self.auth_host}:{self.auth_port}: "
                              f"{exc.strerror or exc}") from None
        self.cursor = EventCursor(self._max_seq())
        self._grace_seen = _ts(self.clock())
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"no RabbitMQ management API answered within {timeout:.0f} s "
                                  f"({', '.join(self.mgmt.urls)})")
            time.sleep(0.2)
        self._stop.clear()
        self._thread = threading.Thread(target=self._follow, name="rabbitmq-follow", daemon=True)
        self._thread.start()
        self.on_event("broker.started", f"RabbitMQ cluster {', '.join(self.mgmt.urls)}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._server is not None:
            self._server()
            self._server = None
        self.backend.close()

    def attach_admin(self, admin) -> None:
        """The hub's MQTT session is not this driver's doorbell: kicks go through the management API."""

    def healthy(self) -> bool:
        return any(self.mgmt.healthy(url) for url in self.mgmt.urls)

    @property
    def pid(self) -> str:  # serve's "hub ready" line names the broker
        return "rabbitmq"

    # --- following the registry -------------------------------------------------------------------------------
    def _max_seq(self) -> int:
        return int(self.registry.query("SELECT COALESCE(MAX(seq), 0) AS s FROM authz_events")[0]["s"])

    def _follow(self) -> None:
        while not self._stop.wait(FOLLOW_EVERY):
            try:
                self._apply()
            except (MgmtError, RegistryError, OSError, *dbsql.driver_errors()) as exc:
                log.warning("rabbitmq: applying authz events failed (retrying): %s", exc)

    def _apply(self) -> int:
        """Apply events newer than self.seq and graces that ended; returns the sessions kicked."""
        with self._lock:
            now = self.clock()
            events = sorted((e for sql, params in self.cursor.queries("seq, principal, reason")
                             for e in self.registry.query(sql, params)), key=lambda e: e["seq"])
            ended, graces_to = self._ended_graces(now)
            late = self._late_role_pass()
            if not events and not ended and not late:
                if self.crls.due(now):  # nothing changed for REFRESH: renew the CRLs before their nextUpdate
                    self.crls.write(self.registry, now)
                self._grace_seen = graces_to
                self.cursor.advance((), time.monotonic())  # gaps that waited long enough are forgotten
                return 0
            self.crls.write(self.registry, now)
            # RabbitMQ's user names are credential URIs (hub/ca/credential.py): kicks name certificates
            targets: dict[str, str] = {**ended, **late}  # credential URI -> principal ("-": not looked up)
            everyone = False
            for ev in events:
                if ev["principal"] is None:
                    everyone = True
                    continue
                admitted, _ = self.backend._principal(ev["principal"])  # unreadable: None, kicked (fail closed)
                if admitted is None or ev["reason"] in RIGHTS_CHANGED:
                    targets.update(self._credentials(ev["principal"]))
                elif ev["reason"] == GRACE_ENDED:
                    targets.update(self._credentials(ev["principal"], superseded_only=True))
            if everyone:
                everyone_now = self.mgmt.connected_users() - set(self._credentials(HUB_PRINCIPAL))
                targets.update(dict.fromkeys(everyone_now, "-"))
                self._role_pass = (time.monotonic() + ROLE_RECHECK, time.time() * 1000, everyone_now)
            kicked = 0
            for name in sorted(targets):
                n = self.mgmt.close_user(name)
                if n:
                    log.info("rabbitmq: kicked %d connection(s) of principal=%s credential=%s", n, targets[name], name)
                kicked += n
            self._grace_seen = graces_to  # only once every kick went through: a failed pass is retried whole
            self.cursor.advance(events, time.monotonic())
            if events:
                self._kick_log = (self._kick_log + [(self.seq, kicked)])[-64:]
            return kicked

    def _late_role_pass(self) -> dict[str, str]:
        """Once ROLE_RECHECK is over: users connected before the last role change that its pass did not close."""
        if self._role_pass is None or time.monotonic() < self._role_pass[0]:
            return {}
        _, changed_ms, done = self._role_pass
        late = self.mgmt.connected_users(before_ms=changed_ms) - done - set(self._credentials(HUB_PRINCIPAL))
        self._role_pass = None  # only once listed: a failed listing is tried again on the next pass
        return dict.fromkeys(late, "-")

    def _ended_graces(self, now: datetime) -> tuple[dict[str, str], str]:
        """The credentials (URIs) of superseded certificates whose grace ended, and of certificates that expired,
        since the last look, and the new mark: only their sessions are closed (a principal's session on its
        current certificate stays)."""
        at = _ts(now)
        # superseded certificates whose grace ended, and current ones that expired (TLS checks validity at the
        # handshake only: a session would outlive its certificate); on the tables, not the view, so that each is
        # an index search (SCHEMA, certificates_active_expiry)
        window = [self._grace_seen, at]
        rows = [*self.registry.query(
            "SELECT 'device' AS issuer, serial, device_id AS principal FROM certificates WHERE status = 'superseded' "
            "AND grace_until > ? AND grace_until <= ?", window), *self.registry.query(
            "SELECT 'device' AS issuer, serial, device_id AS principal FROM certificates WHERE status = 'active' "
            "AND not_after > ? AND not_after <= ?", window)]
        rows += [{**r, "principal": r["principal"] if r["principal"] == HUB_PRINCIPAL
                  else SERVICE_PREFIX + r["principal"]}
                 for r in self.registry.query(
                     "SELECT 'service' AS issuer, serial, identity AS principal FROM identity_certificates "
                     "WHERE (status = 'superseded' AND grace_until > ? AND grace_until <= ?) "
                     "OR (status = 'active' AND not_after > ? AND not_after <= ?)", window + window)]
        return {credential_uri(r["issuer"], int(r["serial"], 16)): r["principal"] for r in rows}, at

    def _credentials(self, principal: str, superseded_only: bool = False) -> dict[str, str]:
        """The credential URIs of a principal's certificates (what RabbitMQ names its connections by) -> it."""
        return {credential_uri(r["issuer"], int(r["serial"], 16)): principal
                for r in credentials_of(self.registry, principal)
                if not superseded_only or r["cert_status"] == "superseded"}

    def _on_active(self, principal: str) -> None:
        try:
            self.end_grace(principal)  # the follower (every FOLLOW_EVERY s) closes the old sessions
        except (RegistryError, *dbsql.driver_errors()) as exc:  # the grace then ends at grace_until, as before
            log.warning("rabbitmq: ending the superseded grace of %s failed: %s", principal, exc)

    def end_grace(self, principal: str) -> int:
        """The principal logged in with its current certificate: the graces of its superseded ones end now (the
        Mosquitto plugin refuses them from then on; here the registry says so, for every node and hub). Audited,
        with an authz event, so every hub's driver rewrites the listener CRLs and closes those sessions."""
        now = self.clock()
        if principal == HUB_PRINCIPAL or principal.startswith(SERVICE_PREFIX):
            identity = principal if principal == HUB_PRINCIPAL else principal[len(SERVICE_PREFIX):]
            table, column, device_id = "identity_certificates", "identity", None
        else:
            identity, table, column, device_id = principal, "certificates", "device_id", principal
        with self.registry.write() as db:
            ended = db.execute(f"UPDATE {table} SET grace_until = ? WHERE {column} = ? AND status = 'superseded' "
                               "AND grace_until > ?", [_ts(now), identity, _ts(now)]).rowcount
            if ended:
                self.registry._audit_row(db, "certificate.grace_ended", "ok", now, "broker", device_id,
                                         f"principal={principal}: its current certificate connected; "
                                         f"{ended} superseded certificate(s) refused from now on")
                self.registry.authz_event(db, principal, GRACE_ENDED, now)
        return ended

    def sync(self, timeout: float = 2.0, after: int | None = None) -> SyncResult:
        started = time.monotonic()
        try:
            kicked = self._apply()
        except (MgmtError, RegistryError, OSError, *dbsql.driver_errors()) as exc:
            raise BrokerError(f"RabbitMQ did not confirm: {exc}") from None
        if after is not None:
            kicked = sum(k for s, k in self._kick_log if s > after)
        return SyncResult(seq=self.seq, kicked=kicked, seconds=time.monotonic() - started)
