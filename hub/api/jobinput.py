"""The jobs API's input rules: a job spec from a request body (every field checked, one-line errors), the selector,
confirm_count, and the job list's cursors. Pure: no I/O."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from datetime import datetime
from typing import Any

from hub.jobs.engine import OFFLINE_POLICIES

from . import queries
from .queries import BadRequest, Selector

COMMAND_PATTERN = "^[a-z][a-z0-9_-]{0,31}$"
_COMMAND_RE = re.compile(COMMAND_PATTERN[1:-1])
NAME_PATTERN = "^[\\x21-\\x7e]([\\x20-\\x7e]{0,98}[\\x21-\\x7e])?$"
_NAME_RE = re.compile(r"[\x21-\x7e]([\x20-\x7e]{0,98}[\x21-\x7e])?")
JOB_ID_RE = re.compile(r"[0-9]{1,18}")
MAX_ARGS = 8192  # bytes of JSON (the agent takes commands of at most 16 KiB)
MAX_RATE = 60000.0  # devices per minute
MAX_TIMEOUT = 86400.0  # seconds
MAX_WAIT = 30.0  # seconds POST /devices/{id}/commands may wait for an ack
DEFAULTS = {"args": {}, "rate_per_minute": 60, "timeout_s": 60, "abort_percent": 20, "offline": "fail"}
_POLICY_FIELDS = {"name", "rate_per_minute", "timeout_s", "abort_percent", "offline", "min_finished", "deadline",
                  "ramp", "max_in_flight", "retries"}
JOB_FIELDS = {*_POLICY_FIELDS, "command", "args", "selector", "confirm_count"}
BULK_FIELDS = {*_POLICY_FIELDS, "selector", "confirm_count"}
MAX_RETRIES = 10
_RAMP_FIELDS = {"start_per_minute", "factor", "every_acked"}


# --- validation -----------------------------------------------------------------------------------------------------

def number(body: dict, key: str, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(key, DEFAULTS.get(key))
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    # (compared before any float conversion: math.isfinite(10**400) raises OverflowError)
    if not ok or not low <= value <= high or (low_open and value <= low) or not math.isfinite(value):
        where = f"{'above' if low_open else 'at least'} {low:g} and at most {high:g}"
        raise BadRequest(f"{key} must be a number {where}", key)
    return value


def integer(value: Any, key: str, low: int, high: int) -> int:
    if isinstance(value, float) and value.is_integer():  # JSON Schema: 3.0 is an integer
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{key} must be an integer {low}-{high}", key)
    return value


def selector(body: dict) -> tuple[Selector, dict]:
    raw = body.get("selector")
    if not isinstance(raw, dict):
        raise BadRequest("selector must be an object of filters, or {\"ids\": [...]}", "selector")
    sel = Selector.parse(raw, allow_ids=True)
    if sel.empty():
        raise BadRequest("the selector needs at least one filter or ids", "selector")
    return sel, raw


def check_args(value: Any) -> dict:
    if not isinstance(value, dict):
        raise BadRequest("args must be a JSON object", "args")
    try:
        text = json.dumps(value, allow_nan=False)
    except ValueError:
        raise BadRequest("args must be plain JSON (no NaN or Infinity)", "args") from None
    if len(text.encode()) > MAX_ARGS:
        raise BadRequest(f"args must be at most {MAX_ARGS} bytes of JSON", "args")
    return value


def check_command(value: Any) -> str:
    if not isinstance(value, str) or not _COMMAND_RE.fullmatch(value):
        raise BadRequest("command must be a name: a lowercase letter, then up to 31 of a-z 0-9 _ -", "command")
    return value


def parse_spec(body: dict, command: str | None = None, args: dict | None = None, dry_run: bool = False,
               name_required: bool = True) -> dict[str, Any]:
    """The job spec from a request body (`command` / `args` fixed by a bulk route); BadRequest on any bad field.
    A dry run needs only the selector: command (and name, when `name_required`) are required for the real run
    only; the other fields have defaults, and any field given is checked either way."""
    spec: dict[str, Any] = {}
    if command is None:
        command = "ping" if dry_run and "command" not in body else check_command(body.get("command"))
    spec["command"] = command
    spec["args"] = check_args(body.get("args", {}) if args is None else args)
    default = None if name_required and not dry_run else f"{command} by selector"
    name = body.get("name", default)
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise BadRequest("name must be 1-100 printable ASCII characters (no leading or trailing space)", "name")
    spec["name"] = name
    spec["rate_per_minute"] = number(body, "rate_per_minute", 0, MAX_RATE, low_open=True)
    spec["timeout_s"] = number(body, "timeout_s", 0, MAX_TIMEOUT, low_open=True)
    spec["abort_percent"] = number(body, "abort_percent", 0, 100)
    offline = body.get("offline", DEFAULTS["offline"])
    if offline not in OFFLINE_POLICIES:
        raise BadRequest("offline must be fail or wait", "offline")
    spec["offline"] = offline
    spec["min_finished"] = (integer(body["min_finished"], "min_finished", 1, 100_000_000)
                            if body.get("min_finished") is not None else None)
    spec["deadline"] = None
    if body.get("deadline") is not None:
        if not isinstance(body["deadline"], str):
            raise BadRequest("deadline must be an ISO 8601 timestamp", "deadline")
        if offline != "wait":
            raise BadRequest("a deadline is for offline: wait (how long devices are waited for)", "deadline")
        spec["deadline"] = datetime.fromisoformat(queries.parse_time(body["deadline"], "deadline"))
    spec["ramp"] = ramp(body.get("ramp"))
    spec["max_in_flight"] = (integer(body["max_in_flight"], "max_in_flight", 1, 1_000_000)
                             if body.get("max_in_flight") is not None else None)
    spec["retries"] = integer(body.get("retries", 0), "retries", 0, MAX_RETRIES)
    return spec


def ramp(value: Any) -> dict | None:
    """{start_per_minute, factor (default 2), every_acked (default 10)} or None."""
    if value is None:
        return None
    if not isinstance(value, dict) or "start_per_minute" not in value or set(value) - _RAMP_FIELDS:
        raise BadRequest("ramp must be {\"start_per_minute\": n, \"factor\": f, \"every_acked\": n}", "ramp")
    return {"start_per_minute": number(value, "start_per_minute", 0, MAX_RATE, low_open=True),
            "factor": number({"factor": value.get("factor", 2)}, "factor", 1, 10, low_open=True),
            "every_acked": integer(value.get("every_acked", 10), "every_acked", 1, 1_000_000)}


def confirm_count(body: dict) -> int | None:
    confirm = body.get("confirm_count")
    if confirm is None:
        return None
    try:
        return integer(confirm, "confirm_count", 0, 10 ** 12)
    except BadRequest:
        raise BadRequest("confirm_count must be a non-negative integer (the dry run's count)",
                         "confirm_count") from None




def encode_job_cursor(before: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"before": before}).encode()).decode().rstrip("=")


def decode_job_cursor(cursor: str) -> int:
    if len(cursor) <= 64 and queries.CURSOR_RE.fullmatch(cursor):
        try:
            data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii"))
        except (binascii.Error, ValueError, RecursionError):
            data = None
        if (isinstance(data, dict) and set(data) == {"before"} and isinstance(data["before"], int)
                and not isinstance(data["before"], bool) and 0 < data["before"] < 2 ** 63):
            return data["before"]
    raise BadRequest("invalid cursor: use the next_cursor of a previous page", "cursor")


def only(q: dict, allowed: set[str]) -> None:
    unknown = set(q) - allowed
    if unknown:
        raise BadRequest(f"unknown parameters {sorted(unknown)}", sorted(unknown)[0])
