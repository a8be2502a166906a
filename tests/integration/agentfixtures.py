"""Fixtures and helpers for the `tessera-agent` integration tests (tests/integration/test_agent_*.py).

Everything is real: a `tessera-hub serve` process (from tests/integration/hubfixtures.py) with its supervised
Mosquitto, one SoftHSM2 token per device (hsm.softhsm.create_token), and the venv's `tessera-agent` console
script as a child process. The hub runs with ``[mqtt] telemetry_log = true``, so every device message it sees
(telemetry, events, command acks) is appended to ``<hub>/logs/device-messages.jsonl``; that file is how the
tests observe device traffic (never an MQTT client with the hub's admin certificate: its client id would kick
the hub's own session).

Rules:
- the pytest process never opens a device token: key work runs in `tessera-agent` children, or in
  ``hsm.worker`` spawned children, or in pkcs11-tool (PIN typed on a pty, see tests.helpers.pkcs11_tool);
- no secret in argv: enrollment tokens go through 0600 files, PINs through pin files;
- every child has a timeout or is stopped in teardown (SIGTERM, then SIGKILL), and dies with pytest
  (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.helpers import ROOT, child_env
from tests.integration.hubfixtures import LENIENT_LIMITS, Hub, cli_env, running_hub

AGENT_CLI_TIMEOUT = 90.0
STOP_TIMEOUT = 15.0
TOKEN_LABEL = "dev"
KEY_LABEL = "device-key"


# --- binaries and environment ------------------------------------------------------------------------------------

def agent_binary() -> str:
    """The venv's `tessera-agent` console script (next to the running interpreter), else the one on PATH."""
    candidate = Path(sys.executable).with_name("tessera-agent")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("tessera-agent")
    if not found:
        raise RuntimeError("tessera-agent is not installed in this environment (pip install -e .)")
    return found


def agent_env(**extra: str) -> dict[str, str]:
    """Environment for agent children: the repository importable, no inherited SOFTHSM2_CONF, no terminal width."""
    env = cli_env()
    env.pop("TESSERA_AGENT_CONFIG", None)
    env.update(extra)
    return env


def set_pdeathsig() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_agent_cli(*args: str, timeout: float = AGENT_CLI_TIMEOUT,
                  env: dict | None = None) -> subprocess.CompletedProcess:
    """`tessera-agent ARGS` (never with a secret in ARGS); the completed process (text)."""
    return subprocess.run([agent_binary(), *args], capture_output=True, text=True, timeout=timeout,
                          env=env or agent_env(), cwd=ROOT, stdin=subprocess.DEVNULL)


def one_line(text: str) -> str:
    return " ".join(text.split())


# --- a hub that logs device messages -----------------------------------------------------------------------------

@contextlib.contextmanager
def telemetry_hub(base: Path, **settings: Any) -> Iterator[Hub]:
    """A running hub (lenient rate limits) with the device-message log on; stopped on exit (exit 0)."""
    with running_hub(base, **{**LENIENT_LIMITS, "telemetry_log": True, **settings}) as hub:
        yield hub


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Iterator[Hub]:
    """One running hub with the device-message log, shared by a test module (tests use distinct device ids)."""
    with telemetry_hub(tmp_path_factory.mktemp("hub")) as h:
        yield h


def messages_log(hub: Hub) -> Path:
    return hub.dir / "logs" / "device-messages.jsonl"


def device_messages(hub: Hub, device: str | None = None, kind: str | None = None) -> list[dict]:
    """Rows of device-messages.jsonl ({"at", "device", "kind", "payload"}), payload parsed as JSON when it is."""
    path = messages_log(hub)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        if not line.endswith("}"):
            continue  # a line being written right now
        row = json.loads(line)
        if (device and row["device"] != device) or (kind and row["kind"] != kind):
            continue
        with contextlib.suppress(ValueError):
            row["data"] = json.loads(row["payload"])
        rows.append(row)
    return rows


