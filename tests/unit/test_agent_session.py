"""Tests for agent.session without a broker: what a refused connection means (refusal_decision), and the session's
wiring of the command guard, the renew-command rate limit and the refusal states (an Agent on a fake state dir)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pytest

from agent.backoff import SLOW_CAP
from agent.commands import ROLE_PROPERTY, SENDER_PROPERTY
from agent.config import AgentConfig
from agent.session import (AUTH_REFUSALS, REFUSED_CAP, SUSPENDED_CAP, Agent, Refusal, classify_tls_error,
                           refusal_decision)

STATUSES = ("active", "suspended", "revoked", "superseded", "expired", "unknown")


# -- refusal_decision --------------------------------------------------------------------------------------------

def test_auth_refusal_codes() -> None:
    assert AUTH_REFUSALS == {0x86, 0x87, 0x8A, 0x8C}


@pytest.mark.parametrize("code", sorted(AUTH_REFUSALS))
@pytest.mark.parametrize("credential, state, cap", [
    ("suspended", "suspended", SUSPENDED_CAP),
    ("revoked", "revoked", SLOW_CAP),
    ("superseded", "refused", REFUSED_CAP),
    ("expired", "refused", REFUSED_CAP),
    ("unknown", "refused", REFUSED_CAP),
    ("active", "refused", REFUSED_CAP),
    (None, "refused", REFUSED_CAP),            # the hub could not be asked
    ("nonsense", "refused", REFUSED_CAP),
])
def test_refusal_decision(code, credential, state, cap) -> None:
    d = refusal_decision(code, credential)
    assert isinstance(d, Refusal) and (d.state, d.cap) == (state, cap) and d.hint and "\n" not in d.hint


def test_refusal_caps() -> None:
    assert SUSPENDED_CAP == 5.0 and REFUSED_CAP == 30.0 and SLOW_CAP == 15 * 60.0


def test_refusal_hints() -> None:
    assert "revoked" in refusal_decision(0x87, "revoked").hint
    assert "resume" in refusal_decision(0x87, "suspended").hint
    hint = refusal_decision(0x87, "superseded").hint
    assert "old certificate" in hint and "tessera-agent enroll" in hint
    assert "could not be asked" in refusal_decision(0x87, None).hint


@pytest.mark.parametrize("code", [None, 0x00, 0x80, 0x84, 0x85, 0x88, 0x89, 0x97, 0x9F])
@pytest.mark.parametrize("credential", [*STATUSES, None])
def test_other_codes_are_no_refusal(code, credential) -> None:
    """Server busy/unavailable, bad client id, quota...: the ordinary reconnect backoff, no hub query decides them."""
    assert refusal_decision(code, credential) is None


def test_tls_alerts_still_recognised() -> None:
    assert classify_tls_error("[SSL: SSLV3_ALERT_CERTIFICATE_REVOKED] sslv3 alert certificate revoked") == "revoked"
    assert classify_tls_error("tlsv1 alert certificate expired") == "expired"
    assert classify_tls_error("[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca") == "refused"
    assert classify_tls_error("broker refused the connection: Not authorized") is None


# -- an Agent on a fake state directory (no token, no broker) ------------------------------------------------------

@dataclass
class Msg:
    topic: str
    payload: bytes
    retain: bool = False
    properties: object = None


@dataclass
class Props:
    UserProperty: list = field(default_factory=list)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_agent(tmp_path: Path, **cfg) -> tuple[Agent, Clock]:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "identity.json").write_text(json.dumps({
        "device_id": "dev-1", "key_label": "device-key", "key_uri": "pkcs11:token=t;object=device-key",
        "serial": "abc", "not_before": "2029-01-01T00:00:00+00:00", "not_after": "2031-01-01T00:00:00+00:00",
        "fingerprint_sha256": "00", "enrolled_at": "2029-01-01T00:00:00+00:00"}))
    clock = Clock()
    config = AgentConfig(device_id="dev-1", hub_url="https://hub.example:8443", state_dir=str(state), **cfg)
    agent = Agent(config, clock=lambda: datetime(2030, 1, 1, tzinfo=timezone.utc), monotonic=clock)
    return agent, clock


def acks(agent: Agent) -> list[dict]:
    return [json.loads(m.payload) for m in agent.spool.pending(100) if m.topic == "devices/dev-1/commands/ack"]


def command(cid: str, name: str = "ping", args: dict | None = None) -> bytes:
    return json.dumps({"id": cid, "command": name, "args": args or {}}).encode()


def test_commands_run_only_live_and_from_commanders(tmp_path, caplog) -> None:
    agent, _ = make_agent(tmp_path)
    topic = "devices/dev-1/commands"
    commander = Props([(SENDER_PROPERTY, "svc.ops"), (ROLE_PROPERTY, "commander")])
    try:
        agent._on_message(None, None, Msg(topic, command("ok-1"), properties=commander))
        agent._on_message(None, None, Msg(topic, command("retained"), retain=True, properties=commander))
        agent._on_message(None, None, Msg(topic, command("no-props")))
        agent._on_message(None, None, Msg(topic, command("device"), properties=Props(
            [(SENDER_PROPERTY, "dev-2"), (ROLE_PROPERTY, "device\n")])))
        agent._on_message(None, None, Msg("devices/dev-1/other", command("elsewhere"), properties=commander))
        assert [a["id"] for a in acks(agent)] == ["ok-1"]
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ignoring")]
        assert len(lines) == 3 and all("\n" not in line for line in lines)
        assert "retained" in lines[0] and "no tessera-role" in lines[1] and "'device\\n'" in lines[2]
    finally:
        agent.spool.close()


def test_renew_command_rate_limit(tmp_path) -> None:
    agent, clock = make_agent(tmp_path)
    props = Props([(SENDER_PROPERTY, "tessera-hub"), (ROLE_PROPERTY, "hub")])
    topic = "devices/dev-1/commands"
    try:
        agent._on_message(None, None, Msg(topic, command("r1", "renew"), properties=props))
        assert agent._renew_requested == "renew"
        agent._renew_requested = None                      # the loop ran the renewal
        clock.now += 599.2
        agent._on_message(None, None, Msg(topic, command("r2", "renew", {"rotate_key": True}), properties=props))
        assert agent._renew_requested is None
        clock.now += 0.8
        agent._on_message(None, None, Msg(topic, command("r3", "renew", {"rotate_key": True}), properties=props))
        assert agent._renew_requested == "rotate"
        got = {a["id"]: a for a in acks(agent)}
        assert got["r1"]["ok"] and got["r3"]["ok"] and got["r3"]["result"]["rotate_key"] is True
        assert got["r2"]["ok"] is False and got["r2"]["error"] == "renewal rate limited; next allowed in 1 s"
    finally:
        agent.spool.close()


def test_renew_command_interval_from_config(tmp_path) -> None:
    agent, clock = make_agent(tmp_path, renew_command_min_interval=0.0)
    try:
        for _ in range(3):
            assert agent._request_renewal({})["renewal"] == "scheduled"
    finally:
        agent.spool.close()


class MaxRng(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b


@pytest.mark.parametrize("credential, state, ceilings", [
    ("suspended", "suspended", [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]),
    ("revoked", "revoked", [30.0, 60.0, 120.0, 240.0, 480.0, 900.0]),
    ("superseded", "refused", [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]),
    (None, "refused", [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]),
])
def test_refused_connect_asks_the_hub_once_per_retry(tmp_path, monkeypatch, credential, state, ceilings) -> None:
    agent, _ = make_agent(tmp_path)
    asked, waits = [], []
    monkeypatch.setattr(agent, "_ask_hub", lambda: asked.append(1) or credential)
    monkeypatch.setattr(agent.stop_event, "wait", lambda delay: waits.append(delay))
    monkeypatch.setattr("agent.backoff.random.Random", MaxRng)
    try:
        for _ in ceilings:
            agent._connack = 0x87
            agent._retry_after("connect failed", "broker refused the connection: Not authorized")
        assert len(asked) == len(ceilings)
        assert waits == ceilings
        st = json.loads((agent.state / "status.json").read_text())
        assert st["state"] == state and "refuses this device's certificate" in st["last_error"]
        # an ordinary failure (no CONNACK refusal) does not ask the hub
        agent._connack = None
        agent._retry_after("connect failed", "[Errno 111] Connection refused")
        assert len(asked) == len(ceilings) and agent.status["state"] == "offline"
    finally:
        agent.spool.close()
