"""The hub directory: where everything lives (fleet.toml, registry, CA, CRL, TLS, broker) and fleet.toml itself."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from hsm.token import TokenConfig

from hub.ca.policy import Policy
from hub.registry.sql import PG_NEEDS_RABBITMQ, check_url

DEFAULT_DIR = "tessera-hub"
BROKER_KINDS = ("mosquitto", "rabbitmq")
DEFAULT_RABBITMQ_AUTH_PORT = 8446  # loopback: RabbitMQ's HTTP auth back end requests (hub/broker/rabbitmq/)
#: The most EST worker processes `[est] workers = 0` picks (SQLite has one writer; each worker is ~40 MB).
MAX_EST_WORKERS = 8
#: The plain-HTTP CRL listener's port when fleet.toml's [crl] http_port is not set.
DEFAULT_CRL_HTTP_PORT = 8080


class ConfigError(Exception):
    """The hub directory or fleet.toml is missing or wrong (message says what to do)."""


def hub_dir(path: str | os.PathLike | None) -> Path:
    """--dir, else $TESSERA_HUB_DIR, else ./tessera-hub."""
    return Path(path or os.environ.get("TESSERA_HUB_DIR") or DEFAULT_DIR).absolute()


@dataclass
class HubConfig:
    """fleet.toml, plus the paths derived from the hub directory."""

    root: Path
    fleet: str
    validity_days: int = 30
    token_ttl_days: int = 7
    key_type: str = "ec-p256"
    est_host: str = "127.0.0.1"
    est_port: int = 8443
    mqtt_port: int = 8883
    public_host: str = "localhost"
    #: Base URL third parties fetch the CRL from (its distribution point in every device certificate); empty:
    #: https://<public_host>:<est port>. Set it when the hub sits behind a name, a proxy or a CDN.
    public_url: str = ""
    #: The plain-HTTP CRL listener (hub/serve/crlhttp.py; RFC 5280 8: CRLs are fetched over http, so checking a
    #: certificate never needs the TLS of the PKI being checked). None: DEFAULT_CRL_HTTP_PORT if free (serve runs on
    #: without it otherwise), 0: off (new device certificates then name no http distribution point of the hub's own;
    #: `crl_public_url` still puts one there).
    crl_http_port: int | None = None
    #: Base URL of the http distribution point (first in every new device certificate); empty:
    #: http://<public_host>:<crl_http_port or DEFAULT_CRL_HTTP_PORT>.
    crl_public_url: str = ""
    rate_per_source: float = 100.0
    rate_burst: int = 200
    failures_per_minute: int = 30
    #: EST failure budgets per source (a factory line behind one NAT address is one source) and hub-wide.
    source_failures_per_minute: int = 300
    global_failures_per_minute: int = 3000
    #: EST listener: connections open at once per address; seconds to the end of the headers / of the request.
    max_connections_per_source: int = 32
    header_timeout: float = 10.0
    request_timeout: float = 30.0
    #: EST worker processes sharing the EST port (hub/est/pool.py); 0: one per CPU, at most MAX_EST_WORKERS.
    est_workers: int = 0
    server_names: list[str] = field(default_factory=lambda: ["localhost", "127.0.0.1"])
    ca_store: str = "file"
    ca_module: str = ""
    ca_token_label: str = ""
    ca_pin_source: str = ""
    ca_softhsm_conf: str = ""
    #: Append every device message the hub sees to logs/device-messages.jsonl.
    telemetry_log: bool = False
    #: Broker limits: payload bytes per PUBLISH, queued bytes per client, connects per principal per minute.
    max_payload: int = 256 * 1024
    max_queued_bytes: int = 64 * 1024 * 1024
    connect_rate: int = 30
    connect_burst: int = 10
    #: Seconds a certificate superseded by a renewal still connects (ends early once the new one has connected).
    supersede_grace_seconds: int = 300
    #: The HTTPS fleet API's port; None: 8444 if free (serve runs on without the API otherwise), 0: any free port.
    api_port: int | None = None
    #: The registry: '' is registry.sqlite3 in the hub directory; a PostgreSQL URL (several hubs on one fleet,
    #: hub/registry/sql.py: check_url) pairs with the rabbitmq broker only (the Mosquitto plugin reads the file).
    registry_url: str = ""
    #: The broker the hub drives: "mosquitto" (a child process) or "rabbitmq" (a cluster it is pointed at,
    #: hub/broker/rabbitmq/): each node's management API URL, and the loopback port of the hub's auth back end.
    broker_kind: str = "mosquitto"
    rabbitmq_management: list[str] = field(default_factory=list)
    rabbitmq_auth_port: int = DEFAULT_RABBITMQ_AUTH_PORT

    # --- derived paths ---
    @property
    def toml_path(self) -> Path:
        return self.root / "fleet.toml"

    @property
    def registry_path(self) -> Path:
        """The SQLite registry file (with a PostgreSQL registry: where the audit key and the write-lock file of
        this hub's directory live; see registry_target)."""
        return self.root / "registry.sqlite3"

    @property
    def registry_target(self) -> str | Path:
        """What Registry() opens: the PostgreSQL URL if one is set, else the SQLite file."""
        return self.registry_url or self.registry_path

    def open_registry(self, **kwargs):
        """This hub's Registry, on whichever dialect fleet.toml names (imported here: config loads stay light)."""
        from hub.registry.store import Registry

        return Registry(self.registry_target, home=self.root, **kwargs)

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def crl_dir(self) -> Path:
        return self.root / "crl"

    @property
    def tls_dir(self) -> Path:
        return self.root / "tls"

    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"

    @property
    def admin_client_id(self) -> str:
        """The MQTT client id of this hub's own session: tessera-hub, or tessera-hub.<hub-id> for a hub joined to
        a fleet (its `hub-id` file, written by `init --join`), so hubs sharing a broker never take each other's
        session over (hub.authz.policy.HUB_CLIENT_ID_RE)."""
        path = self.root / "hub-id"
        try:
            hub_id = path.read_text(errors="replace").strip()
        except FileNotFoundError:
            return "tessera-hub"
        if not re.fullmatch(r"[0-9a-f]{8}", hub_id):
            raise ConfigError(f"{path} must hold this hub's id, 8 hex digits (written by tessera-hub init --join)")
        return f"tessera-hub.{hub_id}"

    @property
    def local_operator(self) -> str:
        """The name of this hub directory's operator identity (principal svc.<it>): local-admin, or
        local-admin-<hub-id> on a joined hub (each hub renews its own: a shared one renewed by one hub would leave
        the other's copy superseded)."""
        _, _, hub_id = self.admin_client_id.partition(".")
        return f"local-admin-{hub_id}" if hub_id else "local-admin"

    @property
    def admin_socket(self) -> Path:
        return self.root / "admin.sock"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    @property
    def crl_url(self) -> str:
        """The https distribution point: `public_url`, else the EST listener (https://<public_host>:<est port>)."""
        if self.public_url:
            return f"{self.public_url.rstrip('/')}/crl/device.crl"
        return f"https://{_authority(self.public_host)}:{self.est_port}/crl/device.crl"

    @property
    def crl_http_url(self) -> str | None:
        """The http distribution point: `crl_public_url`, else the plain-HTTP CRL listener; None when it is off."""
        if self.crl_public_url:
            return f"{self.crl_public_url.rstrip('/')}/crl/device.crl"
        if self.crl_http_port == 0:
            return None
        return f"http://{_authority(self.public_host)}:{self.crl_http_port or DEFAULT_CRL_HTTP_PORT}/crl/device.crl"

    @property
    def crl_urls(self) -> tuple[str, ...]:
        """Every new device certificate's CRL distribution points, in order: the http one first (RFC 5280 8),
        then the https one."""
        return tuple(dict.fromkeys(u for u in (self.crl_http_url, self.crl_url) if u))

    @property
    def workers(self) -> int:
        """The EST worker processes to run: `est_workers`, or for 0 the CPUs this process may use (capped)."""
        if self.est_workers:
            return self.est_workers
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
        return max(1, min(cpus, MAX_EST_WORKERS))

    @property
    def policy(self) -> Policy:
        return Policy(fleet=self.fleet, validity=timedelta(days=self.validity_days),
                      token_ttl=timedelta(days=self.token_ttl_days))

    @property
    def ca_token(self) -> TokenConfig | None:
        if self.ca_store != "pkcs11":
            return None
        return TokenConfig(label=self.ca_token_label, pin_source=self.ca_pin_source, module=self.ca_module,
                           softhsm_conf=self.ca_softhsm_conf)

    # --- persistence ---
    def to_toml(self) -> str:
        def q(value: str) -> str:
            return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

        names = ", ".join(q(n) for n in self.server_names)
        return "\n".join([
            "# Tessera fleet configuration (written by `tessera-hub init`).",
            "[fleet]", f"name = {q(self.fleet)}", "",
            "[issuance]", f"validity_days = {self.validity_days}", f"token_ttl_days = {self.token_ttl_days}",
            f"key_type = {q(self.key_type)}", "",
            "[est]", f"host = {q(self.est_host)}", f"port = {self.est_port}",
            f"public_host = {q(self.public_host)}", f"public_url = {q(self.public_url)}", f"server_names = [{names}]",
            f"rate_per_source = {self.rate_per_source}", f"rate_burst = {self.rate_burst}",
            f"failures_per_minute = {self.failures_per_minute}",
            "# failed attempts a minute per source address and for the whole hub (the above is per source and device)",
            f"source_failures_per_minute = {self.source_failures_per_minute}",
            f"global_failures_per_minute = {self.global_failures_per_minute}",
            "# connections at once per address; seconds from connect to the end of the headers, and of the request",
            f"max_connections_per_source = {self.max_connections_per_source}",
            f"header_timeout = {self.header_timeout}", f"request_timeout = {self.request_timeout}",
            f"# EST worker processes on the one EST port; 0: one per CPU, at most {MAX_EST_WORKERS}. The limits above "
            "are hub-wide: each worker gets 1/workers of them",
            f"workers = {self.est_workers}", "",
            "[mqtt]", f"port = {self.mqtt_port}",
            "# log every device message the hub sees to logs/device-messages.jsonl",
            f"telemetry_log = {'true' if self.telemetry_log else 'false'}",
            "# limits: bytes per message payload, bytes queued per client, connects per principal per minute",
            f"max_payload = {self.max_payload}", f"max_queued_bytes = {self.max_queued_bytes}",
            f"connect_rate = {self.connect_rate}", f"connect_burst = {self.connect_burst}",
            "# seconds a certificate replaced by a renewal may still connect (ends once the new one has connected)",
            f"supersede_grace_seconds = {self.supersede_grace_seconds}", "",
            "[crl]", "# CRLs over plain HTTP (RFC 5280: no TLS, so checking a certificate never depends on the PKI",
            f"# being checked). Default {DEFAULT_CRL_HTTP_PORT} (serve runs on without it when that port is taken);",
            "# 0: off, and new device certificates then name only the https distribution point (and public_url's)",
            f"http_port = {self.crl_http_port}" if self.crl_http_port is not None
            else f"# http_port = {DEFAULT_CRL_HTTP_PORT}",
            "# base of the http distribution point in new device certificates; empty: http://<public_host>:<http_port>",
            f"public_url = {q(self.crl_public_url)}", "",
            "[api]", "# the HTTPS fleet API (operators by client certificate); default 8444",
            f"port = {self.api_port}" if self.api_port is not None else "# port = 8444", "",
            "[ca]", "# store = \"file\" (keys in ca/, mode 0600) or \"pkcs11\" (keys in a token; PIN from pin_source)",
            f"store = {q(self.ca_store)}", f"module = {q(self.ca_module)}", f"token_label = {q(self.ca_token_label)}",
            f"pin_source = {q(self.ca_pin_source)}", f"softhsm_conf = {q(self.ca_softhsm_conf)}", "",
            "[broker]", "# kind = \"mosquitto\" (a child of serve) or \"rabbitmq\" (a cluster serve is pointed at; [mqtt] port",
            "# is a node's MQTT port): each node's management API URL, and the port of the hub's auth back end",
            f"kind = {q(self.broker_kind)}",
            f"management_urls = [{', '.join(q(u) for u in self.rabbitmq_management)}]",
            f"auth_port = {self.rabbitmq_auth_port}", "",
            "[registry]", "# empty: the SQLite file registry.sqlite3 in this directory; several hubs on one fleet share",
            "# postgresql+psycopg://user@host:port/db?passfile=... (with [broker] kind = \"rabbitmq\": docs/scale-out.md)",
            f"url = {q(self.registry_url)}", "",
        ])

    def save(self) -> None:
        tmp = self.toml_path.with_suffix(".tmp")
        tmp.write_text(self.to_toml())
        os.replace(tmp, self.toml_path)


def _positive(section: dict, key: str, default: int, allow_zero: bool = False, *, name: str = "mqtt") -> int:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ValueError(f"[{name}] {key} must be a {'non-negative' if allow_zero else 'positive'} integer")
    return value


def _workers(value: int) -> int:
    if value > 64:
        raise ValueError("[est] workers must be 0 (one per CPU) or at most 64")
    return value


def _authority(host: str) -> str:
    """A host as the authority part of a URL (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def check_http_base(url: str, what: str = "[crl] public_url") -> str:
    """A plain http:// base URL (no query, no fragment), without its trailing slash; ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"{what} must be a plain http base URL like http://crl.example.com, not {url[:200]!r}")
    return url.rstrip("/")


def _port(section: dict, key: str, name: str) -> int | None:
    value = section.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 65536):
        raise ValueError(f"[{name}] {key} must be a port number (0-65535)")
    return value


