"""Agent configuration: /etc/tessera/agent.toml, every key overridable with --set key=value.

Every key, its default and its meaning are declared once, below (`_key`); docs/agent-toml.md is generated from
them (`python docs/generate.py`; a test fails when it is out of date).
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit

from hsm.token import TokenConfig

from .mqttproto import PROTOCOLS as MQTT_PROTOCOLS

DEFAULT_PATH = Path("/etc/tessera/agent.toml")


class ConfigError(Exception):
    """The agent configuration is missing or invalid; the message names the key."""


def _key(default, doc: str):
    """A configuration key: its default and the one line docs/agent-toml.md prints for it (docs/generate.py)."""
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class TokenSection:
    """The PKCS#11 token holding the device key."""
    module: str = _key("", "PKCS#11 module (.so) of the token; empty: the platform's SoftHSM2")
    label: str = _key("tessera", "token label")
    pin_source: str = _key("file:/etc/tessera/token-pin", "where the user PIN is: file:/path (0600) or env:NAME")
    softhsm_conf: str = _key("", "SoftHSM2 only: its config file (names the token directory); empty: SoftHSM2's "
                                 "own default")
    key_label: str = _key("device-key", "label of the device key pair in the token")
    key_type: str = _key("ec-p256", "type of a key the agent generates: ec-p256, ec-p384, rsa-2048 or rsa-3072")


@dataclass(frozen=True)
class TelemetrySection:
    """What the agent publishes on devices/<id>/telemetry."""
    interval: float = _key(30.0, "seconds between telemetry messages")
    source: str = _key("builtin", "builtin (uptime, load, memory, temperature where known) or an executable that "
                                  "prints one JSON object per run")


@dataclass(frozen=True)
class SpoolSection:
    """The disk spool: QoS 1 messages kept until the broker acknowledged them."""
    max_messages: int = _key(100_000, "messages kept at most")
    drop_policy: str = _key("oldest", "when full: oldest (drop the oldest message) or newest (refuse new ones)")


@dataclass(frozen=True)
class RenewalSection:
    """When the agent renews its certificate by itself."""
    fraction: float = _key(2 / 3, "renew once this fraction of the certificate's lifetime has passed")


@dataclass(frozen=True)
class MqttSection:
    """The MQTT protocol spoken to the broker (agent/mqttproto.py: how auto decides and what 3.1.1 changes)."""
    protocol: str = _key("auto", "auto (MQTT 5, falling back to 3.1.1 where the broker refuses 5, e.g. RabbitMQ; "
                                 "the choice is kept per broker address and MQTT 5 retried daily), 5 or 3.1.1")


@dataclass(frozen=True)
class AgentConfig:
    """The top-level keys of agent.toml."""
    device_id: str = _key("", "this device's id (the hub issues CN=<device_id>)")
    hub_url: str = _key("", "the hub's EST base URL, e.g. https://hub.example.com:8443")
    mqtt_host: str = _key("", "the broker's host; empty: hub_url's host")
    mqtt_port: int = _key(8883, "the broker's mTLS port")
    ca_file: str = _key("/var/lib/tessera-agent/fleet-root.pem", "the fleet root certificate: the only trust "
                                                                  "anchor")
    state_dir: str = _key("/var/lib/tessera-agent", "certificate, identity, status and spool (0700)")
    renew_command_min_interval: float = _key(600.0, "seconds between renewals asked for by a `renew` command "
                                                    "(0: no limit)")
    token: TokenSection = field(default_factory=TokenSection)
    telemetry: TelemetrySection = field(default_factory=TelemetrySection)
    spool: SpoolSection = field(default_factory=SpoolSection)
    renewal: RenewalSection = field(default_factory=RenewalSection)
    mqtt: MqttSection = field(default_factory=MqttSection)

    @property
    def token_config(self) -> TokenConfig:
        t = self.token
        return TokenConfig(label=t.label, pin_source=t.pin_source, module=t.module, softhsm_conf=t.softhsm_conf)

    @property
    def broker_host(self) -> str:
        return self.mqtt_host or (urlsplit(self.hub_url).hostname or "")

    @property
    def state(self) -> Path:
        return Path(self.state_dir)

    def require(self, *names: str) -> None:
        for name in names:
            if not getattr(self, name):
                raise ConfigError(f"configuration key {name!r} is not set")


