"""The running hub's live actions: status changes that bite at once (registry commit, broker sync), device traffic.

A suspend / resume / revoke is one registry transaction (status, certificates, audit row and an authz event);
the broker plugin admits nobody the registry does not, so that commit alone decides every new connection. The
hub then rings the broker (`BrokerDriver.sync`) so live sessions are cut at once and it can say when that
happened. CRLs are still published for third parties, off the request path (`CrlPublisher`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Callable

from hub.broker import BrokerDriver, BrokerError
from hub.ca.authority import FleetCA
from hub.config import HubConfig
from hub.ca.crl import crl_needs_refresh, current_crl, pem_matches_der, remove_stale_temps
from hub.registry.store import Registry, UnknownDevice
from hub.serve import stats
from hub.ca.revocation import publish_crl, publish_service_crl

log = logging.getLogger("tessera.hub")

CRL_MIN_INTERVAL = 2.0    # seconds between two CRL publications after changes (a burst of revokes is one CRL)
CRL_CHECK_INTERVAL = 60.0  # seconds between checks that the CRL is not due for re-issue
#: a change committed this close before the CRL's thisUpdate (whole seconds in X.509) may be missing from it
CRL_LAG_MARGIN = timedelta(seconds=2)


class CrlPublisher:
    """Publishes the device and service CRLs in the background: soon after a change, and before nextUpdate."""

    def __init__(self, ca: FleetCA, registry: Registry, cfg: HubConfig, clock: Callable[[], datetime]):
        self.ca, self.registry, self.cfg, self.clock = ca, registry, cfg, clock
        self._dirty = threading.Event()
        self._lock = threading.Lock()
        self._next_check = 0.0
        self._last = 0.0
        self.published = 0

    def changed(self) -> None:
        self._dirty.set()

    def publish(self) -> None:
        with self._lock:
            now = self.clock()
            publish_crl(self.ca, self.registry, self.cfg.crl_dir, now)
            publish_service_crl(self.ca, self.registry, self.cfg.crl_dir, now, force=True)
            self.published += 1
            self._last = time.monotonic()

    def due(self) -> bool:
        """A change is pending (and the last publication is old enough), or the CRL is missing or due."""
        mono = time.monotonic()
        if self._dirty.is_set() and mono - self._last >= CRL_MIN_INTERVAL:
            return True
        if mono < self._next_check:
            return False
        self._next_check = mono + CRL_CHECK_INTERVAL
        crl = current_crl(self.cfg.crl_dir, self.ca.device_ca)
        return crl is None or crl_needs_refresh(crl, self.clock())

    def lags(self) -> bool:
        """The CRL files on disk are behind: none yet, a PEM that is not the DER's armor, or an authorization change
        in the registry (revoke, suspend, resume, identity revocation: each writes an authz event) newer than the
        device CRL. A process that committed a change and ended before it published (kill -9, power loss) leaves
        the CRL behind, and nothing else would tell the next process: `due()` only looks at the CRL's own age."""
        crl = current_crl(self.cfg.crl_dir, self.ca.device_ca)
        if crl is None or not pem_matches_der(self.cfg.crl_dir):
            return True
        rows = self.registry.query("SELECT at FROM authz_events ORDER BY seq DESC LIMIT 1")
        return bool(rows) and datetime.fromisoformat(rows[0]["at"]) >= crl.last_update_utc - CRL_LAG_MARGIN

    def recover(self) -> None:
        """At the hub's start: remove the temp files of a publication the previous process did not finish, and
        publish soon if the CRL lags (`lags`)."""
        for path in remove_stale_temps(self.cfg.crl_dir):
            log.warning("removed %s, left by a CRL publication that did not finish", path.name)
        if self.lags():
            log.info("the CRL lags the registry: publishing it")
            self._dirty.set()

    def start(self, stop: threading.Event) -> threading.Thread:
        """Run `step` on a thread of its own until `stop` is set: a CRL of 100k entries takes seconds to build,
        and must delay neither a status change nor the hub's shutdown (the files are swapped in atomically, so
        a publication cut short by the end of the process leaves the previous CRL in place). First `recover()`."""
        def loop() -> None:
            try:
                self.recover()
            except Exception:  # noqa: BLE001  (the periodic checks still run)
                log.exception("CRL recovery at start failed")
            while not stop.wait(0.5):
                self.step()

        thread = threading.Thread(target=loop, name="crl-publisher", daemon=True)
        thread.start()
        return thread

    def step(self) -> None:
        """Publish if due (errors keep the previous CRL in place)."""
        if not self.due():
            return
        self._dirty.clear()
        try:
            self.publish()
        except Exception:
            self._dirty.set()
            log.exception("CRL publication failed; the previous CRL stays in place")


