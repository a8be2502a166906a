"""Shared pieces of the `tessera-hub` commands: consoles, --dir, config/registry loading, one-line errors."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from hub.config import ConfigError, HubConfig, hub_dir, load_config
from hub.ca.policy import PolicyError, check_device_id

# soft_wrap: errors and status lines stay one line each when the output is not a terminal (logs, scripts)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

DirOpt = typer.Option(None, "--dir", help="Hub directory [default: $TESSERA_HUB_DIR, else ./tessera-hub].",
                      show_default=False)


def safe(value: object) -> "Text":
    """Attacker-influenced text for a terminal: no Rich markup, control and bidi characters shown as escapes."""
    from rich.text import Text

    text = "" if value is None else str(value)
    return Text("".join(c if c.isprintable() and not 0x202a <= ord(c) <= 0x202e and not 0x2066 <= ord(c) <= 0x2069
                        else c.encode("unicode_escape").decode("ascii") for c in text))


def now() -> datetime:
    return datetime.now(timezone.utc)


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def config(directory: Optional[Path]) -> HubConfig:
    try:
        return load_config(hub_dir(directory))
    except ConfigError as exc:
        fail(str(exc))


def registry(cfg: HubConfig):
    from hub.registry.store import Registry

    return Registry(cfg.registry_path)


def device_id_arg(device_id: str) -> str:
    try:
        return check_device_id(device_id)
    except PolicyError as exc:
        fail(str(exc))


def errors():
    """Exception types the CLI turns into one clean error line."""
    from hsm.errors import HsmError

    from hub.serve.admin import AdminError
    from hub.ca.authority import CaError
    from hub.ca.crl import CrlError
    from hub.registry.store import RegistryError

    return (RegistryError, CaError, CrlError, HsmError, PolicyError, ConfigError, AdminError, OSError)
