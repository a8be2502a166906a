"""The broker's whole authorization table: principals x topics x actions, against one real hub.

Principals: two devices (D1 in group g1, D2 in none), service identities with the built-in roles
telemetry-reader, commander and admin, and one with a role made from data (`tessera-hub role set`): it may
subscribe to devices/# but only receive statuses, publish to fleet/groups/g2/# and retain on fleet/groups/+/x.

Each cell is four characters, one per action (a '.' means refused, a '-' means it does not apply):
  p  publish: a QoS 1 PUBLISH gets a successful PUBACK (0x00, or 0x10 "no matching subscribers")
  r  retain: the same with the retain flag
  s  subscribe: the SUBACK grants QoS 1 for this topic or filter
  d  delivered: for a topic, the message its designated publisher (an allowed one) sent there reached this
     principal, through any of its subscriptions; for a filter, some message reached it through the
     subscription to that filter (told apart by MQTT v5 subscription identifiers); for $share/s/..., each
     principal uses its own share group name (the members of one group take turns receiving)
Every principal holds one session that attempts every subscription, then every publish; the cells are read from
the broker's answers and from what arrived. The same table is derived from hub.authz.policy.allows (the Python
policy and the broker plugin must agree), and every message that arrived must have been allowed and carry the
plugin's tessera-sender / tessera-role stamp.

That whole table is Mosquitto's. On both brokers (`target`, brokerkinds.py: this module's Mosquitto hub and the
session's RabbitMQ cluster hub) run the publish and subscribe cells, each broker's expected from the same table
(`broker_cells`: RabbitMQ 3.10 derives p and s only, s also needs the receive rules to cover the filter, no
$share, each rule from hub.authz.policy, never wider than Mosquitto), forged messages and commands that reach
only their device (not delivered elsewhere), and a role or group change taking the rights it removes away.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from hub.authz.policy import DEFAULT_ROLES, allows, expand, filter_covered, strip_share, topic_matches, valid_filter
from tests.integration.brokerfixtures import (NOT_AUTHORIZED, add_identity, admin_call, broker_hub, enroll_device,
                                              exchange, session, sessions)
from tests.integration.brokerkinds import CUT_TIMEOUT, broker_kind, rabbit_cluster_hub, target  # noqa: F401

pytestmark = pytest.mark.integration

D1, D2 = "tab-d1", "tab-d2"
CUSTOM_RULES = (("subscribe", "devices/#"), ("receive", "devices/+/status"), ("publish", "fleet/groups/g2/#"),
                ("retain", "fleet/groups/+/x"))
#: column -> (principal, role, groups)
PRINCIPALS = {
    "d1": (D1, "device", ("g1",)),
    "d2": (D2, "device", ()),
    "reader": ("svc.tab-reader", "telemetry-reader", ()),
    "commander": ("svc.tab-cmd", "commander", ()),
    "admin": ("svc.tab-admin", "admin", ()),
    "custom": ("svc.tab-odd", "tab-odd", ()),
}

EXPECTED = """
topic                           d1    d2    reader  commander  admin  custom
devices/D1/telemetry            p...  ....  ..sd    ....       ..sd   ..s.
devices/D2/telemetry            ....  p...  ..sd    ....       ..sd   ..s.
devices/D1/status               pr..  ....  ..sd    ..sd       ..sd   ..sd
devices/D2/status               ....  pr..  ..sd    ..sd       ..sd   ..sd
devices/D1/events               p...  ....  ..sd    ....       ..sd   ..s.
devices/D2/events               ....  p...  ..sd    ....       ..sd   ..s.
devices/D1/commands             ..sd  ....  ....    p...       p...   ..s.
devices/D2/commands             ....  ..sd  ....    p...       p...   ..s.
devices/D1/commands/ack         p...  ....  ....    ..sd       ..sd   ..s.
devices/D2/commands/ack         ....  p...  ....    ..sd       ..sd   ..s.
fleet/groups/g1/x               ..sd  ....  ....    p...       p...   ....
fleet/groups/g2/x               ....  ....  ....    p...       p...   pr..
$CONTROL/tessera/v1             ....  ....  ....    ....       ....   ....
$CONTROL/tessera/v1/response    ....  ....  ....    ....       ....   ....
$CONTROL/dynamic-security/v1    ....  ....  ....    ....       ....   ....
#                               --..  --..  --..    --..       --..   --..
devices/#                       --..  --..  --..    --..       --..   --sd
devices/D1/#                    --..  --..  --..    --..       --..   --sd
fleet/groups/g1/#               --sd  --..  --..    --..       --..   --..
devices/+/telemetry             --..  --..  --sd    --..       --sd   --s.
$share/s/devices/+/telemetry    --..  --..  --sd    --..       --sd   --s.
$share/s/devices/#              --..  --..  --..    --..       --..   --sd
$SYS/#                          --..  --..  --..    --..       --..   --..
"""

#: Who sends the message a "d" is about, per topic (None: nobody may publish there; any arrival counts).
DESIGNATED = {"telemetry": "d", "status": "d", "events": "d", "commands/ack": "d", "commands": "commander"}


def parse_table(text: str) -> tuple[list[str], list[str], dict[tuple[str, str], str]]:
    lines = [ln.split() for ln in text.strip().splitlines()]
    columns = lines[0][1:]
    rows = [ln[0] for ln in lines[1:]]
    return rows, columns, {(ln[0], col): cell for ln in lines[1:] for col, cell in zip(columns, ln[1:])}


ROWS, COLUMNS, EXPECTED_CELLS = parse_table(EXPECTED)


def concrete(row: str) -> str:
    """The table's topic with the device ids filled in."""
    return row.replace("D1", D1).replace("D2", D2)