class LiveHub:
    """Owns the CA, registry and broker of a running hub; every method is safe to call from any thread."""

    def __init__(self, cfg: HubConfig, ca: FleetCA, registry: Registry, broker: BrokerDriver,
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)):
        self.cfg, self.ca, self.registry, self.broker, self.clock = cfg, ca, registry, broker, clock
        self.crl = CrlPublisher(ca, registry, cfg, clock)
        self._counters: dict[str, dict] = {}
        self._acks: dict[str, dict] = {}
        self._stats_lock = threading.Lock()
        self._sink = None
        self.admin = None  # the AdminClient, set by serve
        self.ack_listeners: list[Callable[[str, dict], None]] = []  # (device id, ack), e.g. the job runner

    # --- enforcement --------------------------------------------------------------------------------------------------
    def authz_sync(self) -> dict:
        """Ring the broker so it applies every committed authorization change now (and republish the CRLs)."""
        self.crl.changed()
        result = self.broker.sync()
        return {"seq": result.seq, "kicked": result.kicked, "ms": result.seconds * 1000}

    def set_status(self, device_id: str, status: str, reason: str, actor: str) -> dict:
        """Suspend / resume / revoke / decommission with immediate effect; returns what happened and how long each
        step took."""
        t0 = time.monotonic()
        before = self.registry.authz_seq()
        result = self.registry.set_status(device_id, status, self.clock(), actor=actor, reason=reason)
        t_registry = time.monotonic()
        kicked: int | None = None
        note = ""
        try:
            kicked = self.broker.sync(after=before).kicked
        except BrokerError as exc:  # the plugin follows the registry by itself within a broker tick
            note = f"; broker not confirmed ({exc}); it applies the change on its next tick"
            log.warning("%s %s: %s", device_id, status, note)
        t_sync = time.monotonic()
        stats.of(self.registry).enforced(status, t_sync - t_registry, kicked is not None)
        if status in ("revoked", "suspended", "decommissioned"):
            self.registry.mark_presence(device_id, False, self.clock())  # a kick sends no last will
        self.crl.changed()
        timings = {"registry_ms": (t_registry - t0) * 1000, "sync_ms": (t_sync - t_registry) * 1000,
                   "total_ms": (time.monotonic() - t0) * 1000}
        self.registry.audit(f"device.{status}.enforced", "ok" if kicked is not None else "error", self.clock(),
                            actor=actor, device_id=device_id,
                            detail=f"sessions cut: {kicked if kicked is not None else 'pending'}; "
                                   f"{timings['total_ms']:.0f} ms{note}")
        log.info("%s %s: enforced in %.0f ms", device_id, status, timings["total_ms"])
        return {"device": result["device"], "revoked_serials": result["revoked_serials"], "kicked": kicked,
                "timings": timings}

    # --- device traffic ------------------------------------------------------------------------------------------------
    def on_device_message(self, device_id: str, kind: str, payload: bytes) -> None:
        """A device published telemetry, an event or a command ack (seen through the admin subscription)."""
        now = self.clock()
        ack = None
        with self._stats_lock:
            c = self._counters.setdefault(device_id, {"messages": 0, "last": None, "by_kind": {}})
            c["messages"] += 1
            c["last"] = now.isoformat()
            c["by_kind"][kind] = c["by_kind"].get(kind, 0) + 1
            if kind == "commands/ack":
                try:
                    ack = json.loads(payload)
                    if isinstance(ack, dict) and isinstance(ack.get("id"), str):
                        self._acks[ack["id"]] = ack
                        if len(self._acks) > 10_000:
                            self._acks.pop(next(iter(self._acks)))
                    else:
                        ack = None
                except ValueError:
                    pass
            if self.cfg.telemetry_log:
                if self._sink is None:
                    self._sink = open(self.cfg.log_dir / "device-messages.jsonl", "a", buffering=1)
                self._sink.write(json.dumps({"at": now.isoformat(), "device": device_id, "kind": kind,
                                             "payload": payload.decode("utf-8", "replace")}) + "\n")
        for listener in self.ack_listeners if ack is not None else ():
            try:
                listener(device_id, ack)
            except Exception:  # noqa: BLE001
                log.exception("ack listener failed")

    def traffic(self) -> dict:
        with self._stats_lock:
            return json.loads(json.dumps(self._counters))

    def send_command(self, device_id: str, command: str, args: dict, actor: str = "cli") -> str:
        """Publish a command to devices/<id>/commands (QoS 1, never retained); returns its id (the ack carries it)."""
        if self.registry.get_device(device_id) is None:
            raise ValueError(f"no device {device_id!r}")
        cid = uuid.uuid4().hex[:16]
        self.admin.publish(f"devices/{device_id}/commands",
                           json.dumps({"id": cid, "command": command, "args": args}).encode())
        self.registry.audit("command.send", "ok", self.clock(), actor=actor, device_id=device_id,
                            detail=f"{command} id={cid}")
        return cid

    def command_ack(self, cid: str) -> dict | None:
        with self._stats_lock:
            return self._acks.get(cid)

    def on_status(self, device_id: str, payload: bytes) -> None:
        """Presence from devices/<id>/status (retained; the agent's last will says offline)."""
        online = parse_presence(payload)
        if online is None:
            return
        try:  # one write (none for a repeated offline); no lookup first
            self.registry.mark_presence(device_id, online, self.clock())
        except UnknownDevice:
            pass


def parse_presence(payload: bytes) -> bool | None:
    """True/False for an online/offline status payload ('online', or JSON {"state": "online"}), else None."""
    text = payload.decode("utf-8", "replace").strip()
    if text.startswith("{"):
        try:
            text = str(json.loads(text).get("state", ""))
        except (ValueError, AttributeError):
            return None
    return {"online": True, "offline": False}.get(text.lower())
