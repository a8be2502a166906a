"""Shared pieces of the `tessera-hub` commands: consoles, options (--dir, --hub, --json), config/registry loading,
one-line errors, JSON and 80-column table output, the API client for a command."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import unicodedata
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

DirOpt = typer.Option(None, "--dir", help="Hub directory \\[default: $TESSERA_HUB_DIR, else ./tessera-hub].",
                      show_default=False)
HubOpt = typer.Option(None, "--hub", envvar="TESSERA_HUB", show_default=False,
                      help="Fleet API of a remote hub, e.g. https://hub.example:8444 (credential from "
                           "~/.config/tessera/cli.toml) \\[default: $TESSERA_HUB, cli.toml's hub, else the local hub].")
ProfileOpt = typer.Option(None, "--profile", envvar="TESSERA_PROFILE", show_default=False,
                          help="A \\[profiles.NAME] table of ~/.config/tessera/cli.toml (hub, cert, key, ca).")
JsonOpt = typer.Option(False, "--json", help="Print JSON.")

TABLE_WIDTH = 80


def safe(value: object) -> "Text":
    """Attacker-influenced text for a terminal: no Rich markup, control and bidi characters shown as escapes."""
    from rich.text import Text

    text = "" if value is None else str(value)
    return Text("".join(c if c.isprintable() and not 0x202a <= ord(c) <= 0x202e and not 0x2066 <= ord(c) <= 0x2069
                        else c.encode("unicode_escape").decode("ascii") for c in text))


def now() -> datetime:
    return datetime.now(timezone.utc)


def fail(message: str, code: int = 1) -> None:
    """One error line on stderr; the message is escaped (it can hold names, paths, config sections such as
    `[registry]`, subjects), so Rich never reads markup out of it."""
    err.print(f"[bold red]error:[/] {_escape(message)}", highlight=False)
    raise typer.Exit(code)


def config(directory: Optional[Path]) -> HubConfig:
    try:
        return load_config(hub_dir(directory))
    except ConfigError as exc:
        fail(str(exc))


def registry(cfg: HubConfig):
    """The hub's registry for a command that works on it directly (not through the API). A shared (PostgreSQL)
    registry must be this fleet's, as serve and the in-process API check (hub.serve.guard.check_registry: another
    audit key would break the chain for every hub); an unreachable one is one error line, not a traceback."""
    from hub.serve.guard import check_registry

    try:
        reg = cfg.open_registry()
    except errors() as exc:
        fail(str(exc))
    try:
        check_registry(cfg, reg)
    except errors() as exc:
        reg.close()
        fail(str(exc))
    return reg


def device_id_arg(device_id: str) -> str:
    try:
        return check_device_id(device_id)
    except PolicyError as exc:
        fail(str(exc))


def command_args(items: list[str], option: str = "--arg") -> dict[str, object]:
    """Command arguments from repeated `--arg`: key=value (the value as text) or a bare key, a flag that is true
    (`--arg rotate_key` is rotate_key=true)."""
    args: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key or key != key.strip():
            fail(f"{option} {item!r} is not an argument: give key=value, or key alone for a flag (key=true)")
        args[key] = value if sep else True
    return args


def errors():
    """Exception types the CLI turns into one clean error line."""
    from hsm.errors import HsmError

    from hub.serve.admin import AdminError
    from hub.ca.authority import CaError
    from hub.ca.crl import CrlError
    from hub.registry.store import RegistryError

    return (RegistryError, CaError, CrlError, HsmError, PolicyError, ConfigError, AdminError, OSError)


# --- output -------------------------------------------------------------------------------------------------------

def print_json(data: object) -> None:
    """JSON on stdout (indented; parseable whatever the terminal)."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _clean(value: object) -> str:
    """A cell: one line, control and bidi characters as escapes (attacker-influenced text reaches a terminal)."""
    text = "-" if value is None or value == "" else str(value)
    return "".join(c if c.isprintable() and not 0x202a <= ord(c) <= 0x202e and not 0x2066 <= ord(c) <= 0x2069
                   else c.encode("unicode_escape").decode("ascii") for c in text)


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _cut(text: str, width: int) -> str:
    if _width(text) <= width:
        return text + " " * (width - _width(text))
    out, used = [], 0
    for c in text:
        w = _width(c)
        if used + w > width - 1:
            break
        out.append(c)
        used += w
    return "".join(out) + "\u2026" + " " * (width - 1 - used)