def is_filter(row: str) -> bool:
    return "#" in row or "+" in row


def designated(row: str) -> str | None:
    """The column whose publish to `row` the 'd' of a topic row is about."""
    if row.startswith("fleet/groups/"):
        return "commander"
    if row.startswith("devices/"):
        device, kind = row.split("/", 2)[1:]
        who = DESIGNATED[kind]
        return {"D1": "d1", "D2": "d2"}[device] if who == "d" else who
    return None


def grants_of(col: str):
    principal, role, groups = PRINCIPALS[col]
    rules = CUSTOM_RULES if role == "tab-odd" else DEFAULT_ROLES[role]
    return expand(rules, principal, groups)


def policy_table() -> dict[tuple[str, str], str]:
    """The table as hub.authz.policy decides it."""
    out = {}
    for col in COLUMNS:
        g = grants_of(col)
        for row in ROWS:
            t = concrete(row)
            s = "s" if allows(g, "subscribe", t) else "."
            if is_filter(row):
                inner = strip_share(t)
                reachable = any(designated(r) and topic_matches(inner, concrete(r))
                                and allows(g, "receive", concrete(r)) for r in ROWS if not is_filter(r))
                out[row, col] = "--" + s + ("d" if s == "s" and reachable else ".")
            else:
                out[row, col] = ("p" if allows(g, "publish", t) else ".") + \
                    ("r" if allows(g, "publish", t, retain=True) else ".") + s + \
                    ("d" if designated(row) and allows(g, "receive", t) else ".")
    return out


def render(cells: dict[tuple[str, str], str]) -> str:
    width = max(len(r) for r in ROWS) + 2
    lines = ["topic".ljust(width) + "  ".join(c.ljust(9) for c in COLUMNS)]
    lines += [row.ljust(width) + "  ".join(cells[row, c].ljust(9) for c in COLUMNS) for row in ROWS]
    return "\n".join(lines)


def differences(expected: dict, actual: dict) -> list[str]:
    return [f"{row} | {col}: expected {expected[row, col]!r}, got {actual[row, col]!r}"
            for row in ROWS for col in COLUMNS if expected[row, col] != actual[row, col]]


