"""The README's first command: the local fleet demo, run non-interactively with a small fleet.

Costs: the full scenario ~20-40 s on 2 busy cores; ten revocations in a row ~60 s (one hub, `--rounds 10`).
"""

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
    lines = out.splitlines()
    assert lines[-1].startswith("DEMO PASS: 1 revocation(s)"), out
    # the table fits 80 columns and ends its own line; sentences are not cut at the console width
    table = [ln for ln in lines if ln[:1] in "┏┃┡│└"]
    assert table and all(len(ln) <= 80 for ln in table), "\n".join(table)
    assert all(ln.endswith(("┓", "┃", "┩", "│", "┘")) for ln in table), "\n".join(table)
    assert "  demo-03: key generated in its own SoftHSM token, enrolled over EST, agent started" in lines
    assert not any(ln.strip() == "started" for ln in lines), out
    assert any(ln.startswith("demo-02: revoked;") and "enforced by the running hub" in ln for ln in lines), out
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


def test_demo_revokes_ten_times_in_a_row(tmp_path):
    """The demo's revocation, ten times in a row: one hub, each round enrolls a fresh device and revokes it (the
    race-prone part: the cut, the victim's silence, its refused reconnect, the others streaming on). All ten pass."""
    keep = tmp_path / "demo"
    res = subprocess.run([sys.executable, "-m", "demo", "--devices", "2", "--seconds", "1", "--rounds", "10",
                          "--keep", str(keep)], cwd=ROOT, capture_output=True, text=True, timeout=400)
    out = res.stdout + res.stderr
    rounds = re.findall(r"DEMO RESULT devices=\d+ online_before=\d+ revoked=(\S+) victim_state=(\S+) "
                        r"victim_silent=(\S+) others_streaming=(\S+)", out)
    assert res.returncode == 0, out
    assert [r[0] for r in rounds] == [f"demo-{i:02d}" for i in range(2, 12)], out
    assert all(r[1:] == ("revoked", "yes", "yes") for r in rounds), out
    assert out.splitlines()[-1].startswith("DEMO PASS: 10 revocation(s)"), out
    db = sqlite3.connect(keep / "hub" / "registry.sqlite3")
    status = dict(db.execute("SELECT id, status FROM devices").fetchall())
    assert status == {"demo-01": "active", **{f"demo-{i:02d}": "revoked" for i in range(2, 12)}}
    cuts = [r[0] for r in db.execute("SELECT detail FROM audit WHERE action='device.revoked.enforced'")]
    assert len(cuts) == 10 and all(c.startswith("sessions cut: 1;") for c in cuts), cuts
    left = subprocess.run(["pgrep", "-f", str(keep)], capture_output=True, text=True)
    assert left.stdout.strip() == "", f"processes left behind: {left.stdout}"
