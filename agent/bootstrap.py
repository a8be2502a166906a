"""`tessera-agent bootstrap --bundle DIR`: one command from a factory bundle to an enrolled device, safe to re-run.

A bundle (`tessera-hub bundle`) holds agent.toml, fleet-root.pem and the one-time enroll-token. Bootstrap does what
provision-device.sh does, in order, each step only if it is still to do:

1. the configuration: the bundle's agent.toml (with any --set overrides) unless the target config file already
   exists, in which case that one is used, and it must name the bundle's device;
2. the fleet root: copied to `ca_file` (0644) unless the same certificate is there; a different one is refused
   (before anything else is made);
3. the token PIN: a `file:` PIN source that does not exist yet is created (32 random hex characters, 0600); an
   `env:` source must be set;
4. the token: with no `[token] module` (SoftHSM2), its config is created where it is missing and the token
   initialized unless a token with that label exists; a hardware token (a module set) is left to its vendor's tool;
5. enrollment (agent/enroll.py): the key is generated in the token, the certificate stored, the token file
   destroyed; an identity already valid for this device means there is nothing to do;
6. the configuration file written (0644) if it did not exist.

Every step says what it did or why it did nothing; a second run changes nothing and says so. Nothing secret is
printed: the PIN goes only into its file.
"""

from __future__ import annotations

import os
import secrets
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .config import AgentConfig, ConfigError, load, save

BUNDLE_FILES = ("agent.toml", "fleet-root.pem")
TOKEN_NAME = "enroll-token"


class BootstrapError(Exception):
    """A step cannot be done; the message says which and what to do. Nothing after it was attempted."""


@dataclass
class Report:
    """What bootstrap did, a line a step; `changed` is False when a re-run found everything in place."""
    lines: list[str] = field(default_factory=list)
    changed: bool = False

    def did(self, line: str) -> None:
        self.lines.append(line)
        self.changed = True

    def kept(self, line: str) -> None:
        self.lines.append(line)


def _bundle_device(bundle: Path) -> str:
    missing = [name for name in BUNDLE_FILES if not (bundle / name).is_file()]
    if missing:
        raise BootstrapError(f"{bundle} is not a factory bundle (no {', '.join(missing)}; `tessera-hub bundle` "
                             "writes one directory per device)")
    try:
        data = tomllib.loads((bundle / "agent.toml").read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BootstrapError(f"{bundle / 'agent.toml'}: not a readable TOML file ({exc})") from None
    device_id = data.get("device_id")
    if not isinstance(device_id, str) or not device_id:
        raise BootstrapError(f"{bundle / 'agent.toml'} names no device_id")
    return device_id


def load_config(bundle: Path, config_path: Path, overrides: list[str]) -> tuple[AgentConfig, bool]:
    """The configuration to bootstrap with, and whether the config file exists already."""
    device_id = _bundle_device(bundle)
    exists = config_path.exists()
    try:
        cfg = load(config_path if exists else bundle / "agent.toml", overrides)
    except ConfigError as exc:
        raise BootstrapError(str(exc)) from None
    if cfg.device_id != device_id:
        raise BootstrapError(f"{config_path} is the configuration of device {cfg.device_id!r}, the bundle is for "
                             f"{device_id!r}: refusing to mix them (give another --config)")
    return cfg, exists


def ensure_pin(cfg: AgentConfig, report: Report) -> None:
    source = cfg.token.pin_source
    kind, _, where = source.partition(":")
    if kind == "env":
        if not os.environ.get(where):
            raise BootstrapError(f"PIN source {source}: the environment variable {where} is not set")
        report.kept(f"token PIN: from ${where}")
        return
    if kind != "file" or not where:
        raise BootstrapError(f"token.pin_source must be file:/path or env:NAME, not {source!r}")
    path = Path(where)
    if path.exists():
        report.kept(f"token PIN: {path} (kept)")
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(16) + "\n")
    except OSError as exc:
        raise BootstrapError(f"cannot create the token PIN file {path}: {exc.strerror or exc}") from None
    report.did(f"token PIN: created {path} (0600, random)")