_SECTIONS = {"token": TokenSection, "telemetry": TelemetrySection, "spool": SpoolSection, "renewal": RenewalSection,
             "mqtt": MqttSection}


def _coerce(cls, name: str, value, where: str):
    types = {f.name: f.type for f in fields(cls)}
    if name not in types:
        raise ConfigError(f"unknown configuration key {where}{name!r}")
    kind = types[name]
    try:
        if kind in ("int", int):
            return int(value)
        if kind in ("float", float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"configuration key {where}{name!r} must be a {kind}") from None


def _build(data: dict) -> AgentConfig:
    top, sections = {}, {}
    for key, value in data.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}] must be a table")
            sections[key] = _SECTIONS[key](**{k: _coerce(_SECTIONS[key], k, v, f"{key}.") for k, v in value.items()})
        else:
            top[key] = _coerce(AgentConfig, key, value, "")
    return AgentConfig(**top, **sections)


def config_path(path: Path | None = None) -> Path:
    """The configuration file in effect: `path`, else $TESSERA_AGENT_CONFIG, else /etc/tessera/agent.toml."""
    return path or Path(os.environ.get("TESSERA_AGENT_CONFIG", DEFAULT_PATH))


def load(path: Path | None = None, overrides: list[str] = (), missing_ok: bool = False) -> AgentConfig:
    """Read the TOML file (if it exists; a missing explicit path is an error unless `missing_ok`, as for `enroll`,
    which writes it) and apply key=value overrides."""
    path = config_path(path)
    data: dict = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
    elif path != DEFAULT_PATH and not missing_ok:
        raise ConfigError(f"configuration file {path} does not exist")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value")
        section, dot, name = key.partition(".")
        if dot:
            data.setdefault(section, {})[name] = value
        else:
            data[key] = value
    cfg = _build(data)
    if cfg.spool.drop_policy not in ("oldest", "newest"):
        raise ConfigError("spool.drop_policy must be 'oldest' or 'newest'")
    if not 0.1 <= cfg.renewal.fraction < 1.0:
        raise ConfigError("renewal.fraction must be in [0.1, 1.0)")
    if cfg.spool.max_messages < 1:
        raise ConfigError("spool.max_messages must be at least 1")
    if not cfg.telemetry.interval > 0:
        raise ConfigError("telemetry.interval must be positive (seconds)")
    if not (math.isfinite(cfg.renew_command_min_interval) and cfg.renew_command_min_interval >= 0):
        raise ConfigError("renew_command_min_interval must be a number of seconds >= 0")
    if cfg.mqtt.protocol not in MQTT_PROTOCOLS:
        raise ConfigError(f"mqtt.protocol must be one of {', '.join(MQTT_PROTOCOLS)}, not {cfg.mqtt.protocol[:32]!r}")
    if not 0 < cfg.mqtt_port < 65536:
        raise ConfigError("mqtt_port must be a TCP port number")
    return cfg


def render(cfg: AgentConfig, header: str = "") -> str:
    """`cfg` as agent.toml text (every key, defaults included), which load() reads back to the same config."""
    import json

    def value(v) -> str:
        return json.dumps(v) if isinstance(v, str) else repr(v)

    data = asdict(cfg)
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"{k} = {value(v)}" for k, v in data.items() if k not in _SECTIONS]
    for name in _SECTIONS:
        lines += ["", f"[{name}]", *(f"{k} = {value(v)}" for k, v in data[name].items())]
    return "\n".join(lines) + "\n"


def save(cfg: AgentConfig, path: Path, written_by: str) -> None:
    """Write `cfg` to `path` as agent.toml (0644, atomically; its directory made 0755 if missing). OSError."""
    from .state import write_atomic

    text = render(cfg, header=f"Tessera agent configuration for {cfg.device_id}, written by `tessera-agent "
                              f"{written_by}`.\nEvery key is listed with its value; docs/agent-toml.md says what "
                              "each means.")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    write_atomic(path, text.encode(), 0o644)


def to_dict(cfg: AgentConfig) -> dict:
    """The configuration as plain data (load_dict() reads it back), e.g. to hand it to a child process."""
    return asdict(cfg)


def load_dict(data: dict) -> AgentConfig:
    return _build(data)