def test_expected_table_is_what_the_python_policy_decides():
    diff = differences(EXPECTED_CELLS, policy_table())
    assert not diff, "EXPECTED and hub.authz.policy disagree:\n" + "\n".join(diff)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with broker_hub(tmp_path_factory.mktemp("broker-table")) as h:
        yield h


def ack_symbol(code, letter: str) -> str:
    if code in (0x00, 0x10):
        return letter
    return "." if code == NOT_AUTHORIZED else f"<{code:#x}>"


def test_broker_enforces_the_whole_table(hub, tmp_path):
    # Mosquitto only: retain and delivery columns, MQTT 5 subscription identifiers and the sender stamps
    started = time.monotonic()
    creds = {"d1": enroll_device(hub, D1, tmp_path, groups=("g1",)), "d2": enroll_device(hub, D2, tmp_path)}
    hub.cli_ok("role", "set", "tab-odd", *[a for action, p in CUSTOM_RULES for a in ("--rule", f"{action}:{p}")])
    for col in ("reader", "commander", "admin", "custom"):
        principal, role, _ = PRINCIPALS[col]
        creds[col] = add_identity(hub, principal.removeprefix("svc."), role, tmp_path)
    # the broker reads the roles from the registry: they must be the policy's
    for role in ("device", "telemetry-reader", "commander", "admin"):
        stored = {(r["action"], r["pattern"]) for r in hub.query(
            "SELECT action, pattern FROM role_rules WHERE role = ?", (role,))}
        assert stored == set(DEFAULT_ROLES[role]), role
    assert {(r["action"], r["pattern"]) for r in hub.query(
        "SELECT action, pattern FROM role_rules WHERE role = 'tab-odd'")} == set(CUSTOM_RULES)

    actual: dict[tuple[str, str], list[str]] = {(row, col): ["-", "-", "?", "?"] for row in ROWS for col in COLUMNS}
    with sessions(*(session(hub, creds[col]) for col in COLUMNS)) as live:
        by_col = dict(zip(COLUMNS, live))
        # subscriptions: identifier = row number + 1
        # (each principal in its own share group: members of one group take turns receiving)
        pending = {(col, row): s.subscribe_async(concrete(row).replace("$share/s/", f"$share/{col}/"), 1,
                                                 sub_id=i + 1)
                   for col, s in by_col.items() for i, row in enumerate(ROWS)}
        for (col, row), mid in pending.items():
            code = by_col[col].wait_ack(mid)[0]
            actual[row, col][2] = "s" if code == 1 else "." if code == NOT_AUTHORIZED else f"<{code:#x}>"
        # publishes: every principal to every topic, plain and retained
        pending = {}
        for col, s in by_col.items():
            for row in ROWS:
                if not is_filter(row):
                    for retain in (False, True):
                        payload = f"{col}|{row}|{'r' if retain else 'p'}".encode()
                        pending[col, row, retain] = s.publish_async(concrete(row), payload, retain=retain)
        admin_call(hub, {"op": "authz_sync"})  # the hub's own $CONTROL traffic, which no one else may see
        publish_ok = {}
        for (col, row, retain), mid in pending.items():
            code = by_col[col].wait_ack(mid)
            actual[row, col][1 if retain else 0] = ack_symbol(code, "r" if retain else "p")
            publish_ok[col, row, retain] = code in (0x00, 0x10)
        # let deliveries settle: nothing new for 0.5 s
        last, count = time.monotonic(), -1
        while time.monotonic() - last < 0.5:
            total = sum(len(s.received) for s in live)
            if total != count:
                count, last = total, time.monotonic()
            time.sleep(0.05)
        received = {col: list(s.received) for col, s in by_col.items()}
        assert all(s.connected for s in live), [(s.client_id, s.disconnect_rc) for s in live if not s.connected]

    problems = []
    for col, msgs in received.items():
        for m in msgs:
            sender, row, kind = m.payload.decode().split("|") if m.payload.count(b"|") == 2 else ("?", "?", "?")
            if sender not in PRINCIPALS or concrete(row) != m.topic:
                problems.append(f"{col} received an unexpected message {m}")
                continue
            if not publish_ok[sender, row, kind == "r"]:
                problems.append(f"{col} received a message whose publish was refused: {m}")
            principal, role, _ = PRINCIPALS[sender]
            if m.user_props != (("tessera-sender", principal), ("tessera-role", role)):
                problems.append(f"{col} received {m.topic} from {sender} stamped {m.user_props}")
    for col in COLUMNS:
        for i, row in enumerate(ROWS):
            if is_filter(row):
                got = any(i + 1 in m.sub_ids for m in received[col])
            else:
                who = designated(row)
                wanted = f"{who}|{row}|p".encode() if who else None
                got = any(m.topic == concrete(row) and (wanted is None or m.payload == wanted) for m in received[col])
            actual[row, col][3] = "d" if got else "."
    cells = {k: "".join(v) for k, v in actual.items()}
    diff = differences(EXPECTED_CELLS, cells)
    assert not diff, "the broker's table differs:\n" + "\n".join(diff) + "\n\nactual:\n" + render(cells)
    assert not problems, "\n".join(problems)
    assert time.monotonic() - started < 90


