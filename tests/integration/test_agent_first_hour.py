"""The first hour on a device (issue 15): the mistakes a new operator makes get one clear error and an exit code.

A real `tessera-hub serve` (module fixture), one SoftHSM token per device, the `tessera-agent` console script.
Cost: one hub (~10 s) and a few enrollments (~3 s each).
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.integration.agentfixtures import (  # noqa: F401  (hub, make_device are fixtures)
    hub, make_device, one_line,
)

pytestmark = pytest.mark.integration


def test_run_with_a_pin_file_others_can_read_exits_at_once(hub, make_device):
    dev, token = make_device("first-pin")
    dev.enroll_ok(token)
    os.chmod(dev.token.pin_file, 0o644)
    proc = dev.start()
    try:
        rc = proc.wait(timeout=30)  # it used to retry forever ("connect failed ... retrying in 1.3 s")
    except subprocess.TimeoutExpired:
        raise AssertionError(f"tessera-agent run kept retrying a configuration error:\n{dev.log_text()[-2000:]}")
    log = one_line(dev.log_text())
    assert rc == 1, log
    assert "error:" in log and "0644" in log and f"chmod 600 {dev.token.pin_file}" in log, log
    assert "retrying" not in log, log
    assert dev.status_file()["state"] == "failed"
