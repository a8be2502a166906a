"""The running hub's live actions: status changes that bite at once (CRL swap confirmed, session kicked)."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .broker import AclSpec, BrokerDriver, Canary
from .ca import FleetCA
from .config import HubConfig
from .registry import Registry
from .revocation import publish_crl, publish_service_crl

log = logging.getLogger("tessera.hub")

CANARY_LIFETIME = timedelta(minutes=15)


@dataclass
class _CanaryEntry:
    serial: int
    revoked_at: datetime
    expires: datetime


class LiveHub:
    """Owns the CA, registry and broker of a running hub; every method is safe to call from any thread."""

    def __init__(self, cfg: HubConfig, ca: FleetCA, registry: Registry, broker: BrokerDriver,
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)):
        self.cfg, self.ca, self.registry, self.broker, self.clock = cfg, ca, registry, broker, clock
        self._lock = threading.RLock()
        self._canaries: list[_CanaryEntry] = []
        self._counters: dict[str, dict] = {}
        self._acks: dict[str, dict] = {}
        self._stats_lock = threading.Lock()
        self._sink = None
        self.admin = None  # the AdminClient, set by serve

    # --- CRL with canary ------------------------------------------------------------------------------------------
    def _new_canary(self, now: datetime) -> Canary:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.ca.issue_canary_cert(key.public_key(), now, CANARY_LIFETIME)
        self._canaries = [c for c in self._canaries if c.expires > now]
        self._canaries.append(_CanaryEntry(cert.serial_number, now, cert.not_valid_after_utc))
        pem = cert.public_bytes(serialization.Encoding.PEM) + \
            self.ca.device_ca.public_bytes(serialization.Encoding.PEM)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return Canary(cert_pem=pem, key_pem=key_pem, serial=cert.serial_number, not_after=cert.not_valid_after_utc)

    def prepare_crl(self, now: datetime) -> tuple[bytes, Canary]:
        """Publish a fresh device CRL (registry + a new revoked canary) and return the broker bundle."""
        with self._lock:
            canary = self._new_canary(now)
            extra = [(c.serial, c.revoked_at, "cessationOfOperation") for c in self._canaries]
            der_path = publish_crl(self.ca, self.registry, self.cfg.crl_dir, now, extra)
            device_pem = der_path.with_name("device.crl.pem").read_bytes()
            service_pem = publish_service_crl(self.ca, self.cfg.crl_dir, now)
            return device_pem + service_pem, canary

    def canary_age(self) -> timedelta:
        """Age of the newest canary (how long the broker's enforcement proof has been in use)."""
        with self._lock:
            newest = max((c.revoked_at for c in self._canaries), default=None)
        return self.clock() - newest if newest else timedelta.max

    def enforce_crl(self) -> float:
        """Publish a new CRL and make the broker enforce it (confirmed). Returns seconds spent in the broker."""
        with self._lock:
            bundle, canary = self.prepare_crl(self.clock())
            return self.broker.install_crl(bundle, canary)

    def acl(self) -> AclSpec:
        return AclSpec(groups={d["id"]: tuple(d["groups"]) for d in self.registry.list_devices()
                               if d["status"] == "active" and d["groups"]})

    def refresh_acl(self) -> None:
        self.broker.install_acl(self.acl())

    # --- operator actions --------------------------------------------------------------------------------------------
    def set_status(self, device_id: str, status: str, reason: str, actor: str) -> dict:
        """Suspend / resume / revoke with immediate effect; returns what happened and how long each step took."""
        t0 = time.monotonic()
        with self._lock:
            now = self.clock()
            result = self.registry.set_status(device_id, status, now, actor=actor, reason=reason)
            t_registry = time.monotonic()
            broker_s = self.enforce_crl()
            t_crl = time.monotonic()
            kicked = False
            if status in ("revoked", "suspended"):
                self.broker.kick(device_id)  # a kick sends no last will: record the presence change here
                self.registry.mark_presence(device_id, False, self.clock())
                kicked = True
            t_kick = time.monotonic()
            self.refresh_acl()
        timings = {"registry_ms": (t_registry - t0) * 1000, "crl_ms": (t_crl - t_registry) * 1000,
                   "broker_reload_ms": broker_s * 1000, "kick_ms": (t_kick - t_crl) * 1000,
                   "total_ms": (time.monotonic() - t0) * 1000}
        self.registry.audit(f"device.{status}.enforced", "ok", self.clock(), actor=actor, device_id=device_id,
                            detail=f"CRL confirmed by broker; session kicked={kicked}; {timings['total_ms']:.0f} ms")
        log.info("%s %s: enforced in %.0f ms", device_id, status, timings["total_ms"])
        return {"device": result["device"], "revoked_serials": result["revoked_serials"], "kicked": kicked,
                "timings": timings}

    def on_device_message(self, device_id: str, kind: str, payload: bytes) -> None:
        """A device published telemetry, an event or a command ack (seen through the admin subscription)."""
        now = self.clock()
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
                except ValueError:
                    pass
            if self.cfg.telemetry_log:
                if self._sink is None:
                    self._sink = open(self.cfg.log_dir / "device-messages.jsonl", "a", buffering=1)
                self._sink.write(json.dumps({"at": now.isoformat(), "device": device_id, "kind": kind,
                                             "payload": payload.decode("utf-8", "replace")}) + "\n")

    def traffic(self) -> dict:
        with self._stats_lock:
            return json.loads(json.dumps(self._counters))

    def send_command(self, device_id: str, command: str, args: dict) -> str:
        """Publish a command to devices/<id>/commands (QoS 1); returns its id (the ack carries it back)."""
        import uuid

        if self.registry.get_device(device_id) is None:
            raise ValueError(f"no device {device_id!r}")
        cid = uuid.uuid4().hex[:16]
        self.admin.publish(f"devices/{device_id}/commands",
                           json.dumps({"id": cid, "command": command, "args": args}).encode())
        self.registry.audit("command.send", "ok", self.clock(), actor="cli", device_id=device_id,
                            detail=f"{command} id={cid}")
        return cid

    def command_ack(self, cid: str) -> dict | None:
        with self._stats_lock:
            return self._acks.get(cid)

    def on_status(self, device_id: str, payload: bytes) -> None:
        """Presence from devices/<id>/status (retained; the agent's last will says offline)."""
        online = parse_presence(payload)
        if online is not None and self.registry.get_device(device_id) is not None:
            self.registry.mark_presence(device_id, online, self.clock())


def parse_presence(payload: bytes) -> bool | None:
    """True/False for an online/offline status payload ('online', or JSON {"state": "online"}), else None."""
    text = payload.decode("utf-8", "replace").strip()
    if text.startswith("{"):
        try:
            text = str(json.loads(text).get("state", ""))
        except (ValueError, AttributeError):
            return None
    return {"online": True, "offline": False}.get(text.lower())
