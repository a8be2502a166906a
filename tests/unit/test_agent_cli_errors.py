"""`tessera-agent` commands run where nothing is set up yet: one clear line on stderr and a non-zero exit.

Each test runs the console script as a child (about 0.4 s each); nothing here needs a hub or a token.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import DEFAULT_PATH
from tests.helpers import ROOT, child_env

AGENT = str(Path(sys.executable).with_name("tessera-agent"))


def agent(*args: str, **env: str) -> subprocess.CompletedProcess:
    e = child_env(COLUMNS="80", **env)
    e.pop("TESSERA_AGENT_CONFIG", None)
    return subprocess.run([AGENT, *args], capture_output=True, text=True, timeout=60, env=e, cwd=ROOT,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("extra", [(), ("--json",)])
def test_status_without_a_configuration_says_what_is_missing(tmp_path, extra):
    if DEFAULT_PATH.exists():
        pytest.skip(f"{DEFAULT_PATH} exists on this machine")
    proc = agent("status", "--set", f"state_dir={tmp_path / 'state'}", *extra)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout == "", proc.stdout  # no empty table, no JSON of nulls
    err = " ".join(proc.stderr.split())
    assert err.startswith("error: no agent configuration:") and str(DEFAULT_PATH) in err, err
    assert "--config" in err and str(tmp_path / "state") in err, err
    assert len(proc.stderr.strip().splitlines()) <= 3, proc.stderr  # one sentence (wrapped at 80 columns)


def test_status_with_a_configuration_but_not_enrolled_still_reports(tmp_path):
    conf = tmp_path / "agent.toml"
    conf.write_text(f'device_id = "d1"\nstate_dir = "{tmp_path / "state"}"\n')
    proc = agent("status", "-c", str(conf), "--json")
    assert proc.returncode == 0, proc.stderr
    assert '"enrolled": false' in proc.stdout
