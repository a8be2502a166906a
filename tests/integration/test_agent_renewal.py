"""Certificate renewal by a running agent: on command (with key rotation) while telemetry flows, and by policy.

The policy path runs `agent.session.Agent` in a child process (`python -c`) with an injected clock set past 2/3 of
the certificate lifetime, for a few seconds (Agent.run(max_seconds=...)); the hub is the real one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import timedelta

import pytest

from tests.helpers import ROOT, one_tls_route
from tests.integration.agentfixtures import (  # noqa: F401  (hub, make_device, make_token_device are fixtures)
    KEY_LABEL, broker_log, hub, make_device, make_token_device, telemetry, wait_until,
)

pytestmark = pytest.mark.integration

# Runs Agent(cfg, clock=...) for argv[3] seconds. argv[2] is the clock offset in seconds; with argv[4] == "once"
# the offset only holds until the first renewal (afterwards the clock is right again, as after an NTP fix).
CLOCK_CHILD = """
import json, logging, sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from agent.config import load
from agent.session import Agent


def main():
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    cfg = load(Path(sys.argv[1]))
    offset, seconds, mode = timedelta(seconds=float(sys.argv[2])), float(sys.argv[3]), sys.argv[4]
    holder = {}

    def clock():
        agent = holder.get("agent")
        if mode == "once" and agent is not None and agent.ident.renewed_at:
            return datetime.now(timezone.utc)
        return datetime.now(timezone.utc) + offset

    agent = holder["agent"] = Agent(cfg, clock=clock)
    first = agent.ident.serial
    rc = agent.run(max_seconds=seconds)
    print(json.dumps({"rc": rc, "first": first, "serial": agent.ident.serial, "renewed_at": agent.ident.renewed_at,
                      "connected": agent.connected_at is not None}))


if __name__ == "__main__":   # hsm.worker spawns children that import __main__
    main()
"""


def run_with_clock(dev, offset: timedelta, seconds: float, mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CLOCK_CHILD, str(dev.config), str(offset.total_seconds()),
                           str(seconds), mode], capture_output=True, text=True, timeout=seconds + 90,
                          env=dev.env(), cwd=ROOT, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["stderr"] = proc.stderr
    return result


def lifetime(dev) -> timedelta:
    from datetime import datetime

    ident = dev.identity()
    return datetime.fromisoformat(ident["not_after"]) - datetime.fromisoformat(ident["not_before"])


def test_renew_with_key_rotation_while_telemetry_flows(hub, make_token_device):
    """A running agent rotates its key and reconnects with it: a second token key loaded into TLS in one process,
    on each token type and TLS route."""
    dev, token = make_token_device("ren-1", interval=0.1)
    dev.enroll_ok(token)
    dev.start()
    dev.wait_state("online", 30)
    time.sleep(1.0)
    before = dev.status()
    old_keys = dev.private_keys()
    assert len(old_keys) == 1
    connects_before = broker_log(hub).count(f"as {dev.id} ")

    proc = hub.cli("device", "send", dev.id, "renew", "--arg", "rotate_key=true", "--wait", "15")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ack = json.loads(proc.stdout)
    assert ack["ok"] and ack["result"] == {"renewal": "scheduled", "rotate_key": True}

    wait_until(lambda: dev.status_file().get("cert_serial") not in (None, before["cert_serial"]), 30,
               "the agent to store a new certificate")
    dev.wait_state("online", 30)
    time.sleep(1.5)                                   # telemetry on the new connection
    after = dev.status()
    assert after["connection"] == "online"
    assert after["cert_serial"] != before["cert_serial"]
    assert after["key_uri"] != before["key_uri"]
    old_id = before["key_uri"].rsplit("id=", 1)[1]
    new_id = after["key_uri"].rsplit("id=", 1)[1]
    assert old_id != new_id
    assert f"object={KEY_LABEL}-" in after["key_uri"]
    # the new certificate's key is the new token key, and the old key is gone from the token
    keys = dev.private_keys()
    assert len(keys) == 1 and keys[0].id != old_keys[0].id, keys
    # the hub: the new certificate is active, the old one superseded (not revoked)
    certs = {c["serial"]: c["status"] for c in hub.show(dev.id)["certificates"]}
    assert certs == {before["cert_serial"]: "superseded", after["cert_serial"]: "active"}
    # the agent reconnected with the new certificate
    assert broker_log(hub).count(f"as {dev.id} ") > connects_before

    assert dev.stop() == 0
    dev.assert_route()
    tel = telemetry(hub, dev.id)
    seqs = sorted({t["seq"] for t in tel})
    assert seqs == list(range(1, seqs[-1] + 1)), f"gap in telemetry across the renewal: {seqs}"
    assert seqs[-1] >= 25
    assert dev.status()["spool_depth"] == 0


@one_tls_route  # each process loads one key once: that, per token and route, is test_hsm_tls's; the rotation above
def test_cli_renew_with_key_rotation_then_run(hub, make_token_device):
    """`tessera-agent renew --rotate-key` with no agent running (what failed on a TPM: the new key's template),
    then `run` connects with the new key, on each token type."""
    dev, token = make_token_device("ren-cli", interval=0.2)
    dev.enroll_ok(token)
    before = dev.identity()
    proc = dev.cli("renew", "--rotate-key", "--wait", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    after = dev.identity()
    assert after["serial"] != before["serial"] and after["key_label"] != before["key_label"], after
    assert [k.label for k in dev.private_keys()] == [after["key_label"]]  # the old key is gone
    certs = {c["serial"]: c["status"] for c in hub.show(dev.id)["certificates"]}
    assert certs[after["serial"]] == "active", certs
    dev.start()
    st = dev.wait_state("online", 30)
    assert st["cert_serial"] == after["serial"], st
    dev.assert_route()


def test_agent_renews_by_itself_past_two_thirds_of_the_lifetime(hub, make_device):
    dev, token = make_device("ren-2", interval=1.0)
    dev.enroll_ok(token)
    ident = dev.identity()
    offset = lifetime(dev) * 0.70                     # renewal fraction 2/3
    result = run_with_clock(dev, offset, 6.0, "once")
    assert result["rc"] == 0 and result["connected"], result
    assert result["serial"] != result["first"], result["stderr"]
    new = dev.identity()
    assert new["serial"] == result["serial"] and new["renewed_at"]
    assert new["key_uri"] == ident["key_uri"], "a policy renewal keeps the key"
    assert "renewed ren-2" in result["stderr"]
    certs = {c["serial"]: c["status"] for c in hub.show("ren-2")["certificates"]}
    assert certs == {ident["serial"]: "superseded", new["serial"]: "active"}


def test_agent_does_not_renew_before_two_thirds_of_the_lifetime(hub, make_device):
    """Control for the test above: the same child with the clock at 60 % of the lifetime changes nothing."""
    dev, token = make_device("ren-3", interval=1.0)
    dev.enroll_ok(token)
    ident = dev.identity()
    result = run_with_clock(dev, lifetime(dev) * 0.60, 4.0, "once")
    assert result["rc"] == 0 and result["connected"], result
    assert result["serial"] == ident["serial"]
    assert len(hub.show("ren-3")["certificates"]) == 1


def test_clock_ahead_does_not_cause_a_renewal_storm(hub, make_device):
    dev, token = make_device("ren-4", interval=1.0)
    dev.enroll_ok(token)
    result = run_with_clock(dev, lifetime(dev) * 0.70, 6.0, "always")
    assert result["rc"] == 0 and result["connected"], result
    issued = len(hub.show("ren-4")["certificates"])
    assert issued <= 2, f"{issued} certificates issued to one device in 6 s"
