"""Roles as data: each role is a list of (action, topic pattern) rules with `{id}` and `{group}` placeholders.

This is the one place the MQTT policy is written down. The registry seeds its `role_rules` table from
`DEFAULT_ROLES`; the Mosquitto plugin (hub/broker/mosquitto/tessera_authz.c) reads that table and enforces it in
the broker; another broker driver (RabbitMQ's HTTP auth back end) serves the same rules through `allows()` here.
Adding or changing a role is a registry write, never code in a broker.

Actions:
  publish    PUBLISH to a topic matching the pattern
  retain     PUBLISH with the retain flag (needs a publish rule too)
  subscribe  SUBSCRIBE with a filter the pattern covers (every topic the filter can match is matched by the pattern)
  receive    be delivered a message (live or retained) on a topic matching the pattern

Placeholders: `{id}` is the principal's own name; `{group}` expands to one rule per group the principal belongs
to (none when it has no groups). Names and groups are validated (`check_name`) so substitution can never bring in
a wildcard, a level separator or a `$`. Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

ACTIONS = ("publish", "retain", "subscribe", "receive")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
#: The principal name of a service identity is this prefix + its name: a device id can never contain a '.', so
#: the two namespaces never meet (client ids, usernames and kicks are by principal name).
SERVICE_PREFIX = "svc."
HUB_PRINCIPAL = "tessera-hub"
#: The MQTT client ids the hub principal may use: its own name (the first hub of a fleet), or its name and a
#: hub-id (each further hub of one fleet on a shared registry: `init --join` writes hub-id), so two hubs'
#: sessions never take each other over. Every other principal's client id is its name.
HUB_CLIENT_ID_RE = re.compile(r"tessera-hub(\.[0-9a-f]{8})?")
#: The control topic the plugin answers on (the hub's identity only; see the plugin's README section).
CONTROL_TOPIC = "$CONTROL/tessera/v1"
CONTROL_RESPONSE = CONTROL_TOPIC + "/response"
SENDER_PROPERTY = "tessera-sender"
ROLE_PROPERTY = "tessera-role"


class AuthzError(ValueError):
    """A name, role or rule the policy refuses (message is safe to show)."""


def _both(pattern: str) -> list[tuple[str, str]]:
    return [("subscribe", pattern), ("receive", pattern)]


_DEVICE = [
    ("publish", "devices/{id}/telemetry"), ("publish", "devices/{id}/events"),
    ("publish", "devices/{id}/status"), ("retain", "devices/{id}/status"),
    ("publish", "devices/{id}/commands/ack"),
    *_both("devices/{id}/commands"), *_both("fleet/groups/{group}/#"),
]
_READER = [*_both("devices/+/telemetry"), *_both("devices/+/status"), *_both("devices/+/events")]
_COMMANDER = [("publish", "devices/+/commands"), ("publish", "fleet/groups/+/#"),
              *_both("devices/+/commands/ack"), *_both("devices/+/status")]

#: role -> rules. `hub` is the hub's own identity (presence, acks, commands, broker control); it cannot be granted.
DEFAULT_ROLES: dict[str, tuple[tuple[str, str], ...]] = {
    "device": tuple(_DEVICE),
    "telemetry-reader": tuple(_READER),
    "commander": tuple(_COMMANDER),
    "admin": tuple(dict.fromkeys([*_READER, *_COMMANDER])),
    "hub": tuple(dict.fromkeys([*_READER, *_COMMANDER, ("publish", CONTROL_TOPIC),
                                *_both(CONTROL_RESPONSE)])),
    # operators of the HTTPS fleet API (hub/api/): no broker rights of their own
    "viewer": (),
    "operator": (),
}
#: Roles that `identity add --role` may grant (device is implied by the device CA, hub by the hub's own cert).
GRANTABLE_ROLES = ("telemetry-reader", "commander", "admin", "viewer", "operator")

#: The HTTPS fleet API's permissions (hub/api/): every route declares one; a role not listed here has none.
API_PERMISSION_NAMES = ("read", "act", "admin")
API_PERMISSIONS: dict[str, frozenset[str]] = {
    "viewer": frozenset({"read"}),
    "operator": frozenset({"read", "act"}),
    "admin": frozenset({"read", "act", "admin"}),
}
#: Roles whose messages a device accepts as commands (the plugin stamps the sender's role on every message).
COMMANDER_ROLES = ("commander", "admin", "hub")


def check_name(name: str, what: str = "name") -> str:
    """A device id, group name, label key or service identity name: 1-63 of a-z, 0-9, '-', not starting with '-'."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise AuthzError(f"invalid {what} {name!r}: use 1-63 characters a-z, 0-9 and '-', "
                         "starting with a letter or digit")
    return name


def check_groups(groups: Iterable[str]) -> list[str]:
    out = [check_name(g, "group name") for g in groups]
    return list(dict.fromkeys(out))