def ensure_token(cfg: AgentConfig, report: Report) -> None:
    from hsm.errors import HsmError
    from hsm.softhsm import ensure_conf
    from hsm.token import default_module, read_pin
    from hsm.tokeninit import TokenExists, init_token

    t = cfg.token
    if t.module:
        report.kept(f"token {t.label!r}: module {t.module} (a hardware token: initialize it with its vendor's tool)")
        return
    try:
        if t.softhsm_conf and ensure_conf(t.softhsm_conf):
            report.did(f"SoftHSM2 config: created {t.softhsm_conf} (token directory next to it)")
        env = dict(os.environ, **({"SOFTHSM2_CONF": t.softhsm_conf} if t.softhsm_conf else {}))
        init_token(default_module(), t.label, so_pin=secrets.token_hex(16), user_pin=read_pin(t.pin_source),
                   env=env)
    except TokenExists:
        report.kept(f"token {t.label!r}: exists (kept)")
        return
    except HsmError as exc:
        raise BootstrapError(f"token {t.label!r}: {exc}") from None
    report.did(f"token {t.label!r}: initialized (SoftHSM2)")


def ensure_root(cfg: AgentConfig, bundle: Path, report: Report) -> None:
    from .state import write_atomic

    root = (bundle / "fleet-root.pem").read_bytes()
    target = Path(cfg.ca_file)
    if target.exists():
        if target.read_bytes() != root:
            raise BootstrapError(f"{target} holds another fleet root than the bundle's: refusing to replace a trust "
                                 "anchor (remove it if this device changes fleets)")
        report.kept(f"fleet root: {target} (kept)")
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(target, root, 0o644)
    except OSError as exc:
        raise BootstrapError(f"cannot write the fleet root {target}: {exc.strerror or exc}") from None
    report.did(f"fleet root: {target}")


def ensure_enrolled(cfg: AgentConfig, bundle: Path, report: Report) -> None:
    from hsm.errors import HsmError

    from .enroll import AlreadyEnrolled, EnrollError, enroll
    from .state import StateError

    token_file = bundle / TOKEN_NAME
    try:
        from .state import load_identity

        ident = load_identity(cfg.state) if cfg.state.exists() else None
    except StateError as exc:
        raise BootstrapError(str(exc)) from None
    if ident is None and not token_file.exists():
        raise BootstrapError(f"not enrolled and no {token_file} (its one-time token was used or removed: ask the "
                             "fleet manager for a fresh token, `tessera-hub device token ID`)")
    try:
        ident = enroll(cfg, token_file, Path(cfg.ca_file))
    except AlreadyEnrolled as exc:
        report.kept(f"enrollment: {exc}")
        return
    except (EnrollError, HsmError, ConfigError, StateError, OSError) as exc:
        raise BootstrapError(f"enrollment: {exc}") from None
    report.did(f"enrolled {ident.device_id}: certificate {ident.serial[:16]}… valid until {ident.not_after[:19]}Z "
               f"(key {ident.key_uri}); {token_file} destroyed")


def write_config(cfg: AgentConfig, config_path: Path, report: Report) -> None:
    try:
        save(cfg, config_path, "bootstrap")
    except OSError as exc:
        raise BootstrapError(f"cannot write {config_path}: {exc.strerror or exc}") from None
    report.did(f"configuration: wrote {config_path}")


def bootstrap(bundle: Path, config_path: Path, overrides: list[str] = ()) -> Report:
    """Run every step (module docstring); BootstrapError at the first that cannot be done."""
    report = Report()
    cfg, config_exists = load_config(bundle, config_path, list(overrides))
    if config_exists:
        report.kept(f"configuration: {config_path} (kept)")
    ensure_root(cfg, bundle, report)  # first: another fleet's root already here is refused before anything is made
    ensure_pin(cfg, report)
    ensure_token(cfg, report)
    ensure_enrolled(cfg, bundle, report)
    if not config_exists:
        write_config(cfg, config_path, report)
    return report