def traffic(hub) -> dict:
    """The hub's per-device message counters (what its admin session saw on devices/+/telemetry etc.)."""
    return admin_call(hub, {"op": "traffic"})


def count_of(counters: dict, device_id: str) -> int:
    return counters.get(device_id, {}).get("messages", 0)


def test_forged_device_messages_never_reach_the_hub(target, tmp_path):
    """Device A writing into device B's topics is refused, and the hub's own session (which attributes messages
    to devices by topic: traffic counters, presence) sees only B's genuine messages."""
    hub = target.hub
    a, b = enroll_device(hub, "tab-a", tmp_path), enroll_device(hub, "tab-b", tmp_path)
    with sessions(target.session(b, 1)) as (sb,):
        assert sb.publish("devices/tab-b/status", b"online", retain=True) == 0
        deadline = time.monotonic() + 5
        while not hub.device_list()["tab-b"]["online"]:
            assert time.monotonic() < deadline, "the hub never saw tab-b online"
            time.sleep(0.05)
        before = traffic(hub)
        with sessions(target.session(a)) as (sa,):
            for kind in ("telemetry", "events", "commands/ack", "status"):
                sa.publish(f"devices/tab-b/{kind}", b'{"forged":true}', qos=0)
        for kind in ("telemetry", "events", "commands/ack", "status"):
            target.assert_publish_refused(a, f"devices/tab-b/{kind}", b'{"forged":true}', i=2)
        target.assert_publish_refused(a, "devices/tab-b/status", b"offline", retain=True)
        assert sb.publish("devices/tab-b/telemetry", b'{"genuine":true}') == 0
        deadline = time.monotonic() + 5
        while count_of(traffic(hub), "tab-b") <= count_of(before, "tab-b"):
            assert time.monotonic() < deadline, "the hub never counted tab-b's genuine message"
            time.sleep(0.05)
        time.sleep(0.5)
        after = traffic(hub)
        assert count_of(after, "tab-b") == count_of(before, "tab-b") + 1, (before, after)
        assert count_of(after, "tab-a") == count_of(before, "tab-a")
        assert hub.device_list()["tab-b"]["online"], "a forged offline status reached the hub"
        assert sb.connected


