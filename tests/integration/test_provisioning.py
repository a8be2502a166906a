"""Provisioning kit: factory bundles, install.sh (dry run and a throwaway root), provision-device.sh, units."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.integration.hubfixtures import LENIENT_LIMITS, running_hub

pytestmark = pytest.mark.integration

PROV = ROOT / "provisioning"
SCRIPTS = [PROV / "raspberry-pi" / "install.sh", PROV / "factory" / "provision-device.sh", ROOT / "dev.sh",
           ROOT / ".ci" / "run"]
BIN = Path(sys.executable).parent


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_scripts_are_shellcheck_clean():
    res = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout


@pytest.mark.parametrize("unit", ["tessera-agent.service", "tessera-hub.service"])
def test_units_pass_systemd_analyze_verify(tmp_path, unit):
    text = (PROV / "systemd" / unit).read_text()
    for word in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "ReadWritePaths=/var/lib/",
                 "Restart=on-failure", "CapabilityBoundingSet=\n"):
        assert word in text, word
    # verify needs the ExecStart binary to exist: point it at this checkout's console scripts
    local = tmp_path / unit
    local.write_text(text.replace("/opt/tessera/bin/", f"{BIN}/"))
    res = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)
    problems = [ln for ln in (res.stdout + res.stderr).splitlines() if unit in ln or "Unknown" in ln]
    assert res.returncode == 0 and not problems, res.stdout + res.stderr


def test_install_dry_run_changes_nothing(tmp_path):
    res = subprocess.run(["bash", str(PROV / "raspberry-pi" / "install.sh"), "--dry-run", "--root", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "+ install -d -m 0700" in res.stdout and "python3 -m venv" in res.stdout
    assert list(tmp_path.iterdir()) == []


def test_install_refuses_a_directory_that_is_not_a_bundle(tmp_path):
    res = subprocess.run(["bash", str(PROV / "raspberry-pi" / "install.sh"), "--root", str(tmp_path / "r"),
                          "--bundle", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "not a bundle" in res.stderr


PROVISION = PROV / "factory" / "provision-device.sh"


def provision(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(PROVISION), *args], capture_output=True, text=True, timeout=60)


def script_options(path: Path) -> set[str]:
    """Every option the script's argument loop accepts (its case labels)."""
    return {opt for line in path.read_text().splitlines()
            if (m := re.match(r"\s+((?:-[-a-z]+\|?)+)\)", line)) for opt in m.group(1).split("|")}


