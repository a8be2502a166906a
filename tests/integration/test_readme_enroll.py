"""The README's "Enroll a device" block, command by command, against a real hub: the commands are read from
README.md itself (so the test follows whatever the README says), run by bash as written, with three substitutions
only: the hub's address (`hub.example.com:8443` -> this test's hub), the hub directory (`/var/lib/tessera-hub` ->
this test's), and `--set mqtt_port=N` added to `enroll` (the test hub's broker is not on 8883). The device paths
the README names (/etc/tessera, /var/lib/tessera-agent) are real: each command runs in a private mount namespace
(`unshare -m`, root) in which they are bind mounts of directories under tmp_path, so nothing outside the test
changes. `tessera-agent run` runs in the background until the hub sees the device online; `status` then says so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.agentfixtures import agent_env, hub  # noqa: F401
from tests.integration.hubfixtures import ROOT

pytestmark = pytest.mark.integration
MOUNTS = ("/etc/tessera", "/var/lib/tessera-agent")


def readme_block() -> list[str]:
    """The shell commands of README.md's "### Enroll a device" block, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Enroll a device"):]
    block = section[section.index("```sh\n") + 6:section.index("\n```", section.index("```sh\n"))]
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def can_unshare() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-m", "true"], capture_output=True).returncode == 0


@pytest.fixture
def device_root(tmp_path):
    if not can_unshare():
        pytest.skip("needs root and unshare -m (private mount namespace) to give the README's paths to the test")
    created = [m for m in MOUNTS if not os.path.exists(m)]
    for m in created:
        os.makedirs(m)  # empty mount points; removed again below
    try:
        yield {m: tmp_path / m.strip("/").replace("/", "_") for m in MOUNTS}
    finally:
        for m in created:
            os.rmdir(m)


def in_namespace(command: str, binds: dict[str, Path], cwd: Path) -> list[str]:
    mounts = " && ".join(f"mount --bind {src} {dst}" for dst, src in binds.items())
    return ["unshare", "-m", "bash", "-c", f"set -euo pipefail; {mounts} && cd {cwd} && {command}"]


def test_the_readme_enroll_section_works_as_written(hub, tmp_path, device_root):  # noqa: F811
    for src in device_root.values():
        src.mkdir(mode=0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = agent_env(TESSERA_HUB_DIR=str(hub.dir), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    commands = readme_block()
    assert any(c.startswith("tessera-agent enroll") for c in commands) and "tessera-agent run" in " ".join(commands)
    agent = None
    try:
        for command in commands:
            command = command.replace("hub.example.com:8443", f"127.0.0.1:{hub.port}")
            command = command.replace("/var/lib/tessera-hub", str(hub.dir))
            if command.startswith("tessera-agent enroll"):  # before a trailing comment, if any
                code, hash_, comment = command.partition(" #")
                command = f"{code} --set mqtt_port={hub.mqtt_port}{hash_}{comment}"
            if command.split("#")[0].strip() == "tessera-agent run":
                agent = subprocess.Popen(in_namespace("exec tessera-agent run", device_root, work), env=env,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
                deadline = time.monotonic() + 30
                while not hub.show("sensor-0001")["device"]["online"]:
                    assert agent.poll() is None, agent.stderr.read().decode()[-2000:]
                    assert time.monotonic() < deadline, "the agent did not come online"
                    time.sleep(0.2)
                continue
            res = subprocess.run(in_namespace(command, device_root, work), env=env, capture_output=True, text=True,
                                 timeout=120, stdin=subprocess.DEVNULL)
            assert res.returncode == 0, f"{command}\n{res.stdout}\n{res.stderr}"
            if command.startswith("tessera-agent status"):
                assert "online" in res.stdout and "sensor-0001" in res.stdout, res.stdout
    finally:
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=15)
    assert [c["status"] for c in hub.show("sensor-0001")["certificates"]] == ["active"]
    assert (device_root["/etc/tessera"] / "agent.toml").is_file()  # enroll wrote it where run and status look
    assert oct((device_root["/etc/tessera"] / "token-pin").stat().st_mode & 0o777) == "0o600"
    assert not (work / "token").exists()  # the one-time token is destroyed once used
    status = json.loads(subprocess.run(in_namespace("tessera-agent status --json", device_root, work), env=env,
                                       capture_output=True, text=True, timeout=60).stdout)
    assert status["enrolled"] is True
