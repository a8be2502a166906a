"""MQTT 3.1.1 fallback, the pure parts: protocol choice and its record, what counts as "MQTT 5 refused", command
acceptance without MQTT 5 properties, ack correlation by payload, the `mqtt.protocol` key and the hub client's
protocol."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent import config, mqttproto
from agent.commands import CommandHandler, builtin_handlers, command_refusal
from agent.mqttproto import (REPROBE_AFTER, V5, V311, after_success, choose, forget_memory, load_memory, save_memory,
                             v5_refused)

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc)
BROKER = "broker.example:8883"


# --- choice ---------------------------------------------------------------------------------------------------------

def test_explicit_setting_wins_over_the_record():
    mem = mqttproto.Remembered(BROKER, V311, NOW.isoformat())
    assert choose("5", mem, BROKER, NOW) == V5
    assert choose("3.1.1", None, BROKER, NOW) == V311


def test_auto_without_record_tries_mqtt5():
    assert choose("auto", None, BROKER, NOW) == V5


def test_auto_uses_a_young_311_record_for_the_same_broker_only():
    mem = mqttproto.Remembered(BROKER, V311, (NOW - timedelta(hours=1)).isoformat())
    assert choose("auto", mem, BROKER, NOW) == V311
    assert choose("auto", mem, "other.example:8883", NOW) == V5      # address changed: probe again
    assert choose("auto", mem, "broker.example:8884", NOW) == V5


def test_auto_reprobes_mqtt5_once_the_record_is_old_or_from_the_future():
    old = mqttproto.Remembered(BROKER, V311, (NOW - REPROBE_AFTER).isoformat())
    assert choose("auto", old, BROKER, NOW) == V5
    ahead = mqttproto.Remembered(BROKER, V311, (NOW + timedelta(minutes=5)).isoformat())  # clock set back
    assert choose("auto", ahead, BROKER, NOW) == V5


def test_unknown_setting_is_refused():
    with pytest.raises(ValueError, match="mqtt.protocol must be one of"):
        choose("4", None, BROKER, NOW)


# --- what a failed MQTT 5 attempt means -------------------------------------------------------------------------------

def test_closed_after_handshake_without_connack_is_a_v5_refusal():  # RabbitMQ 3.10
    assert v5_refused(None, handshake_done=True, closed_before_connack=True, tls_refusal=None)


def test_connack_unsupported_protocol_version_is_a_v5_refusal():
    assert v5_refused(0x84, True, False, None)
    assert v5_refused(0x01, True, False, None)  # a 3.1.1 "unacceptable protocol version" read as MQTT 5


@pytest.mark.parametrize("connack, handshake, closed, tls", [
    (0x87, True, False, None),          # not authorized: the certificate's problem, explained by the hub
    (0x86, True, False, None),
    (None, False, True, None),          # TCP or TLS failed: no broker spoke at all
    (None, True, True, "revoked"),      # TLS 1.3 alert after the handshake: the certificate, not the protocol
    (None, True, False, None),          # no CONNACK in time, connection still open: a slow broker
])
def test_other_failures_are_not_v5_refusals(connack, handshake, closed, tls):
    assert not v5_refused(connack, handshake, closed, tls)


# --- the record ----------------------------------------------------------------------------------------------------

def test_after_success_saves_a_fallback_and_forgets_on_mqtt5():
    mem = mqttproto.Remembered(BROKER, V311, NOW.isoformat())
    assert after_success("auto", V311, True, None) == "save"
    assert after_success("auto", V311, True, mem) == "save"       # a re-probe refused again: the age restarts
    assert after_success("auto", V311, False, mem) == "keep"      # used the record: nothing to write
    assert after_success("auto", V5, False, mem) == "forget"      # MQTT 5 works there now
    assert after_success("auto", V5, False, None) == "keep"
    assert after_success("3.1.1", V311, False, None) == "keep"    # explicit settings never write


def test_record_round_trip_is_0600_and_damage_only_costs_a_probe(tmp_path: Path):
    saved = save_memory(tmp_path, BROKER, V311, NOW)
    assert load_memory(tmp_path) == saved
    assert os.stat(tmp_path / mqttproto.MEMORY_FILE).st_mode & 0o777 == 0o600
    for text in ("not json", "[]", json.dumps({"broker": BROKER, "protocol": "4", "since": NOW.isoformat()}),
                 json.dumps({"broker": BROKER, "protocol": V311, "since": "yesterday"})):
        (tmp_path / mqttproto.MEMORY_FILE).write_text(text)
        assert load_memory(tmp_path) is None
    forget_memory(tmp_path)
    forget_memory(tmp_path)  # twice: no error
    assert load_memory(tmp_path) is None


# --- commands without MQTT 5 properties ------------------------------------------------------------------------------

def test_311_commands_are_taken_live_without_a_role_stamp():
    assert command_refusal(False, None, "3.1.1") is None
    assert command_refusal(True, None, "3.1.1") == "retained message; commands are only taken live"


def test_mqtt5_still_requires_the_broker_stamp():
    assert "not stamped" in command_refusal(False, None, "5")
    assert command_refusal(False, [("tessera-role", "commander")], "5") is None


def test_ack_correlates_by_the_command_id_in_the_payload():
    handler = CommandHandler(builtin_handlers(report=lambda: {}, renew=lambda: {}))
    ack = json.loads(handler.handle(json.dumps({"id": "c-42", "command": "ping"}).encode(), NOW))
    assert ack["id"] == "c-42" and ack["ok"] is True
    bad = json.loads(handler.handle(json.dumps({"id": "c-43", "command": "nope"}).encode(), NOW))
    assert bad["id"] == "c-43" and bad["ok"] is False


# --- configuration ----------------------------------------------------------------------------------------------------

def test_protocol_key_default_values_and_refusal(tmp_path: Path):
    missing = tmp_path / "agent.toml"
    assert config.load(missing, missing_ok=True).mqtt.protocol == "auto"
    for value in mqttproto.PROTOCOLS:
        assert config.load(missing, [f"mqtt.protocol={value}"], missing_ok=True).mqtt.protocol == value
    with pytest.raises(config.ConfigError, match=r"^mqtt.protocol must be one of auto, 5, 3.1.1, not '3'$"):
        config.load(missing, ["mqtt.protocol=3"], missing_ok=True)
    cfg = config.load(missing, ["mqtt.protocol=3.1.1"], missing_ok=True)
    (tmp_path / "back.toml").write_text(config.render(cfg))
    assert config.load(tmp_path / "back.toml").mqtt.protocol == "3.1.1"


def test_hub_client_protocols(tmp_path: Path):
    from hub.broker import BrokerError
    from hub.broker.mqttadmin import AdminClient

    with pytest.raises(BrokerError, match="speaks MQTT 5 or 3.1.1"):
        AdminClient("127.0.0.1", 1, tmp_path / "ca", tmp_path / "c", tmp_path / "k", on_status=print, protocol="4")