_LABEL_VALUE_RE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,126}[\x21-\x7e])?")


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Label keys like names; values 1-128 printable ASCII characters (no control characters, no edge spaces)."""
    out = {}
    for key, value in labels.items():
        check_name(key, "label key")
        if not isinstance(value, str) or not _LABEL_VALUE_RE.fullmatch(value):
            raise AuthzError(f"invalid value for label {key!r}: 1-128 printable ASCII characters")
        out[key] = value
    return out


def client_id_allowed(principal: str, client_id: str) -> bool:
    """May `principal` connect with MQTT client id `client_id`?"""
    if principal == HUB_PRINCIPAL:
        return HUB_CLIENT_ID_RE.fullmatch(client_id) is not None
    return client_id == principal


def service_principal(name: str) -> str:
    return SERVICE_PREFIX + check_name(name, "identity name")


def check_pattern(pattern: str) -> str:
    """A rule pattern: a valid MQTT filter whose placeholders fill whole levels."""
    if not isinstance(pattern, str) or not pattern or len(pattern) > 256:
        raise AuthzError(f"invalid topic pattern {pattern!r}")
    levels = pattern.split("/")
    for n, level in enumerate(levels):
        if level in ("+", "{id}", "{group}") or (level == "#" and n == len(levels) - 1):
            continue
        if any(c in level for c in "+#{}\x00") or not level and n == 0:
            raise AuthzError(f"invalid topic pattern {pattern!r}: level {level!r}")
    return pattern


def check_rules(rules: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    out = []
    for action, pattern in rules:
        if action not in ACTIONS:
            raise AuthzError(f"unknown action {action!r} (one of {', '.join(ACTIONS)})")
        out.append((action, check_pattern(pattern)))
    return tuple(out)


@dataclass(frozen=True)
class Grants:
    """A principal's rules with placeholders filled in: action -> tuple of concrete patterns."""

    publish: tuple[str, ...] = ()
    retain: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    receive: tuple[str, ...] = ()


def expand(rules: Iterable[tuple[str, str]], principal: str, groups: Sequence[str] = ()) -> Grants:
    """Fill `{id}` with the principal and `{group}` with each group (rules naming a group vanish without groups)."""
    out: dict[str, list[str]] = {a: [] for a in ACTIONS}
    for action, pattern in rules:
        if "{group}" in pattern:
            out[action] += [pattern.replace("{id}", principal).replace("{group}", g) for g in groups]
        else:
            out[action].append(pattern.replace("{id}", principal))
    return Grants(**{a: tuple(dict.fromkeys(p)) for a, p in out.items()})


def valid_topic(topic: str) -> bool:
    """A PUBLISH topic: not empty, no wildcards, no NUL (MQTT 4.7.3)."""
    return bool(topic) and not any(c in topic for c in "+#\x00")


def valid_filter(flt: str) -> bool:
    """A subscription filter: `+` only as a whole level, `#` only as the whole last level (MQTT 4.7.1)."""
    if not flt or "\x00" in flt:
        return False
    levels = flt.split("/")
    for n, level in enumerate(levels):
        if ("+" in level and level != "+") or ("#" in level and (level != "#" or n != len(levels) - 1)):
            return False
    return True


def _dollar_mismatch(pattern: str, name: str) -> bool:
    """MQTT 4.7.2: a filter starting with a wildcard never matches a topic starting with '$'."""
    return name.startswith("$") and pattern[:1] in ("+", "#")


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT matching of a concrete topic against a filter (`+` one level, `#` the rest, including the parent).

    A topic without wildcards is a filter that matches only itself, so matching is coverage (below)."""
    return valid_topic(topic) and filter_covered(pattern, topic)


def filter_covered(pattern: str, flt: str) -> bool:
    """True if every topic the subscription filter `flt` can match is matched by `pattern`."""
    if _dollar_mismatch(pattern, flt):
        return False
    p, f = pattern.split("/"), flt.split("/")
    for n, level in enumerate(p):
        if level == "#":
            return True
        if n >= len(f):
            return False
        if f[n] == "#":
            return False
        if level == "+":
            continue
        if f[n] == "+" or f[n] != level:
            return False
    return len(p) == len(f)


def strip_share(flt: str) -> str | None:
    """The filter inside `$share/<name>/<filter>`, the filter itself otherwise; None for a malformed share."""
    if not flt.startswith("$share/"):
        return flt
    parts = flt.split("/", 2)
    if len(parts) < 3 or not parts[1] or not parts[2] or "+" in parts[1] or "#" in parts[1]:
        return None
    return parts[2]


def allows(grants: Grants, action: str, topic: str, retain: bool = False) -> bool:
    """The decision every enforcement point makes, in Python (the plugin's C code makes the same one)."""
    if action in ("publish", "receive") and not valid_topic(topic):
        return False
    if action == "publish":
        ok = any(topic_matches(p, topic) for p in grants.publish)
        return ok and (not retain or any(topic_matches(p, topic) for p in grants.retain))
    if action == "receive":
        return any(topic_matches(p, topic) for p in grants.receive)
    if action == "subscribe":
        inner = strip_share(topic)
        return inner is not None and valid_filter(inner) and any(filter_covered(p, inner) for p in grants.subscribe)
    raise AuthzError(f"unknown action {action!r}")
