"""Roles in the registry: list, show, define or redefine (audited; every live session is re-checked at once).

A role is data: a name and its (action, topic pattern) rules (hub/authz/policy.py says what they mean). Defining
a role writes its rules and an authz event for every principal in one transaction; the broker plugin reloads the
rights of every live session from that event, so no broker needs code or a restart for a new or changed role.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Iterable

from hub.registry import sql as dbsql
from hub.registry.store import Registry, RegistryError

from .policy import AuthzError, check_name, check_rules

#: The hub's own rights are not for editing: a broken hub role would cut the hub off its own broker.
FIXED_ROLES = ("hub",)


class RoleError(RegistryError):
    code = "role_error"


def parse_rule(text: str) -> tuple[str, str]:
    """'publish:devices/{id}/logs' -> ('publish', 'devices/{id}/logs')."""
    action, sep, pattern = text.partition(":")
    if not sep:
        raise RoleError(f"rule {text!r} is not ACTION:PATTERN (e.g. receive:devices/+/telemetry)", "invalid_rule")
    return action.strip(), pattern.strip()


def list_roles(registry: Registry) -> list[dict[str, Any]]:
    return registry.query("SELECT r.name, r.description, (SELECT COUNT(*) FROM role_rules x WHERE x.role = r.name) "
                          "AS rules, (SELECT COUNT(*) FROM identities i WHERE i.role = r.name) AS identities "
                          "FROM roles r ORDER BY r.name")


def get_role(registry: Registry, name: str) -> dict[str, Any]:
    rows = registry.query("SELECT name, description FROM roles WHERE name = ?", [name])
    if not rows:
        raise RoleError(f"no role {name!r}", "unknown_role")
    role = rows[0]
    role["rules"] = [(r["action"], r["pattern"]) for r in registry.query(
        "SELECT action, pattern FROM role_rules WHERE role = ? ORDER BY action, pattern", [name])]
    return role


def set_role(registry: Registry, name: str, rules: Iterable[tuple[str, str]], now: datetime, actor: str = "cli",
             description: str | None = None) -> dict[str, Any]:
    """Create the role or replace all its rules; every live session is re-checked by the brokers at once."""
    try:
        check_name(name, "role name")
        checked = sorted(set(check_rules(rules)))
    except AuthzError as exc:
        raise RoleError(str(exc), "invalid_rule") from None
    if name in FIXED_ROLES:
        raise RoleError(f"role {name!r} is the hub's own and cannot be changed", "fixed_role")
    with registry.write() as db:
        exists = db.execute("SELECT description FROM roles WHERE name = ?", [name]).fetchone()
        if exists is None:
            db.execute("INSERT INTO roles (name, description) VALUES (?, ?)", [name, description or ""])
        elif description is not None:
            db.execute("UPDATE roles SET description = ? WHERE name = ?", [description, name])
        db.execute("DELETE FROM role_rules WHERE role = ?", [name])
        dbsql.executemany(db, "INSERT INTO role_rules (role, action, pattern) VALUES (?, ?, ?)",
                          [(name, a, p) for a, p in checked])
        registry._audit_row(db, "role.set", "ok", now, actor, None,
                            f"role={name} rules: " + "; ".join(f"{a}:{p}" for a, p in checked))
        registry.authz_event(db, None, f"role {name} changed", now)
    return get_role(registry, name)
