"""`tessera-agent renew` run from a shell while `tessera-agent run` is running: the running agent notices the new
certificate (agent.certwatch: identity.json replaced) and switches its MQTT session to it without losing a message,
and `renew` says that it did.

Real hub and broker, the agent and `renew` as separate processes on one SoftHSM token; `renew` on each TLS route
(`tls_route`: the running agent loads the same key into TLS again), `rotate-key` on one (see CASES). The superseded certificate is then refused by the broker:
a second agent started on a copy of the old state ends in state `refused`.
Cost: ~6 s per case (one hub for the module).
"""

from __future__ import annotations

import shutil
import time

import pytest

from tests.helpers import selected_routes
from tests.integration.agentfixtures import (  # noqa: F401  (hub, make_device are fixtures)
    Device, broker_log, hub, make_device, one_line, telemetry, wait_until,
)

pytestmark = pytest.mark.integration


#: renew (the same key loaded again into TLS in the running agent) on each route; rotate-key on the first route
#: only: a new key loaded in a running agent is test_agent_renewal's rotation test, on each token and route
CASES = [(False, route) for route in selected_routes()] + [(True, selected_routes()[0])]


@pytest.mark.parametrize(("rotate", "tls_route"), CASES, indirect=["tls_route"],
                         ids=[f"{'rotate-key' if r else 'renew'}-{route}" for r, route in CASES])
def test_renew_by_hand_switches_the_running_agent(hub, make_device, tls_route, rotate):  # noqa: F811
    dev, token = make_device(f"hand-{'rot' if rotate else 'ren'}-{tls_route}", interval=0.1, route=tls_route)
    dev.enroll_ok(token)
    old_state = dev.base / "old-state"
    shutil.copytree(dev.state, old_state)
    proc = dev.start()
    dev.wait_state("online", 30)
    time.sleep(1.0)                                             # telemetry flowing on the first certificate
    before = dev.status_file()
    assert before["session_serial"] == before["cert_serial"]
    connects = broker_log(hub).count(f"as {dev.id} ")

    renew = dev.cli("renew", *(["--rotate-key"] if rotate else []))
    out = one_line(renew.stdout)
    assert renew.returncode == 0, renew.stdout + renew.stderr
    assert "renewed: certificate" in out, out
    assert f"the running agent (pid {proc.pid}) switched its session to the new certificate" in out, \
        out + "\n" + dev.log_text()[-3000:]
    new_serial = dev.identity()["serial"]
    assert new_serial != before["cert_serial"]
    st = dev.status_file()
    assert (st["pid"], st["state"], st["session_serial"]) == (proc.pid, "online", new_serial)
    assert proc.poll() is None, "the agent must switch, not restart"
    assert "stored by another process" in dev.log_text()
    assert broker_log(hub).count(f"as {dev.id} ") > connects, "no new broker connection with the new certificate"
    certs = {c["serial"]: c["status"] for c in hub.show(dev.id)["certificates"]}
    assert certs == {before["cert_serial"]: "superseded", new_serial: "active"}
    time.sleep(1.0)                                             # telemetry on the new session

    if not rotate:  # the same key: the superseded certificate alone is what the broker must refuse
        ghost = Device(dev.id, dev.base / "ghost", hub, dev.token, interval=1.0, route=dev.route)
        ghost.base.mkdir()
        ghost.write_config()
        shutil.copytree(old_state, ghost.state)
        try:
            ghost.start()
            st = ghost.wait_state("refused", 40)
            assert "old certificate" in st["last_error"], st
        finally:
            ghost.stop()
        assert dev.status_file()["session_serial"] == new_serial and proc.poll() is None

    assert dev.stop() == 0
    dev.assert_route()
    last = dev.status_file()["telemetry_seq"]
    assert dev.status()["spool_depth"] == 0
    wait_until(lambda: {t["seq"] for t in telemetry(hub, dev.id)} >= set(range(1, last + 1)), 15,
               "the hub to log every telemetry message")
    seqs = sorted({t["seq"] for t in telemetry(hub, dev.id)})
    assert seqs == list(range(1, last + 1)), f"telemetry lost across the switch: {seqs}"
    assert last >= 20