def _seconds(section: dict, key: str, default: float) -> float:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
        raise ValueError(f"[est] {key} must be a number of seconds (0 < s <= 3600)")
    return float(value)


def _broker(section: dict) -> dict:
    """[broker]: kind, management_urls (http(s) URLs, rabbitmq only, at least one), auth_port."""
    kind = section.get("kind", "mosquitto")
    if kind not in BROKER_KINDS:
        raise ValueError(f"[broker] kind must be one of {', '.join(BROKER_KINDS)}, not {str(kind)[:32]!r}")
    urls = section.get("management_urls", [])
    if not isinstance(urls, list) or not all(isinstance(u, str) and urlsplit(u).scheme in ("http", "https")
                                             and urlsplit(u).netloc for u in urls):
        raise ValueError("[broker] management_urls must be a list of http(s) URLs (one per RabbitMQ node)")
    if kind == "rabbitmq" and not urls:
        raise ValueError("[broker] kind = \"rabbitmq\" needs management_urls (one per node)")
    port = _port(section, "auth_port", "broker")
    if kind == "rabbitmq" and port == 0:
        raise ValueError("[broker] auth_port must be a fixed port: every node's configuration names it")
    return {"broker_kind": kind, "rabbitmq_management": urls,
            "rabbitmq_auth_port": DEFAULT_RABBITMQ_AUTH_PORT if port is None else port}


