"""`tessera-hub init`: lay out a new fleet directory (CAs, hub TLS identity, registry, first CRL, fleet.toml)."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import socket
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hsm.uri import UriError, parse

from hub.authz.identities import ensure_hub_identity
from hub.ca.authority import CaError, FleetCA, create_hierarchy, new_file_key
from hub.config import ConfigError, HubConfig, check_http_base
from hub.ca.policy import Policy
from hub.ca.revocation import publish_crl


def _write_pem(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def issue_hub_identities(cfg: HubConfig, ca: FleetCA, now: datetime) -> None:
    """The hub's EST/MQTT server certificate (serverAuth, chain with the service CA) and admin client cert."""
    cfg.tls_dir.mkdir(mode=0o700, exist_ok=True)
    names = list(dict.fromkeys([*cfg.server_names, socket.gethostname()]))
    dns = [n for n in names if not _is_ip(n)]
    ips = [n for n in names if _is_ip(n)]
    chain_tail = ca.service_ca.public_bytes(serialization.Encoding.PEM)
    for name, issue in (("est", lambda pub: ca.issue_server_cert(pub, dns, ips, now)),
                        ("admin", lambda pub: ca.issue_admin_cert(pub, now))):
        key_path = cfg.tls_dir / f"{name}.key"
        key_path.unlink(missing_ok=True)
        key = new_file_key(key_path, "ec-p256")
        cert = issue(key.public_key())
        _write_pem(cfg.tls_dir / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM) + chain_tail)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def create_fleet(root: Path, fleet: str, now: datetime, *, validity_days: int = 30, key_type: str = "ec-p256",
                 ca_key: str = "", ca_pin_source: str = "", ca_module: str = "", hostnames: list[str] = (),
                 est_port: int = 8443, mqtt_port: int = 8883, public_url: str = "",
                 public_crl_url: str = "") -> HubConfig:
    if (root / "fleet.toml").exists():
        raise ConfigError(f"{root} already holds a fleet; refusing to overwrite it")
    if validity_days < 1:
        raise ConfigError("--validity-days must be at least 1")
    Policy(fleet=fleet)  # validates the name
    cfg = HubConfig(root=root, fleet=fleet, validity_days=validity_days, key_type=key_type, est_port=est_port,
                    mqtt_port=mqtt_port)
    cfg.server_names = list(dict.fromkeys([*cfg.server_names, *hostnames]))
    if hostnames:  # the first name given is the one devices reach the hub by (and the CRL's address)
        cfg.public_host = hostnames[0]
    if public_url:
        parts = urlsplit(public_url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ConfigError(f"--public-url must be an http(s) base URL like https://hub.example.com, not "
                              f"{public_url!r}")
        cfg.public_url = public_url.rstrip("/")
    if public_crl_url:
        try:
            cfg.crl_public_url = check_http_base(public_crl_url, "--public-crl-url")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    token = None
    if ca_key:
        try:
            uri = parse(ca_key)
        except UriError as exc:
            raise ConfigError(f"--ca-key: {exc}") from None
        if not uri.token:
            raise ConfigError("--ca-key must name the token, e.g. pkcs11:token=fleet-ca")
        if not ca_pin_source:
            raise ConfigError("--ca-key needs --ca-pin-source (file:/path or env:NAME)")
        cfg.ca_store, cfg.ca_token_label, cfg.ca_pin_source = "pkcs11", uri.token, ca_pin_source
        cfg.ca_module = ca_module or (uri.module_path or "")
        cfg.ca_softhsm_conf = os.environ.get("SOFTHSM2_CONF", "")
        token = cfg.ca_token
    existed = root.exists()
    before = set(os.listdir(root)) if existed and root.is_dir() else set()
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root, 0o700)
    except OSError as exc:
        raise ConfigError(f"cannot create the hub directory {root}: {exc.strerror or exc}") from None
    try:
        _populate(cfg, fleet, now, key_type, token)
    except BaseException:
        _undo(root, existed, before)  # a failed init leaves the directory as it found it
        raise
    return cfg


def _undo(root: Path, existed: bool, before: set[str]) -> None:
    """Remove what a failed init created under `root` (and `root` itself if init made it)."""
    for name in set(os.listdir(root)) - before:
        path = root / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    if not existed:
        with contextlib.suppress(OSError):
            root.rmdir()