def test_a_device_command_reaches_only_its_device(target, tmp_path):
    """A commander commands D1: D1 (on another node) gets it, D2 (subscribed to its own commands on a third) does
    not; D1 cannot subscribe to D2's commands, nor publish into them."""
    hub = target.hub
    d1, d2 = enroll_device(hub, "tab-x1", tmp_path), enroll_device(hub, "tab-x2", tmp_path)
    cmd = add_identity(hub, "tab-xcmd", "commander", tmp_path)
    with sessions(target.session(d1, 2), target.session(d2, 1), target.session(cmd)) as (s1, s2, c):
        assert s1.subscribe(f"devices/{d1.id}/commands") == 1
        assert s2.subscribe(f"devices/{d2.id}/commands") == 1
        time.sleep(0.3)  # RabbitMQ: bindings are cluster-wide metadata, let them settle before publishing
        msg = exchange(c, s1, f"devices/{d1.id}/commands", b"ping")
        target.assert_stamped(msg, cmd.id, "commander")
        time.sleep(0.3)
        assert not any(m.payload == b"ping" for m in s2.received)
    target.assert_subscribe_refused(d1, f"devices/{d2.id}/commands", i=1)
    target.assert_publish_refused(d1, f"devices/{d2.id}/commands", i=1)


# --- the publish and subscribe cells on both brokers -----------------------------------------------------------------

def broker_cells(kind: str) -> dict[tuple[str, str], str]:
    """The table's publish and subscribe cells (two characters) as `kind` enforces them: Mosquitto's are EXPECTED's;
    RabbitMQ 3.10's come from hub.authz.policy with its documented differences (hub/broker/rabbitmq/auth.py) and
    nothing else: s also needs the receive rules to cover the filter, no $share subscriptions."""
    out = {}
    for (row, col), cell in EXPECTED_CELLS.items():
        if kind == "mosquitto":
            out[row, col] = cell[0] + cell[2]
            continue
        g, t = grants_of(col), concrete(row)
        sub = (not t.startswith("$share/") and valid_filter(t) and allows(g, "subscribe", t)
               and any(filter_covered(x, t) for x in g.receive))
        assert sub <= (cell[2] == "s"), (row, col)  # never wider than on Mosquitto
        out[row, col] = cell[0] + ("s" if sub else ".")
    return out


def test_broker_cells_for_rabbitmq_differ_only_where_documented():
    """Every RabbitMQ cell that is not Mosquitto's is a subscription the receive rules do not cover or a $share."""
    mosq, rabbit = broker_cells("mosquitto"), broker_cells("rabbitmq")
    changed = sorted(k for k in mosq if mosq[k] != rabbit[k])
    assert changed, "RabbitMQ's cells would be Mosquitto's: the derivation proves nothing"
    for row, col in changed:
        assert (mosq[row, col], rabbit[row, col]) == (mosq[row, col][0] + "s", mosq[row, col][0] + "."), (row, col)
        g = grants_of(col)
        assert row.startswith("$share/") or not any(filter_covered(x, concrete(row)) for x in g.receive), (row, col)


def test_broker_confines_publish_and_subscribe(target, tmp_path):
    """Every principal (cf-* names, each on its own node) tries every cell: a QoS 1 PUBLISH to each topic and a
    SUBSCRIBE to each topic and filter, answered in the broker's own terms (brokerkinds: RabbitMQ closes the
    connection for a refusal, so a principal reconnects after one)."""
    hub = target.hub
    hub.cli_ok("role", "set", "tab-odd", *[a for action, p in CUSTOM_RULES for a in ("--rule", f"{action}:{p}")])
    creds = {}
    for col, (principal, role, groups) in PRINCIPALS.items():
        name = principal.replace("tab-", "cf-")
        creds[col] = enroll_device(hub, name, tmp_path, groups=groups) if role == "device" else \
            add_identity(hub, name.removeprefix("svc."), role, tmp_path)
    expected = broker_cells(target.kind)

    def topic(row: str) -> str:
        return row.replace("D1", creds["d1"].id).replace("D2", creds["d2"].id)

    def column(n: int, col: str) -> list[tuple]:
        dev, current, wrong = creds[col], [], []

        def refused(attempt) -> bool:
            if not current or current[-1].disconnected.is_set():
                current.append(target.session(dev, n))
            return attempt(current[-1])

        try:
            for row in ROWS:
                cell, t = expected[row, col], topic(row)
                if cell[0] != "-" and refused(lambda x: target.publish_refused(x, t)) != (cell[0] == "."):
                    wrong.append((t, col, "publish", cell[0]))
                if refused(lambda x: target.subscribe_refused(x, t)) != (cell[1] == "."):
                    wrong.append((t, col, "subscribe", cell[1]))
        finally:
            for x in current:
                x.close()
        return wrong

    with ThreadPoolExecutor(len(creds)) as pool:  # the principals at once
        wrong = [w for ws in pool.map(column, range(len(creds)), creds) for w in ws]
    assert not wrong, f"cells where {target.kind} disagrees with the policy:\n" + "\n".join(map(str, wrong))


