"""hub.authz.policy: names, patterns, MQTT matching and the decisions every enforcement point makes.

Most cases are what an attacker would try: wildcards and `$` topics in subscriptions, `$share` wrappers, the
broker's `$CONTROL` topics, another device's subtree, placeholders smuggled in through names. The last cases
cover the MQTT rules a broker applies before any ACL (4.7.1-4.7.3, 4.8.2), which this policy applies too.
"""

from __future__ import annotations

import pytest

from hub.authz.policy import (
    ACTIONS, COMMANDER_ROLES, CONTROL_RESPONSE, CONTROL_TOPIC, DEFAULT_ROLES, GRANTABLE_ROLES, HUB_PRINCIPAL,
    AuthzError, Grants, allows, check_groups, check_labels, check_name, check_pattern, check_rules, expand,
    filter_covered, service_principal, strip_share, topic_matches,
)


def grants(role: str, principal: str = "dev-1", groups: tuple[str, ...] = ()) -> Grants:
    return expand(DEFAULT_ROLES[role], principal, list(groups))


DEVICE = grants("device", "dev-1", ("g1",))
READER = grants("telemetry-reader", "svc.reader")
COMMANDER = grants("commander", "svc.cmd")
ADMIN = grants("admin", "svc.admin")
HUB = grants("hub", HUB_PRINCIPAL)

#: Subscriptions nobody but the hub (and for some, nobody at all) may make.
HOSTILE_FILTERS = ["#", "+", "+/#", "+/+/+", "devices/#", "devices/+/#", "devices/+/commands", "fleet/#",
                   "fleet/groups/#", "fleet/groups/+/#", "$SYS/#", "$CONTROL/#", CONTROL_TOPIC, CONTROL_RESPONSE,
                   "$CONTROL/dynamic-security/v1/response", "$share/x/#", "$share/x/devices/+/commands",
                   "devices/other/commands", "devices/other/#"]


# --- names, labels, patterns -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["a", "0", "dev-1", "sensor-0001", "a-", "x" * 63, "9lives"])
def test_check_name_accepts(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "-a", "A", "Dev", "x" * 64, "svc.reader", "a/b", "+", "#", "$SYS", "{id}",
                                  "{group}", "a b", "a\n", "\na", "a\x00", "dév", "ｓensor", "١", "a_b", "a:b",
                                  None, 1, b"dev"])
def test_check_name_refuses_anything_that_could_reach_a_topic(name):
    with pytest.raises(AuthzError):
        check_name(name)


def test_check_name_says_what_was_wrong():
    with pytest.raises(AuthzError, match="invalid group name 'a/b'"):
        check_name("a/b", "group name")


def test_check_groups_dedupes_and_validates():
    assert check_groups(["b", "a", "b"]) == ["b", "a"]
    with pytest.raises(AuthzError):
        check_groups(["ok", "#"])


@pytest.mark.parametrize("labels", [{"site": "berlin"}, {"k": "x" * 128}, {"k": "a b"}, {"k": "!"},
                                    {"room": "[red]3[/red]"}, {}])
def test_check_labels_accepts(labels):
    assert check_labels(labels) == labels


@pytest.mark.parametrize("labels", [{"Bad": "v"}, {"a/b": "v"}, {"k": ""}, {"k": " lead"}, {"k": "trail "},
                                    {"k": "x" * 129}, {"k": "line\nbreak"}, {"k": "\x1b[31mred"}, {"k": "tab\t"},
                                    {"k": "caf\u00e9"}, {"k": "\u202eevil"}, {"k": 1}, {"k": None}])
def test_check_labels_refuses(labels):
    with pytest.raises(AuthzError):
        check_labels(labels)


@pytest.mark.parametrize("pattern", ["devices/{id}/telemetry", "fleet/groups/{group}/#", "#", "+", "+/+",
                                     "devices/+/commands/ack", CONTROL_TOPIC, "$SYS/#", "a//b", "a/", "x" * 256])
def test_check_pattern_accepts(pattern):
    assert check_pattern(pattern) == pattern


