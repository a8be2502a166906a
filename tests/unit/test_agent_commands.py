"""Tests for agent.commands: parsing, dispatch, every ack path, the built-in handlers, and who may command."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from agent.commands import (COMMANDER_ROLES, MAX_ID_LEN, MAX_PAYLOAD, ROLE_PROPERTY, SENDER_PROPERTY, SHOWN_CHARS,
                            Command, CommandError, CommandHandler, builtin_handlers, command_refusal, parse_command)

NOW = datetime(2030, 1, 1, 12, 0, 0, 250000, tzinfo=timezone.utc)
TS = "2030-01-01T12:00:00.250Z"


def cmd(**doc: object) -> bytes:
    return json.dumps(doc).encode()


def ack(raw: bytes) -> dict:
    assert isinstance(raw, bytes)
    return json.loads(raw)


# -- parse_command ---------------------------------------------------------------------------------------------

def test_parse_command() -> None:
    assert parse_command(cmd(id="c-1", command="ping")) == Command("c-1", "ping", {})
    assert parse_command(cmd(id="c-2", command="set", args={"k": [1, 2]}, extra="ignored")) == \
        Command("c-2", "set", {"k": [1, 2]})
    assert parse_command(bytearray(cmd(id="x" * MAX_ID_LEN, command="ping"))).id == "x" * MAX_ID_LEN


@pytest.mark.parametrize("payload, message, command_id", [
    (b"", "not valid JSON", None),
    (b"{not json", "not valid JSON", None),
    (b"\xff\xfe{}", "not UTF-8", None),
    (b'["ping"]', "must be a JSON object, not list", None),
    (b'"ping"', "must be a JSON object, not str", None),
    (b'{"id": "a", "command": "ping", "args": {"x": NaN}}', "not valid JSON", None),
    (cmd(command="ping"), "'id' must be a non-empty string", None),
    (cmd(id=7, command="ping"), "'id' must be a non-empty string", None),
    (cmd(id="", command="ping"), "'id' must be a non-empty string", None),
    (cmd(id="x" * (MAX_ID_LEN + 1), command="ping"), f"the limit is {MAX_ID_LEN}", None),
    (cmd(id="c-9"), "'command' must be a non-empty string", "c-9"),
    (cmd(id="c-9", command=""), "'command' must be a non-empty string", "c-9"),
    (cmd(id="c-9", command=["ping"]), "'command' must be a non-empty string", "c-9"),
    (cmd(id="c-9", command="ping", args=[1]), "'args' must be a JSON object, not list", "c-9"),
    (cmd(id="c-9", command="ping", args=None), "'args' must be a JSON object, not NoneType", "c-9"),
])
def test_parse_command_errors(payload: bytes, message: str, command_id: str | None) -> None:
    with pytest.raises(CommandError, match="command") as exc:
        parse_command(payload)
    assert message in str(exc.value)
    assert exc.value.command_id == command_id


def test_payload_size_limit() -> None:
    base = cmd(id="big", command="ping", args={"pad": ""})
    at_limit = cmd(id="big", command="ping", args={"pad": "x" * (MAX_PAYLOAD - len(base))})
    assert len(at_limit) == MAX_PAYLOAD == 16 * 1024
    assert parse_command(at_limit).id == "big"
    over = cmd(id="big", command="ping", args={"pad": "x" * (MAX_PAYLOAD - len(base) + 1)})
    with pytest.raises(CommandError, match=f"{MAX_PAYLOAD + 1} bytes; the limit is {MAX_PAYLOAD}"):
        parse_command(over)


# -- CommandHandler ----------------------------------------------------------------------------------------------

def test_handle_success() -> None:
    seen = []

    def echo(args: dict) -> dict:
        seen.append(args)
        return {"echo": args}

    h = CommandHandler({"echo": echo})
    raw = h.handle(cmd(id="c-1", command="echo", args={"a": 1}), NOW)
    assert ack(raw) == {"id": "c-1", "ok": True, "result": {"echo": {"a": 1}}, "ts": TS}
    assert list(ack(raw)) == ["id", "ok", "result", "ts"]
    assert seen == [{"a": 1}]


def test_handle_unknown_command() -> None:
    assert ack(CommandHandler({}).handle(cmd(id="c-2", command="reboot"), NOW)) == \
        {"id": "c-2", "ok": False, "error": "unknown command 'reboot'", "ts": TS}


def test_handle_malformed_has_null_id() -> None:
    got = ack(CommandHandler({}).handle(b"{oops", NOW))
    assert got["id"] is None and got["ok"] is False and "not valid JSON" in got["error"] and got["ts"] == TS
    assert list(got) == ["id", "ok", "error", "ts"]
    got = ack(CommandHandler({}).handle(b"x" * (MAX_PAYLOAD + 1), NOW))
    assert got["id"] is None and "limit" in got["error"]


def test_handle_malformed_with_valid_id_echoes_it() -> None:
    # the hub can then fail that command at once instead of waiting for a timeout
    got = ack(CommandHandler({}).handle(cmd(id="c-3", command="ping", args="x"), NOW))
    assert got == {"id": "c-3", "ok": False, "error": "command 'args' must be a JSON object, not str", "ts": TS}


def test_handle_handler_exception_has_message_not_traceback() -> None:
    def boom(args: dict) -> dict:
        raise RuntimeError("sensor offline")

    def silent(args: dict) -> dict:
        raise KeyError

    h = CommandHandler({"boom": boom, "silent": silent})
    got = ack(h.handle(cmd(id="c-4", command="boom"), NOW))
    assert got == {"id": "c-4", "ok": False, "error": "sensor offline", "ts": TS}
    assert "Traceback" not in json.dumps(got)
    assert ack(h.handle(cmd(id="c-5", command="silent"), NOW))["error"] == "KeyError"


def test_handle_long_error_is_truncated() -> None:
    def boom(args: dict) -> dict:
        raise ValueError("e" * 10_000)

    err = ack(CommandHandler({"boom": boom}).handle(cmd(id="c", command="boom"), NOW))["error"]
    assert len(err) == 1024 and err.endswith("...")


def test_handle_bad_results() -> None:
    h = CommandHandler({"list": lambda a: [1], "nan": lambda a: {"x": float("nan")}, "obj": lambda a: {"x": object()}})
    got = ack(h.handle(cmd(id="c-6", command="list"), NOW))
    assert got["ok"] is False and got["error"] == "command 'list' returned list, not an object"
    for name in ("nan", "obj"):
        got = ack(h.handle(cmd(id="c-7", command=name), NOW))
        assert got["ok"] is False and "not JSON" in got["error"]


def test_handle_base_exceptions_propagate() -> None:
    def stop(args: dict) -> dict:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        CommandHandler({"stop": stop}).handle(cmd(id="c", command="stop"), NOW)


def test_handle_timestamp_in_utc_and_naive_rejected() -> None:
    local = NOW.astimezone(timezone(timedelta(hours=-7)))
    assert ack(CommandHandler({}).handle(b"{}", local))["ts"] == TS
    with pytest.raises(ValueError, match="timezone-aware"):
        CommandHandler({}).handle(b"{}", datetime(2030, 1, 1))


# -- built-in handlers -------------------------------------------------------------------------------------------

def test_builtin_handlers() -> None:
    calls = []

    def report() -> dict:
        calls.append("report")
        return {"load_1": 0.5}

    def renew() -> dict:
        calls.append("renew")
        return {"scheduled": True}

    handlers = builtin_handlers(report=report, renew=renew)
    assert set(handlers) == {"ping", "report", "renew"}
    h = CommandHandler(handlers)
    assert ack(h.handle(cmd(id="1", command="ping"), NOW))["result"] == {"pong": True}
    assert ack(h.handle(cmd(id="2", command="report", args={"ignored": 1}), NOW))["result"] == {"load_1": 0.5}
    assert ack(h.handle(cmd(id="3", command="renew"), NOW))["result"] == {"scheduled": True}
    assert calls == ["report", "renew"]


def test_builtin_renew_failure_becomes_failed_ack() -> None:
    def renew() -> dict:
        raise RuntimeError("EST server unreachable")

    h = CommandHandler(builtin_handlers(report=dict, renew=renew))
    assert ack(h.handle(cmd(id="r", command="renew"), NOW)) == \
        {"id": "r", "ok": False, "error": "EST server unreachable", "ts": TS}


# -- who may command: command_refusal ---------------------------------------------------------------------------

def stamped(role: str, sender: str = "svc.ops") -> list[tuple[str, str]]:
    """User properties as the broker plugin stamps them."""
    return [(SENDER_PROPERTY, sender), (ROLE_PROPERTY, role)]


def test_constants_match_the_hub_policy() -> None:
    from hub.authz import policy

    assert (SENDER_PROPERTY, ROLE_PROPERTY, COMMANDER_ROLES) == \
        (policy.SENDER_PROPERTY, policy.ROLE_PROPERTY, policy.COMMANDER_ROLES)


def test_agent_commands_does_not_import_the_hub() -> None:
    import subprocess
    import sys

    code = "import sys, agent.commands; print(sorted(m for m in sys.modules if m == 'hub' or m.startswith('hub.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("role", COMMANDER_ROLES)
def test_live_command_from_a_commander_runs(role: str) -> None:
    assert command_refusal(False, stamped(role)) is None
    assert command_refusal(False, [("other", "x"), *stamped(role)]) is None


@pytest.mark.parametrize("retain, props, expected", [
    (True, stamped("commander"), "retained message (sender 'svc.ops'); commands are only taken live"),
    (True, None, "retained message (unknown sender); commands are only taken live"),
    (False, None, "no tessera-role property (unknown sender): not stamped by the Tessera broker plugin"),
    (False, [], "no tessera-role property (unknown sender): not stamped by the Tessera broker plugin"),
    (False, [(SENDER_PROPERTY, "dev-2")], "no tessera-role property (sender 'dev-2'): not stamped by the Tessera "
                                          "broker plugin"),
    (False, stamped("device", "dev-2"), "sender 'dev-2' has role 'device', not a commander role "
                                        "(commander, admin, hub)"),
    (False, stamped("telemetry-reader"), "sender 'svc.ops' has role 'telemetry-reader', not a commander role "
                                         "(commander, admin, hub)"),
    (False, stamped("Commander"), "sender 'svc.ops' has role 'Commander', not a commander role "
                                  "(commander, admin, hub)"),
    (False, stamped(""), "sender 'svc.ops' has role '', not a commander role (commander, admin, hub)"),
    (False, [*stamped("device"), (ROLE_PROPERTY, "admin")],
     "2 tessera-role properties (sender 'svc.ops'); the broker stamps exactly one"),
    (False, [(ROLE_PROPERTY, "admin"), (ROLE_PROPERTY, "admin")],
     "2 tessera-role properties (unknown sender); the broker stamps exactly one"),
])
def test_refused_messages(retain: bool, props, expected: str) -> None:
    assert command_refusal(retain, props) == expected


def test_refusal_escapes_and_truncates_sender_text() -> None:
    why = command_refusal(False, stamped("evil\nINFO fake log line\x1b[31m" + "r" * 500, "s\r\n" + "x" * 500))
    assert "\n" not in why and "\r" not in why and "\x1b" not in why
    assert "'evil\\nINFO fake log line\\x1b[31m" in why and "'s\\r\\n" in why
    assert len(why) < 2 * SHOWN_CHARS + 150 and why.count("...") == 2