def table_widths(rows: list[dict], columns: list[tuple], width: int = TABLE_WIDTH) -> list[int]:
    """Column widths for rows in at most `width` columns: the widest columns give way first (not below a column's
    optional third element, its minimum width, while others can). `columns`: (row key, header[, minimum width])."""
    cells = [[_clean(r.get(col[0])) for col in columns] for r in rows]
    heads = [col[1] for col in columns]
    widths = [max([_width(h), *(_width(row[i]) for row in cells)]) for i, h in enumerate(heads)]
    budget = width - 2 * (len(columns) - 1)
    floor = [min(w, col[2] if len(col) > 2 else max(4, _width(h))) for w, h, col in zip(widths, heads, columns)]
    while sum(widths) > budget:
        i = max(range(len(widths)), key=lambda n: (widths[n] - floor[n], widths[n]))
        if widths[i] <= floor[i]:
            floor = [max(1, f - 1) for f in floor]
            if all(w <= 1 for w in widths):
                break
            continue
        widths[i] -= 1
    return widths


def table_lines(rows: list[dict], columns: list[tuple], width: int = TABLE_WIDTH, header: bool = True,
                widths: list[int] | None = None) -> list[str]:
    """Rows as aligned text lines of at most `width` columns (`table_widths`, unless `widths` are given: e.g. a
    later page of a listing keeps the first page's); cut cells end in an ellipsis, a cell never wraps."""
    widths = widths or table_widths(rows, columns, width)
    body = [[_clean(r.get(col[0])) for col in columns] for r in rows]
    return ["  ".join(_cut(c, w) for c, w in zip(row, widths)).rstrip()
            for row in ([[col[1] for col in columns]] if header else []) + body]


def table_width() -> int:
    """80 columns, or fewer on a narrower terminal."""
    width = TABLE_WIDTH
    if sys.stdout.isatty():
        with contextlib.suppress(OSError):
            width = min(width, os.get_terminal_size(sys.stdout.fileno()).columns)
    return width


def print_table(rows: list[dict], columns: list[tuple], widths: list[int] | None = None) -> None:
    """A plain text table on stdout, every line at most 80 columns (whatever the terminal)."""
    sys.stdout.write("\n".join(table_lines(rows, columns, table_width(), widths=widths)) + "\n")
    sys.stdout.flush()


def say(text: str) -> None:
    """One plain line on stdout (escaped: it can hold names from the registry)."""
    sys.stdout.write(_clean(text) + "\n")
    sys.stdout.flush()


# --- the fleet API ------------------------------------------------------------------------------------------------

def api_fail(exc: Exception) -> None:
    """An ApiError (or a credential problem) as the CLI's one error line; exit 1."""
    err.print(f"[bold red]error:[/] {_escape(str(exc))}", highlight=False)
    raise typer.Exit(1)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(_clean(text))


@contextlib.contextmanager
def api_errors():
    """Turn an ApiError raised inside into the one-line error + exit 1."""
    from hub.cli.client import ApiError

    try:
        yield
    except ApiError as exc:
        api_fail(exc)


@contextlib.contextmanager
def api(directory: Optional[Path], hub: Optional[str], profile: Optional[str] = None):
    """The API client for a command (closed afterwards; its errors are one line + exit 1)."""
    from hub.cli.client import connect

    with api_errors():
        client = connect(directory, hub, profile)
        try:
            yield client
        finally:
            client.close()