@pytest.mark.parametrize("pattern", ["", "/a", "a/#/b", "#/a", "a/b#", "a/#b", "a/+b", "a/b+", "{id}x", "x{group}",
                                     "a/{ID}", "a/{id", "a/id}", "a/{}", "a/{other}", "a\x00b", "x" * 257, None, 7])
def test_check_pattern_refuses(pattern):
    with pytest.raises(AuthzError):
        check_pattern(pattern)


def test_every_default_rule_is_valid():
    for role, rules in DEFAULT_ROLES.items():
        assert check_rules(rules) == rules, role


@pytest.mark.parametrize("rule", [("write", "a"), ("PUBLISH", "a"), ("publish", "a/#/b"), ("receive", "")])
def test_check_rules_refuses(rule):
    with pytest.raises(AuthzError):
        check_rules([rule])


def test_grantable_roles():
    assert set(GRANTABLE_ROLES) == {"telemetry-reader", "commander", "admin", "viewer", "operator"}
    assert "device" not in GRANTABLE_ROLES and "hub" not in GRANTABLE_ROLES
    assert set(COMMANDER_ROLES) == {"commander", "admin", "hub"}
    assert service_principal("reader") == "svc.reader"
    with pytest.raises(AuthzError):
        service_principal("svc.reader")


# --- expand --------------------------------------------------------------------------------------------------------

def test_expand_fills_id_and_one_rule_per_group():
    g = expand([("publish", "x/{id}/{group}"), ("receive", "y/{id}"), ("receive", "y/{id}")], "d", ["a", "b"])
    assert g == Grants(publish=("x/d/a", "x/d/b"), receive=("y/d",))


def test_expand_drops_group_rules_without_groups():
    g = grants("device", "dev-1")
    assert g.subscribe == ("devices/dev-1/commands",) and g.receive == ("devices/dev-1/commands",)
    assert not any("{" in p for a in ACTIONS for p in getattr(g, a))


def test_expand_device():
    assert DEVICE.publish == ("devices/dev-1/telemetry", "devices/dev-1/events", "devices/dev-1/status",
                              "devices/dev-1/commands/ack")
    assert DEVICE.retain == ("devices/dev-1/status",)
    assert DEVICE.subscribe == DEVICE.receive == ("devices/dev-1/commands", "fleet/groups/g1/#")


def test_admin_is_the_union_of_reader_and_commander():
    for action in ACTIONS:
        assert set(getattr(ADMIN, action)) == set(getattr(READER, action)) | set(getattr(COMMANDER, action))


# --- topic_matches -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern,topic,expected", [
    ("a/b", "a/b", True), ("a/b", "a/c", False), ("a/b", "a/b/c", False), ("a/b/c", "a/b", False),
    ("a/+", "a/b", True), ("a/+", "a/b/c", False), ("a/+", "a", False), ("+/b", "a/b", True),
    ("a/#", "a", True), ("a/#", "a/b/c", True), ("a/#", "ab", False), ("#", "a/b", True),
    ("a/+/c", "a//c", True), ("+", "", False), ("a/b", "A/b", False),
    # `$` topics are never matched by a leading wildcard (MQTT 4.7.2)
    ("#", "$SYS/broker/uptime", False), ("+/broker/uptime", "$SYS/broker/uptime", False),
    ("#", CONTROL_TOPIC, False), ("+/tessera/v1", CONTROL_TOPIC, False), ("$SYS/#", "$SYS/broker/uptime", True),
    (CONTROL_TOPIC, CONTROL_TOPIC, True), ("$CONTROL/+/v1", CONTROL_TOPIC, True),
    ("devices/+/status", "devices/$x/status", True),  # `$` is only special in the first level
])
def test_topic_matches(pattern, topic, expected):
    assert topic_matches(pattern, topic) is expected