# --- a role change ---------------------------------------------------------------------------------------------------

def assert_right_gone(target, s, sender, topic: str, wait: float) -> None:
    """The live session s has lost the right to receive `topic`, in the broker's terms: Mosquitto checks each
    delivery against the rights as they are now (the session stays, `sender`'s message there is not delivered);
    RabbitMQ keeps a session's rights, so the driver closes the session (within `wait` s)."""
    if target.rabbitmq:
        target.assert_cut(s, f"rights to {topic} removed", wait)
        return
    assert sender.publish(topic, b"after") == 0
    time.sleep(0.5)
    assert s.connected and not any(m.payload == b"after" for m in s.received), f"a removed right: {topic} delivered"


def test_group_change_takes_the_group_rights_away(target, tmp_path):
    """`device edit --no-groups`: a device leaving g1 loses fleet/groups/g1/# in its live session (RabbitMQ: the
    driver kicks it, its groups changed) and cannot subscribe there again."""
    hub = target.hub
    dev = enroll_device(hub, "tab-grp", tmp_path, groups=("g1",))
    cmd = add_identity(hub, "tab-grpcmd", "commander", tmp_path)
    with sessions(target.session(dev, 1), target.session(cmd, 2)) as (sd, sc):
        assert sd.subscribe("fleet/groups/g1/#") == 1
        time.sleep(0.3)  # RabbitMQ: bindings are cluster-wide metadata, let them settle before publishing
        exchange(sc, sd, "fleet/groups/g1/x", b"before")
        hub.cli_ok("device", "edit", dev.id, "--no-groups")
        assert_right_gone(target, sd, sc, "fleet/groups/g1/x", CUT_TIMEOUT)
    with sessions(target.session(dev, 1)) as (sd,):
        assert target.subscribe_refused(sd, "fleet/groups/g1/#")


def test_role_change_takes_the_removed_rights_away(target, tmp_path):
    """`role set` narrows a role: what it removed is gone for the live session (Mosquitto: the plugin checks each
    delivery against the role as it is now, the session stays; RabbitMQ keeps a session's rights, so the driver
    closes every session of the role, a second pass ROLE_RECHECK s later for the ones its API had not listed yet),
    and after reconnecting the removed right is refused, the kept one still granted."""
    from hub.broker.rabbitmq import ROLE_RECHECK

    hub = target.hub
    wide = ["subscribe:devices/+/status", "receive:devices/+/status", "subscribe:devices/+/events",
            "receive:devices/+/events"]
    hub.cli_ok("role", "set", "tab-role", *[a for r in wide for a in ("--rule", r)])
    svc = add_identity(hub, "tab-roled", "tab-role", tmp_path)
    dev = enroll_device(hub, "tab-rsrc", tmp_path)
    with sessions(target.session(svc, 1), target.session(dev, 2)) as (s, sd):
        assert s.subscribe("devices/+/events") == 1
        exchange(sd, s, "devices/tab-rsrc/events", b"before")
        hub.cli_ok("role", "set", "tab-role", *[a for r in wide[:2] for a in ("--rule", r)])
        assert_right_gone(target, s, sd, "devices/tab-rsrc/events", ROLE_RECHECK + CUT_TIMEOUT)
    with sessions(target.session(svc, 1)) as (s,):
        assert s.subscribe("devices/+/status") == 1
        assert target.subscribe_refused(s, "devices/+/events")
