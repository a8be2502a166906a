"""The fleet API in the CLI's own process, for when no hub runs: the same handlers over the registry and CA.

`OfflineHub(root)` opens the hub directory's registry and CA, checks (as serve does) that a shared PostgreSQL
registry is this fleet's and records the hub's identity there, makes sure its local operator identity exists, and
starts hub/api/server.py's `start_api` on 127.0.0.1 port 0 with a stand-in for the live hub: its broker's `sync`
raises BrokerError("the hub is not running") (so the API's answers carry that broker note: the change is recorded,
and the broker enforces it from the registry when it starts), and its CRL publisher only notes a change, which
`close()` publishes (device and service CRLs) before the CLI exits. One code path: the handlers are the API's.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

NOT_RUNNING = "the hub is not running"


def _now() -> datetime:
    return datetime.now(timezone.utc)


class _Broker:
    """No broker: nothing to ring (the plugin reads the registry when the hub starts)."""

    def sync(self, after=None):
        from hub.broker import BrokerError

        raise BrokerError(NOT_RUNNING)

    def healthy(self) -> bool:
        return False


class _Crl:
    """Changes are published once, synchronously, when the offline API closes."""

    def __init__(self):
        self.dirty = False

    def changed(self) -> None:
        self.dirty = True


class _Live:
    """What the API's handlers use of hub.serve.live.LiveHub, without a broker."""

    def __init__(self, cfg, ca, registry):
        self.cfg, self.ca, self.registry = cfg, ca, registry
        self.broker, self.crl, self.admin, self.clock = _Broker(), _Crl(), None, _now
        self.ack_listeners: list = []

    def send_command(self, *args, **kwargs):
        from hub.broker import BrokerError

        raise BrokerError(f"{NOT_RUNNING} (commands need a live broker)")

    def authz_sync(self):
        self.crl.changed()
        return self.broker.sync()


class OfflineHub:
    """The API on 127.0.0.1:<port> in this process; close() stops it and publishes the CRLs if anything changed."""

    def __init__(self, root: Path):
        import logging

        from cryptography import x509

        from hub.api.identityroutes import ensure_local_operator
        from hub.authz.identities import ensure_hub_identity
        from hub.api.server import start_api
        from hub.ca.authority import load_ca
        from hub.config import load_config
        from hub.serve.guard import check_registry

        logging.getLogger("tessera.api").setLevel(logging.CRITICAL)  # errors reach the operator as answers
        self.cfg = load_config(Path(root))
        self.registry = self.cfg.open_registry()
        self.ca = None
        self.server = None
        try:
            # as serve does: a shared (PostgreSQL) registry must be this fleet's (another audit key would break
            # the chain for every hub), and the hub's identity is recorded there (init wrote only its own SQLite)
            check_registry(self.cfg, self.registry)
            ensure_hub_identity(self.registry, x509.load_pem_x509_certificate(
                (self.cfg.tls_dir / "admin.pem").read_bytes()), _now())
            self.ca = load_ca(self.cfg.ca_dir, self.cfg.ca_token)
            ensure_local_operator(self.cfg, self.ca, self.registry, _now())
            self.live = _Live(self.cfg, self.ca, self.registry)
            self.server = start_api(self.cfg, self.live, "127.0.0.1", 0)
        except BaseException:
            self._release()
            raise
        self.port = self.server.port

    def close(self) -> None:
        try:
            if self.server is not None:
                self.server()
                self.server = None
            if self.live.crl.dirty:
                from hub.ca.revocation import publish_crl, publish_service_crl

                self.live.crl.dirty = False
                now = _now()
                publish_crl(self.ca, self.registry, self.cfg.crl_dir, now)
                publish_service_crl(self.ca, self.registry, self.cfg.crl_dir, now, force=True)
        finally:
            self._release()

    def _release(self) -> None:
        if self.ca is not None:
            self.ca.close()
            self.ca = None
        self.registry.close()
