"""Device command handling (pure): who may command, parse a command message, run its handler, build the JSON ack.

Command: ``{"id": "<= 64 chars", "command": "name", "args": {...}}`` (args optional), at most 16 KiB.
Ack: ``{"id": ..., "ok": true, "result": {...}, "ts": ...}`` or ``{"id": ..., "ok": false, "error": "...", "ts": ...}``.

A message runs only if it is live (not retained) and the broker stamped it as sent by a commander principal
(`command_refusal`): the Tessera broker plugin strips every client-supplied MQTT 5 property from a PUBLISH and adds
`tessera-sender` and `tessera-role`, so those two cannot be forged by the publisher. On MQTT 3.1.1 (no properties,
e.g. RabbitMQ) the broker's publish permissions are the only sender check: only commander roles may publish on a
device's commands topic (agent/mqttproto.py, MQTT311_CONTRACT). The ack names the command's id either way, so the
hub correlates acks by payload on both protocols.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

MAX_PAYLOAD = 16 * 1024
MAX_ID_LEN = 64
MAX_ERROR_LEN = 1024

Handler = Callable[[dict[str, Any]], dict[str, Any]]

# Copies of hub/authz/policy.py's SENDER_PROPERTY, ROLE_PROPERTY and COMMANDER_ROLES (the agent must not import the
# hub package); tests/unit/test_agent_commands.py checks that they still match.
SENDER_PROPERTY = "tessera-sender"
ROLE_PROPERTY = "tessera-role"
COMMANDER_ROLES = ("commander", "admin", "hub")
SHOWN_CHARS = 64  # how much of a sender-supplied value a log line shows


def _shown(value: object) -> str:
    """`value` for a log line: repr-escaped (no control characters reach the log) and truncated."""
    text = value if isinstance(value, str) else str(value)
    return repr(text[:SHOWN_CHARS]) + ("..." if len(text) > SHOWN_CHARS else "")


def command_refusal(retain: bool, user_properties: Iterable[tuple[str, str]] | None,
                    protocol: str = "5") -> str | None:
    """Why a message on the commands topic must not run, or None when it may: it must not be retained and, on
    MQTT 5, must carry exactly one `tessera-role` user property naming a role in COMMANDER_ROLES (on "3.1.1" there
    are no properties: the broker's publish permission on the topic is the check). The reason is one line,
    sender-supplied text escaped and truncated."""
    props = list(user_properties or ())
    if protocol == "3.1.1":
        return "retained message; commands are only taken live" if retain else None
    roles = [v for k, v in props if k == ROLE_PROPERTY]
    senders = [v for k, v in props if k == SENDER_PROPERTY]
    who = f"sender {_shown(senders[0])}" if len(senders) == 1 else "unknown sender"
    if retain:
        return f"retained message ({who}); commands are only taken live"
    if not roles:
        return f"no {ROLE_PROPERTY} property ({who}): not stamped by the Tessera broker plugin"
    if len(roles) > 1:
        return f"{len(roles)} {ROLE_PROPERTY} properties ({who}); the broker stamps exactly one"
    if roles[0] not in COMMANDER_ROLES:
        return f"{who} has role {_shown(roles[0])}, not a commander role ({', '.join(COMMANDER_ROLES)})"
    return None


class CommandError(Exception):
    """A malformed command; `command_id` is its id when that much could be read, else None."""

    def __init__(self, message: str, command_id: str | None = None) -> None:
        super().__init__(message)
        self.command_id = command_id


@dataclass(frozen=True)
class Command:
    id: str
    name: str
    args: dict[str, Any] = field(default_factory=dict)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_command(payload: bytes) -> Command:
    """Parse and validate one command message; raises CommandError saying what is wrong."""
    if len(payload) > MAX_PAYLOAD:
        raise CommandError(f"command is {len(payload)} bytes; the limit is {MAX_PAYLOAD}")
    try:
        doc = json.loads(bytes(payload).decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise CommandError("command is not UTF-8") from None
    except ValueError as exc:
        raise CommandError(f"command is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise CommandError(f"command must be a JSON object, not {type(doc).__name__}")
    cid = doc.get("id")
    if not isinstance(cid, str) or not cid:
        raise CommandError("command 'id' must be a non-empty string")
    if len(cid) > MAX_ID_LEN:
        raise CommandError(f"command 'id' is {len(cid)} characters; the limit is {MAX_ID_LEN}")
    name = doc.get("command")
    if not isinstance(name, str) or not name:
        raise CommandError("command 'command' must be a non-empty string", cid)
    args = doc.get("args", {})
    if not isinstance(args, dict):
        raise CommandError(f"command 'args' must be a JSON object, not {type(args).__name__}", cid)
    return Command(cid, name, args)


def _ts(now: datetime) -> str:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ack(cid: str | None, ts: str, *, result: dict[str, Any] | None = None, error: str | None = None) -> bytes:
    doc: dict[str, Any] = {"id": cid, "ok": error is None}
    if error is None:
        doc["result"] = result
    else:
        doc["error"] = error if len(error) <= MAX_ERROR_LEN else error[:MAX_ERROR_LEN - 3] + "..."
    doc["ts"] = ts
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


class CommandHandler:
    """Dispatches commands by name to `handlers` (args dict -> result dict); never raises for bad input."""

    def __init__(self, handlers: Mapping[str, Handler]) -> None:
        self.handlers: dict[str, Handler] = dict(handlers)

    def handle(self, payload: bytes, now: datetime) -> bytes:
        """The ack for `payload`: malformed -> ok false (id null unless the id itself was valid), unknown
        command -> ok false "unknown command 'x'", handler exception -> ok false with its message (no
        traceback), result not a JSON object -> ok false. Raises only ValueError for a naive `now`."""
        ts = _ts(now)
        try:
            cmd = parse_command(payload)
        except CommandError as exc:
            return _ack(exc.command_id, ts, error=str(exc))
        handler = self.handlers.get(cmd.name)
        if handler is None:
            return _ack(cmd.id, ts, error=f"unknown command {cmd.name!r}")
        try:
            result = handler(dict(cmd.args))
        except Exception as exc:  # noqa: BLE001 - a handler bug becomes a failed ack, not a dead agent
            return _ack(cmd.id, ts, error=str(exc) or type(exc).__name__)
        if not isinstance(result, dict):
            return _ack(cmd.id, ts, error=f"command {cmd.name!r} returned {type(result).__name__}, not an object")
        try:
            return _ack(cmd.id, ts, result=result)
        except (TypeError, ValueError) as exc:
            return _ack(cmd.id, ts, error=f"command {cmd.name!r} returned a result that is not JSON: {exc}")


def builtin_handlers(report: Callable[[], dict[str, Any]], renew: Callable[[], dict[str, Any]]) -> dict[str, Handler]:
    """"ping" -> {"pong": true}; "report" -> report(); "renew" -> renew() (args are ignored)."""
    return {
        "ping": lambda args: {"pong": True},
        "report": lambda args: report(),
        "renew": lambda args: renew(),
    }