def _populate(cfg: HubConfig, fleet: str, now: datetime, key_type: str, token) -> None:
    """Everything init writes into the hub directory: broker plugin, CA hierarchy, identities, registry, CRL, toml."""
    for d in (cfg.crl_dir, cfg.log_dir, cfg.broker_dir):
        d.mkdir(exist_ok=True, mode=0o700)
    try:  # the broker's authorization plugin: a missing compiler or header is found now, not at `serve`
        from hub.broker import BrokerError
        from hub.broker.mosquitto.build import plugin_path

        plugin_path(cfg.broker_dir)
    except BrokerError as exc:
        raise ConfigError(str(exc)) from None
    ca = create_hierarchy(cfg.ca_dir, fleet, now, key_type=key_type, token=token)
    try:
        issue_hub_identities(cfg, ca, now)
        registry = cfg.open_registry()
        ensure_hub_identity(registry, x509.load_pem_x509_certificate((cfg.tls_dir / "admin.pem").read_bytes()), now)
        from hub.api.identityroutes import ensure_local_operator

        ensure_local_operator(cfg, ca, registry, now)  # svc.local-admin: the CLI on this machine, an API operator
        registry.audit("fleet.init", "ok", now, actor="cli",
                       detail=f"fleet={fleet} ca={'pkcs11' if token else 'file'} key={key_type}")
        publish_crl(ca, registry, cfg.crl_dir, now)
        registry.close()
    except CaError:
        raise
    finally:
        ca.close()
    cfg.save()



#: What a second hub copies from the first (relative paths; every *.key, *.secret and audit.key stays 0600): the
#: fleet's CAs, the hub TLS identities (the same server name, admin and local-operator certificates), the audit
#: chain key and the RabbitMQ secrets (the nodes' auth back-end URL and the management user are the fleet's).
JOIN_DIRS = ("ca", "tls")
JOIN_FILES = ("audit.key", "broker/rabbitmq/auth.secret", "broker/rabbitmq/mgmt.secret")
#: ... but not the local operator's credential: each hub has its own (svc.local-admin-<hub-id>, made at its first
#: serve or command, HubConfig.local_operator), so one hub renewing it never strands the other.
JOIN_OWN = ("tls/local-admin.pem", "tls/local-admin.key")


def join_fleet(root: Path, source: Path) -> HubConfig:
    """`tessera-hub init --join SOURCE`: a second hub of the fleet served from `source` (a hub directory on a
    PostgreSQL registry): its fleet.toml (same [registry] url, [broker], fleet and issuance settings), its CA
    material, TLS identities, audit key and broker secrets, copied 0600. Nothing is written to the registry; serve
    checks that the registry is this fleet's (hub/serve/guard.py: check_registry)."""
    from hub.config import load_config

    src = load_config(Path(source))
    if not src.registry_url:
        raise ConfigError(f"{source} keeps its registry in a SQLite file; a second hub needs a shared PostgreSQL "
                          f"registry ([registry] url in {src.toml_path}, docs/scale-out.md)")
    if src.ca_store != "file":
        raise ConfigError(f"{source} keeps its CA keys in a PKCS#11 token: give the second hub its own access to that "
                          "token (init it with the same --ca-key) instead of --join")
    if (root / "fleet.toml").exists():
        raise ConfigError(f"{root} already holds a fleet; refusing to overwrite it")
    missing = [name for name in (*JOIN_DIRS, "audit.key") if not (src.root / name).exists()]
    if missing:
        raise ConfigError(f"{source} is not a complete hub directory (missing {', '.join(missing)})")
    if src.broker_kind == "rabbitmq" and not all((src.root / name).exists() for name in JOIN_FILES[1:]):
        # else this hub would make a management password and auth secret of its own, which the nodes rendered
        # by the first hub do not know
        raise ConfigError(f"{source} has no RabbitMQ secrets yet (broker/rabbitmq/*.secret): serve it once "
                          "first, then join")
    existed = root.exists()
    before = set(os.listdir(root)) if existed and root.is_dir() else set()
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root, 0o700)
    except OSError as exc:
        raise ConfigError(f"cannot create the hub directory {root}: {exc.strerror or exc}") from None
    try:
        cfg = replace(src, root=root)
        for d in (cfg.crl_dir, cfg.log_dir, cfg.broker_dir):
            d.mkdir(exist_ok=True, mode=0o700)
        for name in JOIN_DIRS:
            (root / name).mkdir(mode=0o700, exist_ok=True)
            for path in sorted((src.root / name).iterdir()):
                if path.is_file() and f"{name}/{path.name}" not in JOIN_OWN:
                    _copy_private(path, root / name / path.name)
        for name in JOIN_FILES:
            if (src.root / name).exists():
                (root / name).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                _copy_private(src.root / name, root / name)
        for path in sorted(src.crl_dir.glob("*.crl*")):  # served until this hub publishes its own
            shutil.copyfile(path, cfg.crl_dir / path.name)
        # this hub's own MQTT client id (HubConfig.admin_client_id): the first hub's session stays its own
        (root / "hub-id").write_text(secrets.token_hex(4) + "\n")
        cfg.save()
    except BaseException:
        _undo(root, existed, before)
        raise
    return cfg


def _copy_private(src: Path, dst: Path) -> None:
    """`src` copied to `dst`: secrets (*.key, *.secret, audit.key) 0600 from their creation, certificates as
    readable as the source's, never more than 0644."""
    secret = src.suffix in (".key", ".secret")
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else src.stat().st_mode & 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(src.read_bytes())
