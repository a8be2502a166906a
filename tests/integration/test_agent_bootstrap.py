"""`tessera-agent bootstrap --bundle DIR` end to end on a SoftHSM device: from a factory bundle (`tessera-hub token
create` + `bundle` against a real hub) to a device that runs and is online; a second run changes nothing; a bundle
of another device, or a foreign fleet root already in place, is refused and changes nothing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.agentfixtures import agent_binary, agent_env, hub, run_agent_cli  # noqa: F401
from tests.integration.hubfixtures import ROOT

pytestmark = pytest.mark.integration


def bundles(hub, tmp_path: Path, count: int, prefix: str) -> Path:  # noqa: F811
    csv_path = tmp_path / f"{prefix}.csv"
    hub.cli_ok("token", "create", "--count", str(count), "--prefix", prefix, "--out", str(csv_path))
    out = tmp_path / f"{prefix}-bundles"
    hub.cli_ok("bundle", "--tokens", str(csv_path), "--out", str(out), "--hub-url", hub.url, "--mqtt-host",
               "127.0.0.1", "--mqtt-port", str(hub.mqtt_port))
    return out


def device_layout(dev: Path) -> list[str]:
    """--set overrides that put a device's /etc and /var/lib under `dev` (the bundle names the real paths)."""
    return ["--set", f"state_dir={dev / 'state'}", "--set", f"ca_file={dev / 'state' / 'fleet-root.pem'}",
            "--set", f"token.pin_source=file:{dev / 'etc' / 'token-pin'}",
            "--set", f"token.softhsm_conf={dev / 'softhsm' / 'softhsm2.conf'}",
            "--set", "telemetry.interval=1"]


def snapshot(dev: Path) -> dict[str, tuple[int, str]]:
    """Every file under `dev`: mode and content hash (the SoftHSM token files included)."""
    out = {}
    for p in sorted(dev.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(dev))] = (stat.S_IMODE(p.stat().st_mode), hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def test_bootstrap_from_a_bundle_runs_and_a_rerun_changes_nothing(hub, tmp_path):  # noqa: F811
    bundle = bundles(hub, tmp_path, 1, "bs") / "bs-00001"
    dev = tmp_path / "device"
    config = dev / "etc" / "agent.toml"
    first = run_agent_cli("bootstrap", "--bundle", str(bundle), "--config", str(config), *device_layout(dev))
    assert first.returncode == 0, first.stdout + first.stderr
    out = first.stdout
    for step in ("token PIN: created", "SoftHSM2 config: created", "initialized (SoftHSM2)", "fleet root:",
                 "enrolled bs-00001", "configuration: wrote", f"next: tessera-agent run --config {config}"):
        assert step in out, (step, out)
    pin = (dev / "etc" / "token-pin").read_text().strip()
    assert len(pin) == 32 and pin not in out + first.stderr
    assert stat.S_IMODE((dev / "etc" / "token-pin").stat().st_mode) == 0o600
    assert not (bundle / "enroll-token").exists()  # the one-time token is destroyed once used
    assert [c["status"] for c in hub.show("bs-00001")["certificates"]] == ["active"]
    written = config.read_text()
    assert 'device_id = "bs-00001"' in written and str(dev / "state") in written

    before = snapshot(dev)
    again = run_agent_cli("bootstrap", "--bundle", str(bundle), "--config", str(config), *device_layout(dev))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing changed" in again.stdout and "is enrolled" in again.stdout
    assert snapshot(dev) == before
    assert [c["status"] for c in hub.show("bs-00001")["certificates"]] == ["active"]

    status = run_agent_cli("status", "--config", str(config), "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["enrolled"] is True
    proc = subprocess.Popen([agent_binary(), "run", "--config", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=agent_env(), cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while not hub.show("bs-00001")["device"]["online"]:
            assert proc.poll() is None and time.monotonic() < deadline, "the bootstrapped agent did not come online"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)


def test_another_devices_bundle_or_a_foreign_root_is_refused_and_changes_nothing(hub, tmp_path):  # noqa: F811
    out = bundles(hub, tmp_path, 2, "bx")
    dev = tmp_path / "device"
    config = dev / "etc" / "agent.toml"
    ok = run_agent_cli("bootstrap", "--bundle", str(out / "bx-00001"), "--config", str(config), *device_layout(dev))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    before = snapshot(dev)
    other = run_agent_cli("bootstrap", "--bundle", str(out / "bx-00002"), "--config", str(config),
                          *device_layout(dev))
    assert other.returncode == 1 and "configuration of device 'bx-00001'" in other.stderr, other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    assert snapshot(dev) == before and (out / "bx-00002" / "enroll-token").exists()

    fresh = tmp_path / "device2"
    (fresh / "state").mkdir(parents=True)
    shutil.copy(hub.root_pem, fresh / "state" / "fleet-root.pem")
    (fresh / "state" / "fleet-root.pem").write_text("-----BEGIN CERTIFICATE-----\nother fleet\n")
    refused = run_agent_cli("bootstrap", "--bundle", str(out / "bx-00002"), "--config",
                            str(fresh / "etc" / "agent.toml"), *device_layout(fresh))
    assert refused.returncode == 1 and "another fleet root" in refused.stderr, refused.stderr
    assert (out / "bx-00002" / "enroll-token").exists() and not (fresh / "etc").exists()  # no PIN, no config
    assert not (fresh / "softhsm").exists()  # no token either
    assert hub.show("bx-00002")["device"]["status"] == "pending"


def test_not_a_bundle(tmp_path):
    res = run_agent_cli("bootstrap", "--bundle", str(tmp_path), "--config", str(tmp_path / "agent.toml"))
    assert res.returncode == 1 and "is not a factory bundle" in res.stderr
    assert not (tmp_path / "agent.toml").exists() and os.listdir(tmp_path) == []
