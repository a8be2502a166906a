"""Roles are data: `tessera-hub role set` changes what live sessions may do at once, with no broker restart."""

from __future__ import annotations

import pytest

from tests.integration.brokerfixtures import audit, broker_hub, broker_pid, enroll_device, session, sessions
from tests.integration.hubfixtures import one_line

pytestmark = pytest.mark.integration

NOT_AUTHORIZED = 0x87
ACCEPTED = (0x00, 0x10)  # success, or success with "no matching subscribers"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with broker_hub(tmp_path_factory.mktemp("roles")) as h:
        yield h


def test_a_new_rule_for_the_device_role_applies_to_a_live_session(hub, tmp_path):
    dev = enroll_device(hub, "role-a", tmp_path)
    pid = broker_pid(hub)
    with sessions(session(hub, dev)) as (s,):
        assert s.publish("devices/role-a/logs", b"x") == NOT_AUTHORIZED
        rules = hub.cli_ok("role", "show", "device").split()
        hub.cli_ok("role", "set", "device", *[a for r in rules + ["publish:devices/{id}/logs"]
                                              for a in ("--rule", r)])
        assert s.publish("devices/role-a/logs", b"x") in ACCEPTED, "the new rule did not reach the live session"
        assert s.publish("devices/role-b/logs", b"x") == NOT_AUTHORIZED  # {id} is the device's own id
        hub.cli_ok("role", "set", "device", *[a for r in rules for a in ("--rule", r)])
        assert s.publish("devices/role-a/logs", b"x") == NOT_AUTHORIZED, "a removed rule still applies"
        assert s.connected
    assert broker_pid(hub) == pid  # no restart, no reload
    assert any(r["action"] == "role.set" and "devices/{id}/logs" in r["detail"] for r in audit(hub, 20))


@pytest.mark.parametrize("rule, message", [
    ("write:devices/{id}/x", "unknown action 'write'"),
    ("publish:devices/#/x", "invalid topic pattern"),
    ("publish", "is not ACTION:PATTERN"),
    ("publish:", "invalid topic pattern"),
])
def test_bad_rules_are_refused_and_change_nothing(hub, rule, message):
    before = hub.cli_ok("role", "show", "commander")
    proc = hub.cli("role", "set", "commander", "--rule", "publish:devices/+/commands", "--rule", rule)
    assert proc.returncode != 0 and message in one_line(proc.stderr), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert hub.cli_ok("role", "show", "commander") == before


def test_the_hub_role_cannot_be_edited(hub):
    proc = hub.cli("role", "set", "hub", "--rule", "publish:#")
    assert proc.returncode != 0 and "cannot be changed" in proc.stderr


def test_a_catch_all_role_still_cannot_reach_dollar_topics_or_wildcard_shares(hub, tmp_path):
    from tests.integration.brokerfixtures import MqttSession

    hub.cli_ok("role", "set", "everything", "--rule", "subscribe:#", "--rule", "receive:#", "--rule", "publish:#")
    hub.cli_ok("identity", "add", "omni", "--role", "everything")
    ident = hub.dir / "identities" / "omni"
    with sessions(MqttSession(hub, ident / "omni.pem", ident / "omni.key", "svc.omni").connect()) as (s,):
        assert s.subscribe("devices/#") == 1
        for flt in ("$SYS/#", "$CONTROL/#", "$CONTROL/tessera/v1/response", "$share/+/devices/#",
                    "$share/g/$SYS/#"):
            assert s.subscribe(flt) >= 0x80, flt
        assert s.publish("$CONTROL/tessera/v1", b"sync abc") == NOT_AUTHORIZED
