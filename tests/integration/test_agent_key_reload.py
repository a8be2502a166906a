"""A key rotated by another process beside a running agent (`tessera-agent renew --rotate-key` from a shell), on
each token type and TLS route: on a TPM the agent restarts itself to load the key (tpm2-pkcs11 shows a process
only the objects its store held at C_Initialize; agent/sessionrenew.py), on SoftHSM2 it switches in-process.
Either way: same pid, the renew CLI sees the switch, the broker sees the new certificate, and the telemetry
sequence runs on across the switch without a gap or a restart from 1.

The rotation from a `renew` command (the renewal child) is test_agent_renewal.py's; this is the other way in
(agent.certwatch). Cost: about 6-9 s per variant (an enrollment, a renewal with a new key, two connections).
"""

from __future__ import annotations

import time

import pytest

from tests.integration.agentfixtures import (  # noqa: F401  (hub, make_token_device are fixtures)
    broker_log, hub, make_token_device, one_line, telemetry, wait_until,
)

pytestmark = pytest.mark.integration

RESTART = "restarting the agent to load it"


def test_key_rotated_by_hand_reaches_the_running_agent(hub, make_token_device):
    dev, token = make_token_device("reload", interval=0.1)
    dev.enroll_ok(token)
    proc = dev.start()
    dev.wait_state("online", 30)
    time.sleep(0.8)                                             # telemetry flowing on the first key
    before = dev.status_file()
    connects = broker_log(hub).count(f"as {dev.id} ")

    renew = dev.cli("renew", "--rotate-key")
    out = one_line(renew.stdout)
    assert renew.returncode == 0, renew.stdout + renew.stderr
    assert f"the running agent (pid {proc.pid}) switched its session to the new certificate" in out, \
        out + "\n" + dev.log_text()[-3000:]
    after = dev.identity()
    assert after["key_uri"] != before["key_uri"]
    st = dev.status_file()
    assert (st["pid"], st["state"], st["session_serial"]) == (proc.pid, "online", after["serial"])
    assert proc.poll() is None
    log = dev.log_text()
    if "tpm" in dev.id:
        assert RESTART in log and "telemetry continues after seq" in log, log[-3000:]
    else:
        assert RESTART not in log, log[-3000:]
    assert broker_log(hub).count(f"as {dev.id} ") > connects
    time.sleep(0.8)                                             # telemetry on the new key

    assert dev.stop() == 0
    dev.assert_route()
    last = dev.status_file()["telemetry_seq"]
    assert last > before["telemetry_seq"]
    wait_until(lambda: {t["seq"] for t in telemetry(hub, dev.id)} >= set(range(1, last + 1)), 15,
               "the hub to log every telemetry message")
    tel = telemetry(hub, dev.id)
    assert sorted({t["seq"] for t in tel}) == list(range(1, last + 1)), [t["seq"] for t in tel]
    # one sequence, not a second run counting from 1 again: a resent message repeats its envelope (same ts), a
    # restarted count would give a seq a second, later ts
    stamps: dict[int, set] = {}
    for t in tel:
        stamps.setdefault(t["seq"], set()).add(t["ts"])
    assert all(len(ts) == 1 for ts in stamps.values()), {s: ts for s, ts in stamps.items() if len(ts) > 1}
