"""`tessera-hub role ...`: the MQTT roles as data — list, show, and define or redefine a role's rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from hub.cli.util import DirOpt, config, errors, fail, now, out, registry

role_app = typer.Typer(help="MQTT roles: topic rules with {id} and {group} placeholders, enforced by the broker.",
                       no_args_is_help=True)


@role_app.command("list")
def role_list(directory: Optional[Path] = DirOpt,
              as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Every role with its number of rules and of service identities holding it."""
    from hub.authz.roles import list_roles

    reg = registry(config(directory))
    rows = list_roles(reg)
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table("role", "rules", "identities", "description")
    for r in rows:
        table.add_row(escape(r["name"]), str(r["rules"]), str(r["identities"]), escape(r["description"]))
    out.print(table)


@role_app.command("show")
def role_show(name: str = typer.Argument(..., help="Role name."), directory: Optional[Path] = DirOpt,
              as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """A role's rules, one `action:pattern` per line."""
    from hub.authz.roles import get_role

    reg = registry(config(directory))
    try:
        role = get_role(reg, name)
    except errors() as exc:
        fail(str(exc))
    if as_json:
        out.print_json(json.dumps(role))
        return
    for action, pattern in role["rules"]:
        out.print(f"{action}:{pattern}", markup=False, highlight=False)


@role_app.command("set")
def role_set(
    name: str = typer.Argument(..., help="Role name (a-z, 0-9, '-')."),
    rule: list[str] = typer.Option(..., "--rule", help="ACTION:PATTERN, repeatable; ACTION is publish, retain, "
                                   "subscribe or receive; PATTERN may use {id} and {group}."),
    description: Optional[str] = typer.Option(None, help="What the role is for."),
    directory: Optional[Path] = DirOpt,
) -> None:
    """Create a role or replace all its rules. Live sessions holding it get the new rights at once."""
    from hub.serve import admin
    from hub.authz.roles import parse_rule, set_role

    cfg = config(directory)
    reg = registry(cfg)
    try:
        role = set_role(reg, name, [parse_rule(r) for r in rule], now(), description=description)
    except errors() as exc:
        fail(str(exc))
    try:  # ring the broker so the change bites now (it follows the registry by itself within a tick anyway)
        admin.call(cfg.admin_socket, {"op": "authz_sync"}, timeout=5)
    except (admin.AdminUnavailable, admin.AdminError):
        pass
    out.print(f"role {role['name']}: {len(role['rules'])} rule(s)", markup=False, highlight=False)