# --- filter_covered and $share -------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern,flt,expected", [
    ("devices/+/telemetry", "devices/+/telemetry", True), ("devices/+/telemetry", "devices/d1/telemetry", True),
    ("devices/d1/telemetry", "devices/+/telemetry", False), ("devices/+/telemetry", "devices/#", False),
    ("devices/+/telemetry", "devices/+/#", False), ("devices/+/telemetry", "#", False),
    ("devices/+/telemetry", "+/+/telemetry", False), ("devices/+/telemetry", "devices/+/telemetry/x", False),
    ("devices/+/telemetry", "devices/+", False), ("fleet/groups/g1/#", "fleet/groups/g1/#", True),
    ("fleet/groups/g1/#", "fleet/groups/g1/a/+", True), ("fleet/groups/g1/#", "fleet/groups/g1", True),
    ("fleet/groups/g1/#", "fleet/groups/#", False), ("fleet/groups/g1/#", "fleet/groups/+/#", False),
    ("fleet/groups/g1/#", "fleet/groups/g2/#", False), ("a/+", "a/#", False), ("#", "#", True), ("#", "a/+/#", True),
])
def test_filter_covered(pattern, flt, expected):
    assert filter_covered(pattern, flt) is expected


@pytest.mark.parametrize("flt,inner", [
    ("devices/+/telemetry", "devices/+/telemetry"), ("$share/g/devices/+/telemetry", "devices/+/telemetry"),
    ("$share/g/#", "#"), ("$share/g/$share/h/x", "$share/h/x"), ("$SHARE/g/x", "$SHARE/g/x"),
    ("$share", "$share"), ("$share/", None), ("$share/g", None), ("$share/g/", None), ("$share//x", None),
])
def test_strip_share(flt, inner):
    assert strip_share(flt) == inner


def test_strip_share_refuses_wildcards_in_the_share_name():
    for flt in ("$share/+/devices/d/telemetry", "$share/#/devices/d/telemetry", "$share/a+/devices/d/telemetry"):
        assert strip_share(flt) is None, flt


def test_a_leading_wildcard_rule_does_not_cover_dollar_filters():
    for pattern, flt in (("#", "$SYS/#"), ("#", "$CONTROL/#"), ("#", CONTROL_RESPONSE),
                         ("+/+/+", "$CONTROL/tessera/v1"), ("#", "$share/g/$SYS/#")):
        assert not topic_matches(pattern, flt.removeprefix("$share/g/").replace("#", "x"))  # delivery is refused
        assert not allows(Grants(subscribe=(pattern,)), "subscribe", flt), (pattern, flt)


def test_malformed_topics_and_filters_are_refused():
    for g, action, topic in ((COMMANDER, "publish", "devices/+/commands"), (COMMANDER, "publish", "fleet/groups/#"),
                             (READER, "subscribe", "devices/x#/telemetry"),
                             (READER, "subscribe", "devices/+x/telemetry"), (Grants(subscribe=("#",)), "subscribe", "")):
        assert not allows(g, action, topic), (action, topic)


# --- allows: the roles -----------------------------------------------------------------------------------------------

def test_device_is_confined_to_its_own_subtree():
    for kind in ("telemetry", "events", "status", "commands/ack"):
        assert allows(DEVICE, "publish", f"devices/dev-1/{kind}")
        assert not allows(DEVICE, "publish", f"devices/dev-2/{kind}")
    assert allows(DEVICE, "publish", "devices/dev-1/status", retain=True)
    for topic in ("devices/dev-1/telemetry", "devices/dev-1/events", "devices/dev-1/commands/ack"):
        assert not allows(DEVICE, "publish", topic, retain=True)
    for topic in ("devices/dev-1/commands", "devices/dev-2/commands", "devices/dev-1/telemetry/x", "devices/dev-1",
                  "fleet/groups/g1/x", "devices/dev-1/commands/ack/x", CONTROL_TOPIC, "$SYS/x", "x"):
        assert not allows(DEVICE, "publish", topic), topic
    assert allows(DEVICE, "subscribe", "devices/dev-1/commands")
    assert allows(DEVICE, "subscribe", "fleet/groups/g1/#") and allows(DEVICE, "subscribe", "fleet/groups/g1/a/+")
    assert allows(DEVICE, "subscribe", "$share/x/devices/dev-1/commands")
    for flt in HOSTILE_FILTERS + ["devices/dev-1/#", "devices/dev-1/+", "devices/dev-1/commands/#",
                                  "devices/dev-1/telemetry", "fleet/groups/g2/#", "fleet/groups/+/x"]:
        assert not allows(DEVICE, "subscribe", flt), flt
    assert allows(DEVICE, "receive", "devices/dev-1/commands") and allows(DEVICE, "receive", "fleet/groups/g1/x/y")
    for topic in ("devices/dev-2/commands", "devices/dev-1/telemetry", "fleet/groups/g2/x", CONTROL_RESPONSE):
        assert not allows(DEVICE, "receive", topic), topic