def load_config(root: Path) -> HubConfig:
    """Read fleet.toml from a hub directory; ConfigError if this is not a fleet directory."""
    path = root / "fleet.toml"
    if not path.is_file():
        raise ConfigError(f"{root} is not a Tessera fleet directory (no fleet.toml); "
                          "run `tessera-hub init` or pass --dir / set TESSERA_HUB_DIR")
    try:
        data = tomllib.loads(path.read_text())
        sections = ("fleet", "issuance", "est", "mqtt", "ca", "api", "crl", "broker")
        fleet, iss, est, mqtt, ca, api, crl, broker = (data.get(k, {}) for k in sections)
        api_port = api.get("port")
        if api_port is not None and (isinstance(api_port, bool) or not isinstance(api_port, int)
                                     or not 0 <= api_port < 65536):
            raise ValueError("[api] port must be a port number (0-65535)")
        cfg = HubConfig(
            root=root, fleet=fleet["name"],
            validity_days=int(iss.get("validity_days", 30)), token_ttl_days=int(iss.get("token_ttl_days", 7)),
            key_type=iss.get("key_type", "ec-p256"),
            est_host=est.get("host", "127.0.0.1"), est_port=int(est.get("port", 8443)),
            public_host=est.get("public_host", "localhost"), public_url=est.get("public_url", ""),
            server_names=list(est.get("server_names", ["localhost", "127.0.0.1"])),
            rate_per_source=float(est.get("rate_per_source", 100.0)), rate_burst=int(est.get("rate_burst", 200)),
            failures_per_minute=int(est.get("failures_per_minute", 30)),
            source_failures_per_minute=_positive(est, "source_failures_per_minute", 300, name="est"),
            global_failures_per_minute=_positive(est, "global_failures_per_minute", 3000, name="est"),
            max_connections_per_source=_positive(est, "max_connections_per_source", 32, name="est"),
            header_timeout=_seconds(est, "header_timeout", 10.0),
            request_timeout=_seconds(est, "request_timeout", 30.0),
            est_workers=_workers(_positive(est, "workers", 0, allow_zero=True, name="est")),
            mqtt_port=int(mqtt.get("port", 8883)), telemetry_log=bool(mqtt.get("telemetry_log", False)),
            max_payload=_positive(mqtt, "max_payload", 256 * 1024),
            max_queued_bytes=_positive(mqtt, "max_queued_bytes", 64 * 1024 * 1024),
            connect_rate=_positive(mqtt, "connect_rate", 30), connect_burst=_positive(mqtt, "connect_burst", 10),
            supersede_grace_seconds=_positive(mqtt, "supersede_grace_seconds", 300, allow_zero=True),
            api_port=api_port,
            crl_http_port=_port(crl, "http_port", "crl"),
            crl_public_url=check_http_base(crl["public_url"]) if crl.get("public_url") else "",
            ca_store=ca.get("store", "file"), ca_module=ca.get("module", ""),
            ca_token_label=ca.get("token_label", ""), ca_pin_source=ca.get("pin_source", ""),
            ca_softhsm_conf=ca.get("softhsm_conf", ""),
            **_broker(broker),
            registry_url=check_url(data.get("registry", {}).get("url", "")),
        )
        if cfg.registry_url and cfg.broker_kind != "rabbitmq":
            raise ValueError(PG_NEEDS_RABBITMQ)
        return cfg
    except (tomllib.TOMLDecodeError, KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not valid: {exc}") from None
