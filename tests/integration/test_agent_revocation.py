"""A revoked device: the hub's broker drops it and refuses its certificate; the agent says so, retries slowly
(no reconnect storm), keeps running, and stops cleanly on SIGTERM."""

from __future__ import annotations

import re
import time
from datetime import datetime

import pytest

from tests.integration.agentfixtures import (  # noqa: F401  (hub, make_device are fixtures)
    broker_log, hub, make_device, telemetry, wait_until,
)
from tests.integration.brokerfixtures import refusals

pytestmark = pytest.mark.integration

WATCH_S = 5.0
MAX_ATTEMPTS = 2      # slow backoff after a refusal: the next retry is uniform in [0, 30 s], then [0, 60 s]


def agent_attempts(log_text: str) -> int:
    """Connection attempts in the agent's log: each one sets the state to 'connecting' (it logs state changes)."""
    return log_text.count("state: connecting")


def test_revoked_device_is_refused_and_stops_cleanly(hub, make_device):
    dev, token = make_device("rev-1", interval=0.2)
    dev.enroll_ok(token)
    dev.start()
    dev.wait_state("online", 30)
    wait_until(lambda: telemetry(hub, "rev-1"), 15, "telemetry from rev-1")

    proc = hub.cli("device", "revoke", "rev-1", "--reason", "keyCompromise")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    revoked_at = time.monotonic()
    st = dev.wait_state("revoked", 20)
    assert "revoked" in st["last_error"].lower() and "refuses this device's certificate" in st["last_error"], st
    seen_at = time.monotonic()
    assert seen_at - revoked_at < 20

    # no reconnect storm: count the agent's connection attempts for WATCH_S seconds
    mark, agent_mark = len(broker_log(hub)), len(dev.log_text())
    n_tel = len(telemetry(hub, "rev-1"))
    time.sleep(WATCH_S)
    attempts = agent_attempts(dev.log_text()[agent_mark:])
    assert attempts <= MAX_ATTEMPTS, f"{attempts} connection attempts in {WATCH_S} s after revocation:\n" \
                                     + dev.log_text()
    assert dev.proc.poll() is None, "a revoked agent keeps running (it retries slowly)"
    assert len(telemetry(hub, "rev-1")) == n_tel, "no telemetry gets through after revocation"
    assert " as rev-1 " not in broker_log(hub)[mark:]
    # the broker's side of it: each attempt in the window was refused by the authz plugin as revoked
    refused = [r for p, _, r in refusals(hub, mark) if p == "rev-1"]
    assert len(refused) <= MAX_ATTEMPTS and set(refused) <= {"revoked"}, refused

    # status from the CLI
    cli = dev.status()
    assert cli["connection"] == "revoked" and cli["last_error"] == st["last_error"]
    assert datetime.fromisoformat(cli["since"])

    # SIGTERM ends the (long) backoff wait at once, exit 0
    started = time.monotonic()
    assert dev.stop(timeout=10) == 0, dev.log_text()
    assert time.monotonic() - started < 3, "SIGTERM must interrupt the slow-retry wait"
    assert dev.status()["connection"] == "stopped"
    log = dev.log_text()
    assert "Traceback" not in log, log
    m = re.search(r"retrying in ([0-9.]+) s", log)
    assert m, log
    assert wait_until(lambda: not hub.device_list()["rev-1"]["online"], 15, "rev-1 offline at the hub")
    assert hub.device_list()["rev-1"]["status"] == "revoked"