def test_telemetry_reader_reads_and_never_writes():
    for kind in ("telemetry", "status", "events"):
        assert allows(READER, "subscribe", f"devices/+/{kind}")
        assert allows(READER, "subscribe", f"devices/dev-9/{kind}")
        assert allows(READER, "subscribe", f"$share/readers/devices/+/{kind}")
        assert allows(READER, "receive", f"devices/dev-9/{kind}")
    for flt in HOSTILE_FILTERS + ["devices/+/commands/ack", "devices/+/+"]:
        assert not allows(READER, "subscribe", flt), flt
    assert not allows(READER, "receive", "devices/dev-9/commands")
    for topic in ("devices/dev-9/commands", "devices/dev-9/telemetry", "fleet/groups/g1/x", CONTROL_TOPIC):
        assert not allows(READER, "publish", topic), topic


def test_commander_commands_but_does_not_read_telemetry():
    assert allows(COMMANDER, "publish", "devices/dev-9/commands")
    assert allows(COMMANDER, "publish", "fleet/groups/g1/reboot")
    assert not allows(COMMANDER, "publish", "devices/dev-9/commands", retain=True)  # commands are never retained
    assert allows(COMMANDER, "subscribe", "devices/+/commands/ack") and allows(COMMANDER, "subscribe", "devices/+/status")
    for topic in ("devices/dev-9/telemetry", "devices/dev-9/status", "devices/dev-9/commands/ack", CONTROL_TOPIC,
                  "$CONTROL/dynamic-security/v1"):
        assert not allows(COMMANDER, "publish", topic), topic
    for flt in HOSTILE_FILTERS + ["devices/+/telemetry"]:
        assert not allows(COMMANDER, "subscribe", flt), flt
    assert not allows(COMMANDER, "receive", "devices/dev-9/telemetry")


def test_only_the_hub_speaks_to_the_broker_plugin():
    for g in (DEVICE, READER, COMMANDER, ADMIN):
        assert not allows(g, "publish", CONTROL_TOPIC)
        assert not allows(g, "subscribe", CONTROL_RESPONSE) and not allows(g, "receive", CONTROL_RESPONSE)
    assert allows(HUB, "publish", CONTROL_TOPIC)
    assert allows(HUB, "subscribe", CONTROL_RESPONSE) and allows(HUB, "receive", CONTROL_RESPONSE)
    for flt in ("$CONTROL/#", "$CONTROL/+/v1/response", "$CONTROL/dynamic-security/v1/response", "$SYS/#", "#"):
        assert not allows(HUB, "subscribe", flt), flt
    assert not allows(HUB, "publish", "$CONTROL/dynamic-security/v1")
    assert not allows(HUB, "publish", "devices/dev-1/telemetry") and not allows(HUB, "publish", CONTROL_TOPIC, True)


def test_allows_refuses_unknown_actions():
    with pytest.raises(AuthzError):
        allows(DEVICE, "retain", "devices/dev-1/status")
    with pytest.raises(AuthzError):
        allows(DEVICE, "PUBLISH", "devices/dev-1/status")


def test_malformed_share_is_refused():
    for flt in ("$share/g", "$share//devices/+/telemetry", "$share/g/"):
        assert not allows(READER, "subscribe", flt), flt