def telemetry(hub: Hub, device: str) -> list[dict]:
    """The telemetry payloads the hub saw from `device`, in arrival order (duplicates kept)."""
    return [r["data"] for r in device_messages(hub, device, "telemetry") if isinstance(r.get("data"), dict)]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    """Poll `predicate()` until it returns something truthy; return that, or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def broker_pids(hub: Hub) -> list[int]:
    """Pids of the hub's mosquitto child (the process whose command line names this hub's mosquitto.conf)."""
    conf = str(hub.dir / "broker" / "mosquitto.conf")
    proc = subprocess.run(["pgrep", "-f", "--", f"mosquitto -c {conf}"], capture_output=True, text=True, timeout=10)
    return [int(p) for p in proc.stdout.split()]


def broker_log(hub: Hub) -> str:
    path = hub.dir / "broker" / "mosquitto.log"
    return path.read_text(errors="replace") if path.exists() else ""


def ca_fingerprint(hub: Hub) -> str:
    """SHA-256 of the fleet root's DER, hex (what `--ca-fingerprint` takes)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(hub.root_pem.read_bytes())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def write_secret(path: Path, text: str) -> Path:
    """A file created 0600 from the start."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)
    return path


# --- a device: token, config, state directory, agent process -----------------------------------------------------

@dataclasses.dataclass
class Device:
    """One device: its SoftHSM token, agent.toml, state directory and (once started) its `tessera-agent run`."""

    id: str
    base: Path
    hub: Hub
    token: Any                      # hsm.softhsm.SoftToken
    interval: float = 1.0
    proc: subprocess.Popen | None = None
    runs: int = 0
    route: str | None = None        # TESSERA_TLS_ROUTE of its children; None: as child_env says (the run's)

    def env(self) -> dict[str, str]:
        """agent_env for this device's children: its TLS route given explicitly when it has one."""
        return agent_env(**({"TESSERA_TLS_ROUTE": self.route} if self.route else {}))

    # paths
    @property
    def config(self) -> Path:
        return self.base / "agent.toml"

    @property
    def state(self) -> Path:
        return self.base / "state"

    @property
    def spool(self) -> Path:
        return self.state / "spool.sqlite3"

    @property
    def log(self) -> Path:
        return self.base / f"agent-{self.runs}.log"

    def write_config(self, **top: Any) -> Path:
        """agent.toml as documented in agent/config.py; `top` overrides top-level keys."""
        t = self.token
        values = {"device_id": self.id, "hub_url": f"https://localhost:{self.hub.port}",
                  "mqtt_port": self.hub.mqtt_port, "ca_file": str(self.hub.root_pem), "state_dir": str(self.state)}
        values.update(top)
        lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        lines += ["", "[token]", f"label = {json.dumps(t.label)}", f"pin_source = {json.dumps(f'file:{t.pin_file}')}",
                  f"softhsm_conf = {json.dumps(str(getattr(t, 'conf', '')))}", f"module = {json.dumps(t.module)}",
                  f"key_label = {json.dumps(KEY_LABEL)}",
                  "", "[telemetry]", f"interval = {float(self.interval)}", ""]
        self.config.write_text("\n".join(lines))
        return self.config

    def token_file(self, token: str, name: str = "enroll-token") -> Path:
        return write_secret(self.base / name, token + "\n")

    # CLI
    def cli(self, *args: str, timeout: float = AGENT_CLI_TIMEOUT) -> subprocess.CompletedProcess:
        """`tessera-agent ARGS -c agent.toml`."""
        return run_agent_cli(*args, "-c", str(self.config), timeout=timeout, env=self.env())

    def enroll(self, token_file: Path, *extra: str, ca: bool = True) -> subprocess.CompletedProcess:
        args = ["enroll", "--token-file", str(token_file), *extra]
        if ca:
            args += ["--ca-file", str(self.hub.root_pem)]
        return self.cli(*args)

    def enroll_ok(self, token: str) -> str:
        proc = self.enroll(self.token_file(token))
        assert proc.returncode == 0, f"enroll exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def status(self) -> dict:
        proc = self.cli("status", "--json")
        assert proc.returncode == 0, f"status exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        return json.loads(proc.stdout)

    def status_file(self) -> dict:
        """status.json as the running agent last wrote it ({} if absent or being replaced)."""
        try:
            return json.loads((self.state / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def identity(self) -> dict:
        return json.loads((self.state / "identity.json").read_text())

    def key_show(self, label: str = KEY_LABEL) -> subprocess.CompletedProcess:
        """`tessera-agent key show --label L --json` on this device's token."""
        t = self.token
        return run_agent_cli("key", "show", "--label", label, "--token-label", t.label, "--pin-source",
                             f"file:{t.pin_file}", "--softhsm-conf", str(getattr(t, "conf", "")), "--module", t.module,
                             "--json", env=self.env())

    def private_keys(self) -> list:
        """Private key objects in the token (pkcs11-tool -O, PIN typed on a pty)."""
        from tests.helpers import parse_objects, pkcs11_tool

        rc, out = pkcs11_tool(self.token, "-O")
        assert rc == 0, out
        return [o for o in parse_objects(out) if o.kind.startswith("Private Key Object")]

    # the agent process
    def start(self, *extra: str) -> subprocess.Popen:
        """`tessera-agent run -c agent.toml` in the background (stdout+stderr to agent-N.log)."""
        assert self.proc is None or self.proc.poll() is not None, "agent already running"
        self.runs += 1
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen([agent_binary(), "run", "-c", str(self.config), *extra], stdout=fh,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env(),
                                         cwd=ROOT, preexec_fn=set_pdeathsig)
        return self.proc

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def assert_route(self) -> None:
        """The running agent's log says its token key came by this device's route (hsm.tls logs it)."""
        if self.route:
            assert f"loaded through the {self.route} route" in self.log_text(), self.log_text()[-3000:]

    def wait_state(self, state: str, timeout: float = 30.0) -> dict:
        """Wait until the running agent's status.json says `state` (fails early if the agent exits)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status_file()
            if st.get("state") == state and (self.proc is None or st.get("pid") == self.proc.pid):
                return st
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode} before state {state!r}; status {st}\n"
                                     f"{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"agent not {state!r} within {timeout} s; status {st}\n{self.log_text()[-3000:]}")
            time.sleep(0.05)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM; the exit status within `timeout` s, else SIGKILL and AssertionError."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
                raise AssertionError(f"tessera-agent run did not exit within {timeout} s of SIGTERM:\n"
                                     f"{self.log_text()[-3000:]}") from None
        return proc.returncode

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def destroy(self) -> None:
        """Teardown: SIGTERM a still-running agent (SIGKILL if it lingers), then remove the token."""
        with contextlib.suppress(Exception):
            self.stop(timeout=5)
        with contextlib.suppress(Exception):
            self.kill9()
        self.token.destroy()


def new_device(hub: Hub, base: Path, device_id: str, interval: float = 1.0, register: bool = True,
               token_maker: Any = None, route: str | None = None, **config: Any) -> tuple[Device, str]:
    """A registered device (token from `tessera-hub device add`), its own SoftHSM token (or token_maker(base,
    device_id)'s) and agent.toml; its children use TLS route `route` (None: child_env's choice)."""
    from hsm.softhsm import create_token

    base = Path(base) / device_id
    base.mkdir(parents=True, exist_ok=True)
    token = hub.add_device(device_id) if register else ""
    soft = token_maker(base, device_id) if token_maker else create_token(base / "softhsm", label=TOKEN_LABEL)
    dev = Device(device_id, base, hub, soft, interval=interval, route=route)
    dev.write_config(**config)
    return dev, token


@pytest.fixture
def make_device(hub, tmp_path):
    """Factory: make_device(id, interval=..., register=True) -> (Device, enrollment token); agents stopped after."""
    made: list[Device] = []

    def factory(device_id: str, **kw: Any) -> tuple[Device, str]:
        dev, token = new_device(hub, tmp_path, device_id, **kw)
        made.append(dev)
        return dev, token

    yield factory
    for dev in made:
        dev.destroy()


@pytest.fixture(params=["softhsm", "tpm"])
def make_token_device(request, hub, tmp_path, tls_route):
    """make_device on each token type and TLS route in turn: SoftHSM2, then TPM 2.0 (tests/integration/
    tpmfixtures.py: one tpm2-pkcs11 store for the test, whose environment the agents inherit, and a token per device,
    labelled with its device id), each on every route of the run (`tls_route`: pkcs11-provider, the libp11 engine;
    $TESSERA_TEST_ROUTES selects). Test ids name both: [softhsm-provider], [tpm-engine]. The device's id gets
    both as suffix (`<id>-<token>-<route>`) and its agent children get the route explicitly (Device.route).

    Which tests get the whole token x route matrix (CI time: each agent case costs seconds): those where a running
    agent loads a token key into TLS again (test_agent_renewal's rotation while telemetry flows: a second key in
    the same process, on each token and route). A test that never puts the token key into TLS (enroll: a
    bootstrap token over server-authenticated TLS, the CSR signed through python-pkcs11), or whose processes each
    load one key once (what test_hsm_tls checks per token and route: handshakes, a wrong PIN, missing keys), is
    decorated with tests.helpers.one_tls_route: one route per token type, the route adding nothing there but time."""
    maker = None
    if request.param == "tpm":
        from tests.integration.tpmfixtures import create_tpm_token

        stack = request.getfixturevalue("tpm_stack")
        monkeypatch = request.getfixturevalue("monkeypatch")
        store = tmp_path / "tpm-store"
        store.mkdir(mode=0o700)
        for name, value in dict(stack.env, TPM2_PKCS11_STORE=str(store)).items():
            monkeypatch.setenv(name, value)

        def maker(base: Path, device_id: str):
            return create_tpm_token(stack, base / "tpm", label=device_id[:32], store=store)
    made: list[Device] = []

    def factory(device_id: str, **kw: Any) -> tuple[Device, str]:
        device_id = f"{device_id}-{request.param}-{tls_route}"  # the hub is the module's: one id per variant
        dev, token = new_device(hub, tmp_path, device_id, token_maker=maker, route=tls_route, **kw)
        made.append(dev)
        return dev, token

    yield factory
    for dev in made:
        dev.destroy()


def enrolled_device(hub: Hub, base: Path, device_id: str, **kw: Any) -> Device:
    dev, token = new_device(hub, base, device_id, **kw)
    dev.enroll_ok(token)
    return dev


# --- spool copies ------------------------------------------------------------------------------------------------

def snapshot_spool(dev: Device, dest: Path) -> list[dict]:
    """Copy spool.sqlite3 (+ -wal) while nobody holds it and read the telemetry still queued in the copy."""
    dest.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal"):
        src = Path(str(dev.spool) + suffix)
        if src.exists():
            shutil.copy2(src, dest / (dev.spool.name + suffix))
    conn = sqlite3.connect(dest / dev.spool.name)
    try:
        rows = conn.execute("SELECT topic, payload FROM messages ORDER BY id").fetchall()
    finally:
        conn.close()
    return [json.loads(p) for t, p in rows if t.endswith("/telemetry")]


__all__ = ["AGENT_CLI_TIMEOUT", "Device", "KEY_LABEL", "TOKEN_LABEL", "agent_binary", "agent_env", "broker_log",
           "broker_pids", "ca_fingerprint", "child_env", "device_messages", "enrolled_device",
           "hub", "make_device", "make_token_device", "messages_log", "new_device", "one_line", "run_agent_cli",
           "set_pdeathsig",
           "snapshot_spool", "telemetry", "telemetry_hub", "wait_until", "write_secret"]