@pytest.mark.parametrize("script", [PROVISION, PROV / "raspberry-pi" / "install.sh"], ids=lambda p: p.name)
def test_help_is_a_usage_text_listing_every_option(script):
    res = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert "set -euo" not in res.stdout and "pipefail" not in res.stdout, res.stdout
    options = script_options(script)
    assert {"--dry-run", "--help"} <= options
    for option in options:
        assert re.search(rf"(^|[\s\[,]){re.escape(option)}\b", res.stdout), \
            f"{option} is not in the help:\n{res.stdout}"
    if script == PROVISION:
        assert max(len(line) for line in res.stdout.splitlines()) <= 80, res.stdout
    bad = subprocess.run(["bash", str(script), "--no-such-option"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown option --no-such-option" in bad.stderr


def fake_device(tmp_path: Path) -> tuple[Path, list[str]]:
    """A device layout (config, token, PIN path) and provision-device.sh's arguments for it."""
    dev = tmp_path / "device"
    dev.mkdir(mode=0o700)
    (dev / "agent.toml").write_text('device_id = "pd-1"\nhub_url = "https://127.0.0.1:1"\n[token]\nmodule = ""\n'
                                    f'label = "pd-1"\nsofthsm_conf = "{dev}/softhsm2.conf"\n')
    (dev / "enroll-token").write_text("not-a-real-token\n")
    return dev, ["--config", str(dev / "agent.toml"), "--token-file", str(dev / "enroll-token"), "--pin-file",
                 str(dev / "pin"), "--agent", str(BIN / "tessera-agent")]


def test_provision_dry_run_prints_every_step_and_changes_nothing(tmp_path):
    dev, args = fake_device(tmp_path)
    before = sorted(p.name for p in dev.iterdir())
    res = provision(*args, "--no-user-switch", "--dry-run")
    assert res.returncode == 0, res.stdout + res.stderr
    steps = [line for line in res.stdout.splitlines() if line.startswith("+ ")]
    assert f"create {dev / 'pin'} (0600)" in steps[0], res.stdout
    assert any(" token init --token-label pd-1 " in s for s in steps), res.stdout
    assert any(" enroll --config " in s for s in steps), res.stdout
    assert res.stdout.rstrip().endswith("dry run: nothing was changed")
    assert sorted(p.name for p in dev.iterdir()) == before  # no PIN, no SoftHSM config, the token still there
    # as root with the service user: the user would be created (--create-user), the PIN chowned, the unit started
    res = provision(*args, "--user", "tessera-test-nosuch", "--create-user", "--dry-run")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "+ useradd --system" in res.stdout and "tessera-test-nosuch" in res.stdout
    assert "+ chown tessera-test-nosuch:tessera-test-nosuch" in res.stdout
    assert "+ runuser -u tessera-test-nosuch -- " in res.stdout
    assert sorted(p.name for p in dev.iterdir()) == before
    assert subprocess.run(["id", "tessera-test-nosuch"], capture_output=True).returncode != 0


def test_provision_without_the_service_user_says_what_to_do(tmp_path):
    dev, args = fake_device(tmp_path)
    before = sorted(p.name for p in dev.iterdir())
    res = provision(*args, "--user", "tessera-test-nosuch")
    assert res.returncode == 1 and res.stdout == "", res.stdout + res.stderr
    message = res.stderr.strip()
    assert len(message.splitlines()) == 1 and "chown" not in message, message
    assert "no user 'tessera-test-nosuch'" in message and "install.sh" in message and "--create-user" in message
    assert sorted(p.name for p in dev.iterdir()) == before  # checked before anything was created
    missing = provision("--config", str(dev / "nope.toml"), "--no-user-switch")
    assert missing.returncode == 1 and f"no agent configuration {dev / 'nope.toml'}" in missing.stderr
    no_value = provision("--config")
    assert no_value.returncode == 2 and "--config needs a value" in no_value.stderr


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with running_hub(tmp_path_factory.mktemp("prov"), **LENIENT_LIMITS) as h:
        yield h


def make_bundles(hub, tmp_path: Path, count: int, prefix: str) -> Path:
    csv_path = tmp_path / "batch.csv"
    res = hub.cli("token", "create", "--count", str(count), "--prefix", prefix, "--out", str(csv_path))
    assert res.returncode == 0, res.stderr
    out = tmp_path / "bundles"
    res = hub.cli("bundle", "--tokens", str(csv_path), "--out", str(out), "--hub-url", hub.url,
                  "--mqtt-host", "127.0.0.1")
    assert res.returncode == 0, res.stderr
    hint = " ".join(res.stdout.split())  # what to run on the device, in order: install.sh, then provision-device.sh
    assert f"{count} bundles in {out}" in hint, res.stdout
    assert "install.sh --bundle" in hint and hint.index("install.sh") < hint.index("provision-device.sh"), hint
    return out


def test_bundles_hold_config_root_and_a_private_token(hub, tmp_path):
    out = make_bundles(hub, tmp_path, 3, "pa")
    devices = sorted(p.name for p in out.iterdir())
    assert devices == ["pa-00001", "pa-00002", "pa-00003"]
    for d in devices:
        b = out / d
        assert mode(b) == 0o700 and mode(b / "enroll-token") == 0o600
        assert f'device_id = "{d}"' in (b / "agent.toml").read_text()
        assert (b / "fleet-root.pem").read_bytes() == hub.root_pem.read_bytes()
    again = hub.cli("bundle", "--tokens", str(tmp_path / "batch.csv"), "--out", str(out), "--hub-url", hub.url)
    assert again.returncode != 0 and "not empty" in again.stderr


def test_install_into_a_throwaway_root(hub, tmp_path):
    bundle = make_bundles(hub, tmp_path, 1, "pb") / "pb-00001"
    root = tmp_path / "root"
    res = subprocess.run(["bash", str(PROV / "raspberry-pi" / "install.sh"), "--root", str(root), "--skip-venv",
                          "--bundle", str(bundle)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert mode(root / "etc/tessera") == 0o750
    assert mode(root / "var/lib/tessera-agent") == 0o700
    assert mode(root / "etc/tessera/enroll-token") == 0o600
    assert mode(root / "etc/tessera/agent.toml") == 0o640
    assert (root / "etc/systemd/system/tessera-agent.service").is_file()
    assert "tokendir = /var/lib/tessera-agent/softhsm/tokens" in \
        (root / "var/lib/tessera-agent/softhsm/softhsm2.conf").read_text()


def test_provision_device_initialises_the_token_and_enrolls(hub, tmp_path):
    """provision-device.sh end to end against a running hub, with a device layout under tmp_path."""
    bundle = make_bundles(hub, tmp_path, 1, "pc") / "pc-00001"
    dev = tmp_path / "device"
    (dev / "softhsm" / "tokens").mkdir(parents=True, mode=0o700)
    os.chmod(dev, 0o700)
    (dev / "softhsm" / "softhsm2.conf").write_text(
        f"directories.tokendir = {dev / 'softhsm' / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    conf = (bundle / "agent.toml").read_text()
    conf = conf.replace("/var/lib/tessera-agent/softhsm/softhsm2.conf", str(dev / "softhsm" / "softhsm2.conf"))
    conf = conf.replace("/var/lib/tessera-agent", str(dev / "state")).replace("/etc/tessera/token-pin",
                                                                              str(dev / "pin"))
    (dev / "agent.toml").write_text(conf)
    (dev / "state").mkdir(mode=0o700)
    shutil.copy(bundle / "fleet-root.pem", dev / "state" / "fleet-root.pem")
    shutil.copy(bundle / "enroll-token", dev / "enroll-token")
    os.chmod(dev / "enroll-token", 0o600)
    res = subprocess.run(["bash", str(PROV / "factory" / "provision-device.sh"), "--config", str(dev / "agent.toml"),
                          "--token-file", str(dev / "enroll-token"), "--pin-file", str(dev / "pin"),
                          "--agent", str(BIN / "tessera-agent"), "--no-user-switch"],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "device provisioned" in res.stdout
    assert mode(dev / "pin") == 0o600
    pin = (dev / "pin").read_text().strip()
    assert pin and pin not in res.stdout + res.stderr
    assert not (dev / "enroll-token").exists()
    shown = hub.show("pc-00001")
    assert [c["status"] for c in shown["certificates"]] == ["active"]
    status = subprocess.run([str(BIN / "tessera-agent"), "status", "-c", str(dev / "agent.toml"), "--json"],
                            capture_output=True, text=True, timeout=60)
    assert '"enrolled": true' in status.stdout
