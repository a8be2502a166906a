"""Tests for the restart-to-load-a-new-key decision (agent.sessionrenew): when a token key cannot be loaded the
session asks for a restart (KeyReload) only for a key new to the process after another key loaded, never for a
wrong PIN; and what a re-executed agent continues from (telemetry seq, renew-command rate limit)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from agent.sessionrenew import RESUME_ENV, KeyReload, take_resume
from hsm.errors import HsmError, ModuleNotFound, PinError, TlsRouteError
from tests.unit.test_agent_session import make_agent


def _fail(exc):
    def build():
        raise exc
    return build


def test_a_new_key_that_cannot_be_loaded_after_another_one_did_asks_for_a_restart(tmp_path) -> None:
    agent, _ = make_agent(tmp_path)
    assert agent._key_context(lambda: "ctx-1") == "ctx-1"
    agent.ident = dataclasses.replace(agent.ident, key_uri="pkcs11:token=t;object=rotated")
    with pytest.raises(KeyReload, match="restarting the agent"):
        agent._key_context(_fail(HsmError("object not found")))
    agent.spool.close()


def test_the_first_key_or_a_key_loaded_before_is_an_ordinary_error(tmp_path) -> None:
    agent, _ = make_agent(tmp_path)
    with pytest.raises(HsmError) as first:
        agent._key_context(_fail(HsmError("object not found")))
    assert not isinstance(first.value, KeyReload)       # nothing loaded yet: a restart would not help
    agent._key_context(lambda: "ctx")
    with pytest.raises(HsmError) as again:
        agent._key_context(_fail(HsmError("token gone")))  # the same key as before
    assert not isinstance(again.value, KeyReload)
    agent.spool.close()


def test_a_wrong_pin_never_restarts(tmp_path) -> None:
    """A restart would log in with the same PIN again: one more failure towards the token's lockout."""
    agent, _ = make_agent(tmp_path)
    agent._key_context(lambda: "ctx")
    agent.ident = dataclasses.replace(agent.ident, key_uri="pkcs11:token=t;object=rotated")
    with pytest.raises(PinError) as raised:
        agent._key_context(_fail(PinError("wrong PIN")))
    assert not isinstance(raised.value, KeyReload)
    agent.spool.close()


@pytest.mark.parametrize("exc", [TlsRouteError("no private key found (missing token?)"), ModuleNotFound("gone")])
def test_other_token_errors_on_a_new_key_restart_once(tmp_path, exc) -> None:
    """pkcs11-provider reports the invisible key as a route error (its session is logged in already): restart."""
    agent, _ = make_agent(tmp_path)
    agent._key_context(lambda: "ctx")
    agent.ident = dataclasses.replace(agent.ident, key_uri="pkcs11:token=t;object=rotated")
    with pytest.raises(KeyReload):
        agent._key_context(_fail(exc))
    agent.spool.close()


def test_resume_state_round_trip(tmp_path, monkeypatch) -> None:
    agent, clock = make_agent(tmp_path)
    agent._seq = 41
    agent._renew_command_at = clock.now - 30.0
    state = agent.resume_state()
    agent.spool.close()
    monkeypatch.setenv(RESUME_ENV, json.dumps(state))
    resume = take_resume()
    assert RESUME_ENV not in os.environ  # handed over once, not to the renewal children
    (tmp_path / "b").mkdir()
    nxt, clock2 = make_agent(tmp_path / "b")
    nxt.spool.close()
    nxt._resume(resume)
    assert nxt._seq == 41
    assert clock2.now - nxt._renew_command_at == pytest.approx(30.0)


def test_an_unreadable_resume_is_ignored(monkeypatch) -> None:
    monkeypatch.setenv(RESUME_ENV, "{not json")
    assert take_resume() is None
