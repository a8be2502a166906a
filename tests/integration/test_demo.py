"""The README's first command: the local fleet demo, run non-interactively with a small fleet."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.integration


def test_demo_enrolls_streams_revokes_and_leaves_nothing_behind(tmp_path):
    keep = tmp_path / "demo"
    res = subprocess.run([sys.executable, "-m", "demo", "--devices", "3", "--seconds", "2", "--keep", str(keep)],
                         cwd=ROOT, capture_output=True, text=True, timeout=240)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    m = re.search(r"DEMO RESULT devices=(\d+) online_before=(\d+) revoked=(\S+) victim_state=(\S+) "
                  r"victim_silent=(\S+) others_streaming=(\S+) cli_ms=(\d+) cut_ms=(\d+)", out)
    assert m, out
    devices, online, victim, state, silent, others, cli_ms, cut_ms = m.groups()
    assert (devices, online, state, silent, others) == ("3", "3", "revoked", "yes", "yes")
    assert int(cut_ms) < 5000
    # the registry agrees: everyone enrolled, the victim is revoked, its live session was cut by the broker
    db = sqlite3.connect(keep / "hub" / "registry.sqlite3")
    status = dict(db.execute("SELECT id, status FROM devices").fetchall())
    assert status == {"demo-01": "active", "demo-02": "revoked", "demo-03": "active"} and victim == "demo-02"
    enrolled = {r[0] for r in db.execute("SELECT device_id FROM audit WHERE action='enroll' AND outcome='ok'")}
    assert enrolled == set(status)
    cert_status = dict(db.execute("SELECT device_id, status FROM certificates").fetchall())
    assert cert_status["demo-02"] == "revoked"
    enforced = db.execute("SELECT detail FROM audit WHERE action='device.revoked.enforced'").fetchone()
    assert enforced and enforced[0].startswith("sessions cut: 1;"), enforced
    # nothing left running from this demo
    left = subprocess.run(["pgrep", "-f", str(keep)], capture_output=True, text=True)
    assert left.stdout.strip() == "", f"processes left behind: {left.stdout}"
