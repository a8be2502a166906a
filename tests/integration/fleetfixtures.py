"""A fleet of N real agents for the fleet-scale integration tests (tests/integration/test_jobs_fleet.py).

Everything is real: one `tessera-hub serve` (hubfixtures.Hub, with its supervised Mosquitto and the fleet API), and
N `tessera-agent run` processes, each with its own SoftHSM2 token holding its device key, enrolled over EST. What
makes 200 of them cheap on a 2-core machine:

- tokens share SoftHSM token directories: one directory (one softhsm2.conf, one PIN file) per TOKENS_PER_DIR
  devices, one token per device (labelled with the device id, which is unique). The directories live in /dev/shm
  when it has room (SoftHSM syncs every object it writes: a key pair costs ~170 ms on this disk, ~4 ms in tmpfs);
- provisioning runs in a few `python -m tests.integration.fleetfixtures` children (PROVISION_PARALLEL at once),
  each taking one token directory: it initializes the tokens (hsm.tokeninit, ctypes, PINs never in argv), then
  runs the agent's own enrollment code (agent.enroll.enroll: key generated in the token, CSR signed there, EST
  simpleenroll with the one-time token, the answer verified and stored as `tessera-agent enroll` stores it) with
  hsm.worker's key operations run in that child itself instead of in one spawned interpreter per operation (the
  child runs no TLS stack on the tokens, which is what the isolation is for). The `tessera-agent enroll` command
  line itself is covered by test_agent_enroll.py;
- the devices are registered in one `tessera-hub token create --count N --group G` call;
- telemetry is light (one message at start, then every TELEMETRY_INTERVAL s; the soak passes its own interval).

The pytest process never opens a device token and no secret is in argv (tokens reach the children on stdin, PINs
are 0600 files). Every agent dies with pytest (PR_SET_PDEATHSIG), is SIGTERMed at teardown (SIGKILL after
STOP_TIMEOUT), and teardown fails if any process whose command line names the fleet directory is left (pgrep).

The hub keeps its ports across `restart_hub()` (SIGTERM, exit 0 asserted, `serve` again on the same directory and
ports): the agents reconnect by themselves with their own backoff.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import http.client
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.helpers import ROOT, child_env, free_port
from tests.integration.agentfixtures import agent_binary, agent_env, set_pdeathsig
from tests.integration.brokerfixtures import BROKER_LIMITS, assert_no_broker_left, wait_ready
from tests.integration.hubfixtures import Hub, _set_pdeathsig, cli_env, hub_binary, init_hub

GROUP = "fleet"
PREFIX = "fl"
TOKENS_PER_DIR = 20
PROVISION_PARALLEL = 3          # children at once (2 cores; a child also waits on the hub's EST answers)
TELEMETRY_INTERVAL = 600.0      # s: one message at start, then almost nothing
KEY_LABEL = "device-key"
OPERATOR = "fleet-ops"
STOP_TIMEOUT = 60.0             # s for the whole fleet to exit on SIGTERM (200 interpreters tearing down at once)
ONLINE_TIMEOUT = 240.0
#: fleet.toml for the fleet hub: every agent talks from 127.0.0.1 (EST and MQTT per-source limits raised); the
#: hub logs every device message it sees (logs/device-messages.jsonl: light telemetry, acks) for post-mortems
FLEET_SETTINGS = {**BROKER_LIMITS, "telemetry_log": True}
SHM = Path("/dev/shm")
SHM_NEEDED = 32 * 1024 * 1024  # bytes free in /dev/shm to put the token directories there (200 tokens: 3.3 MB)


def fleet_size(default: int = 200) -> int:
    """$TESSERA_FLEET_SIZE (for quick runs while developing), else `default`."""
    return int(os.environ.get("TESSERA_FLEET_SIZE", default))


# --- a hub that can be restarted on the same ports -----------------------------------------------------------------

class FleetHub(Hub):
    """hubfixtures.Hub whose ports are chosen once: start() after stop() serves the same directory on the same EST,
    MQTT and API ports (agents keep their config). Each run logs to serve-<n>.stdout/.stderr."""

    runs: int = 0

    def start(self, timeout: float = 30.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        if not self.port:
            self.port = free_port()
            self.mqtt_port = free_port()
            while self.mqtt_port == self.port:
                self.mqtt_port = free_port()
            while not self.api_port or self.api_port in (self.port, self.mqtt_port):
                self.api_port = free_port()
        self.runs += 1
        base = self.dir.parent
        self.stdout_path, self.stderr_path = base / f"serve-{self.runs}.stdout", base / f"serve-{self.runs}.stderr"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [hub_binary(), "serve", "--dir", str(self.dir), "--est-port", str(self.port), "--mqtt-port",
                 str(self.mqtt_port), "--host", "127.0.0.1", "--api-port", str(self.api_port)],
                stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=cli_env(), cwd=ROOT, start_new_session=True,
                preexec_fn=_set_pdeathsig)
        deadline = time.monotonic() + timeout
        while "hub ready" not in self.stdout_text():
            if self.proc.poll() is not None:
                raise AssertionError(f"tessera-hub serve exited {self.proc.returncode} before 'hub ready':\n"
                                     f"{self.stdout_text()}\n{self.stderr_path.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"tessera-hub serve not ready within {timeout} s:\n{self.stdout_text()}")
            time.sleep(0.05)
        wait_ready(self)

    def stop_clean(self) -> None:
        """SIGTERM; the hub must exit 0 (Hub.stop: within 10 s) and leave no Mosquitto behind."""
        rc = self.stop()
        assert rc == 0, f"tessera-hub serve exited {rc} on SIGTERM:\n{self.stderr_path.read_text(errors='replace')}"
        assert "hub stopped" in self.stdout_text(), self.stdout_text()
        assert_no_broker_left(self)


# --- the fleet API as an operator ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Answer:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Api:
    """HTTPS calls to the fleet API with a service identity's client certificate (a fresh connection each)."""

    def __init__(self, hub: FleetHub, cert: Path, key: Path):
        self.hub = hub
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self.ctx.load_verify_locations(cafile=str(hub.root_pem))
        self.ctx.load_cert_chain(str(cert), str(key))

    def call(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> Answer:
        conn = http.client.HTTPSConnection("127.0.0.1", self.hub.api_port, context=self.ctx, timeout=timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
            resp = conn.getresponse()
            return Answer(resp.status, resp.read())
        finally:
            conn.close()

    def ok(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        ans = self.call(method, path, body)
        assert ans.status == status, f"{method} {path} -> {ans.status} (expected {status}): {ans.body[:2000]!r}"
        return ans.json()


# --- the agents ------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class FleetAgent:
    id: str
    base: Path
    proc: subprocess.Popen | None = None

    @property
    def config(self) -> Path:
        return self.base / "agent.toml"

    @property
    def state(self) -> Path:
        return self.base / "state"

    @property
    def log(self) -> Path:
        return self.base / "agent.log"

    def status_file(self) -> dict:
        try:
            return json.loads((self.state / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def log_tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


class Fleet:
    """A running FleetHub, N enrolled agents in group GROUP, an operator identity for the API, and timings."""

    def __init__(self, base: Path, n: int, group: str = GROUP, telemetry_interval: float = TELEMETRY_INTERVAL):
        self.base, self.n, self.group = Path(base), n, group
        self.telemetry_interval = telemetry_interval
        self.hub: FleetHub | None = None
        self.api: Api | None = None
        self.agents: list[FleetAgent] = []
        self.times: dict[str, float] = {}
        self.agents_dir = self.base / "agents"
        self.token_root = self._token_root()

    def _token_root(self) -> Path:
        """Where the SoftHSM token directories go: a private directory in /dev/shm if it has room, else base."""
        try:
            st = os.statvfs(SHM)
            if st.f_bavail * st.f_frsize >= SHM_NEEDED and os.access(SHM, os.W_OK | os.X_OK):
                return Path(tempfile.mkdtemp(prefix="tessera-fleet-", dir=SHM))
        except OSError:
            pass
        return self.base / "tokens"

    @property
    def ids(self) -> list[str]:
        return [a.id for a in self.agents]

    # setup
    def start_hub(self) -> None:
        plain = init_hub(self.base, **FLEET_SETTINGS)
        self.hub = FleetHub(dir=plain.dir, api_port=None)
        self.hub.start()

    def register(self) -> list[tuple[str, str]]:
        out = self.base / "tokens.csv"
        self.hub.cli_ok("token", "create", "--count", str(self.n), "--prefix", PREFIX, "--group", self.group,
                        "--out", str(out))
        with open(out, newline="") as fh:
            rows = [(r["device_id"], r["token"]) for r in csv.DictReader(fh)]
        out.unlink()
        assert len(rows) == self.n, rows[:3]
        return rows

    def provision(self, rows: list[tuple[str, str]]) -> None:
        """Token directories of TOKENS_PER_DIR devices, each provisioned and enrolled by one child."""
        self.agents_dir.mkdir(mode=0o700)
        self.token_root.mkdir(mode=0o700, exist_ok=True)
        jobs = []
        for k in range(0, len(rows), TOKENS_PER_DIR):
            part = rows[k:k + TOKENS_PER_DIR]
            jobs.append({"op": "provision", "softhsm_dir": str(self.token_root / f"softhsm-{k // TOKENS_PER_DIR:03d}"),
                         "hub_url": f"https://localhost:{self.hub.port}", "mqtt_port": self.hub.mqtt_port,
                         "root": str(self.hub.root_pem), "interval": self.telemetry_interval,
                         "devices": [{"id": d, "token": t, "base": str(self.agents_dir / d)} for d, t in part]})
            self.agents += [FleetAgent(d, self.agents_dir / d) for d, _ in part]
        with ThreadPoolExecutor(PROVISION_PARALLEL) as pool:
            answers = list(pool.map(_run_child, jobs))
        failed = {d: e for a in answers for d, e in a.get("errors", {}).items()}
        assert all(a.get("ok") for a in answers) and not failed, \
            f"provisioning failed: {[a for a in answers if not a.get('ok')][:2]} {dict(list(failed.items())[:5])}"

    def add_operator(self) -> None:
        self.hub.cli_ok("identity", "add", OPERATOR, "--role", "operator")
        d = self.hub.dir / "identities" / OPERATOR
        self.api = Api(self.hub, d / f"{OPERATOR}.pem", d / f"{OPERATOR}.key")

    def start_agents(self) -> None:
        env = agent_env()
        for a in self.agents:
            with open(a.log, "ab") as fh:
                a.proc = subprocess.Popen([agent_binary(), "run", "-c", str(a.config)], stdout=fh,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ROOT,
                                          preexec_fn=set_pdeathsig)

    # state
    def dead(self) -> dict[str, int]:
        """Agents whose process has exited: {id: exit status}."""
        return {a.id: a.proc.returncode for a in self.agents if a.proc is not None and a.proc.poll() is not None}

    def assert_alive(self) -> None:
        dead = self.dead()
        assert not dead, f"{len(dead)} agent(s) exited: {dict(list(dead.items())[:5])}\n" + \
            "\n".join(f"--- {a.id}\n{a.log_tail(1500)}" for a in self.agents if a.id in list(dead)[:2])

    def crashed_logs(self) -> dict[str, str]:
        """Agents whose log holds a Python traceback: {id: the log's tail}."""
        return {a.id: a.log_tail(3000) for a in self.agents if "Traceback (most recent call last)" in
                (a.log.read_text(errors="replace") if a.log.exists() else "")}

    def online_in_registry(self) -> int:
        rows = self.hub.query("SELECT count(*) AS n FROM devices WHERE online = 1 AND id LIKE ?", (f"{PREFIX}-%",))
        return rows[0]["n"]

    def agents_online(self) -> int:
        return sum(1 for a in self.agents if a.status_file().get("state") == "online"
                   and a.status_file().get("pid") == a.proc.pid)

    def wait_online(self, timeout: float = ONLINE_TIMEOUT) -> float:
        """Until every agent says online (status.json of its current process) and the hub's registry has all of
        them online; fails early if an agent exits. Returns the seconds waited."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        while True:
            self.assert_alive()
            if self.agents_online() == self.n and self.online_in_registry() == self.n:
                return time.monotonic() - t0
            if time.monotonic() > deadline:
                late = [a for a in self.agents if a.status_file().get("state") != "online"]
                raise AssertionError(f"{len(late)} agent(s) not online after {timeout} s (registry online: "
                                     f"{self.online_in_registry()}/{self.n}); e.g. {late[:1] and late[0].id}: "
                                     f"{late[:1] and late[0].status_file()}\n{late[:1] and late[0].log_tail()}")
            time.sleep(0.5)

    def ensure_hub(self) -> None:
        """Start the hub again if an earlier test left it stopped (or it died), then wait for every agent."""
        if self.hub.proc is None or self.hub.proc.poll() is not None:
            self.hub.proc = None
            self.hub.start()
        self.wait_online()

    def restart_hub(self) -> float:
        """SIGTERM the hub (clean exit asserted), serve again on the same directory and ports; returns the gap in
        seconds between the SIGTERM and "hub ready" of the new process."""
        t0 = time.monotonic()
        self.hub.stop_clean()
        self.hub.proc = None
        self.hub.start()
        return time.monotonic() - t0

    # teardown
    def stop_agents(self) -> list[str]:
        t0 = time.monotonic()
        problems = []
        running = [a for a in self.agents if a.proc is not None and a.proc.poll() is None]
        for a in running:
            with contextlib.suppress(ProcessLookupError):
                a.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for a in running:
            try:
                a.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                problems.append(f"{a.id} did not exit within {STOP_TIMEOUT} s of the SIGTERM to the fleet (killed)")
                with contextlib.suppress(ProcessLookupError):
                    a.proc.kill()
                a.proc.wait(timeout=10)
        self.times["agents_stop_s"] = time.monotonic() - t0
        print(f"\n{len(running)} agents stopped in {self.times['agents_stop_s']:.1f} s", flush=True)
        return problems

    def leftovers(self) -> list[int]:
        """Pids of processes whose command line names this fleet's directories (agents, children, brokers)."""
        pids = set()
        for where in (self.base, self.token_root):
            proc = subprocess.run(["pgrep", "-f", "--", f"{where}/"], capture_output=True, text=True, timeout=10)
            pids.update(int(p) for p in proc.stdout.split())
        return sorted(pids - {os.getpid()})

    def teardown(self) -> None:
        problems = self.stop_agents()
        if self.hub is not None and self.hub.proc is not None:
            try:
                self.hub.stop_clean()
            except AssertionError as exc:
                problems.append(str(exc))
            finally:
                self.hub.kill()
        left = self.leftovers()
        deadline = time.monotonic() + 3
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = self.leftovers()
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if left:
            problems.append(f"processes left behind (killed): {left}")
        shutil.rmtree(self.token_root, ignore_errors=True)
        assert not problems, "; ".join(problems)


@contextlib.contextmanager
def running_fleet(base: Path, n: int, group: str = GROUP, telemetry_interval: float = TELEMETRY_INTERVAL,
                  before_agents: Callable[[Fleet], None] | None = None) -> Iterator[Fleet]:
    """A hub and `n` enrolled, online agents in `group` (telemetry every `telemetry_interval` s);
    `before_agents(fleet)` runs once they are enrolled, before any agent runs (e.g. a subscriber that must see
    every message); everything stopped (and checked) on exit."""
    fleet = Fleet(base, n, group, telemetry_interval)
    try:
        t0 = time.monotonic()
        fleet.start_hub()
        fleet.times["hub_start_s"] = time.monotonic() - t0
        t = time.monotonic()
        rows = fleet.register()
        fleet.add_operator()
        fleet.times["register_s"] = time.monotonic() - t
        t = time.monotonic()
        fleet.provision(rows)
        fleet.times["provision_enroll_s"] = time.monotonic() - t
        if before_agents is not None:
            before_agents(fleet)
        t = time.monotonic()
        fleet.start_agents()
        fleet.times["spawn_s"] = time.monotonic() - t
        fleet.times["online_wait_s"] = fleet.wait_online()
        fleet.times["agents_up_s"] = time.monotonic() - t
        fleet.times["fleet_up_s"] = time.monotonic() - t0
        print(f"\nfleet of {n} up in {fleet.times['fleet_up_s']:.1f} s: " +
              ", ".join(f"{k} {v:.1f}" for k, v in fleet.times.items()), flush=True)
        yield fleet
    finally:
        fleet.teardown()


@pytest.fixture(scope="module")
def fleet(request) -> Iterator[Fleet]:
    """fleet_size() (200) real agents in group 'fleet', shared by a test module.

    The fleet lives in a private temporary directory, not pytest's numbered tmp_path: the fleet runs for minutes,
    and a pytest session started meanwhile on the same machine prunes older numbered directories (under the agents'
    feet). It is removed afterwards unless a test failed (then its path is printed: logs are under it)."""
    base = Path(tempfile.mkdtemp(prefix="tessera-fleet-"))
    failed_before, clean = request.session.testsfailed, False
    try:
        with running_fleet(base, fleet_size()) as f:
            yield f
        clean = True
    finally:
        if clean and request.session.testsfailed == failed_before and not os.environ.get("TESSERA_KEEP_FLEET"):
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"\nfleet directory kept: {base}", flush=True)


# --- the provisioning child ------------------------------------------------------------------------------------------

def _run_child(req: dict, timeout: float = 600.0) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tests.integration.fleetfixtures"], input=json.dumps(req),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=child_env())
    try:
        answer = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"ok": False, "error": f"no JSON from the child (rc={proc.returncode}): {proc.stdout[-1000:]}\n"
                                      f"{proc.stderr[-3000:]}"}
    return answer


def _write_secret(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")
    return path


def _agent_toml(dev: dict, req: dict, conf: Path, pin_file: Path, module: str) -> str:
    state = Path(dev["base"]) / "state"
    top = {"device_id": dev["id"], "hub_url": req["hub_url"], "mqtt_port": req["mqtt_port"],
           "ca_file": str(state / "fleet-root.pem"), "state_dir": str(state)}
    lines = [f"{k} = {json.dumps(v)}" for k, v in top.items()]
    lines += ["", "[token]", f"label = {json.dumps(dev['id'])}", f"pin_source = {json.dumps(f'file:{pin_file}')}",
              f"softhsm_conf = {json.dumps(str(conf))}", f"module = {json.dumps(module)}",
              f"key_label = {json.dumps(KEY_LABEL)}", "", "[telemetry]", f"interval = {float(req['interval'])}", ""]
    return "\n".join(lines)


def _child_provision(req: dict) -> dict:
    """Initialize one token per device in one SoftHSM directory, then enroll every device with agent.enroll."""
    from hsm import worker
    from hsm.softhsm import write_conf
    from hsm.token import default_module
    from hsm.tokeninit import _run as init_token_here

    t0 = time.monotonic()
    sdir = Path(req["softhsm_dir"])
    sdir.mkdir(parents=True, mode=0o700)
    conf = write_conf(sdir)
    os.environ["SOFTHSM2_CONF"] = str(conf)
    module = default_module()
    pin = secrets.token_hex(8)
    pin_file = _write_secret(sdir / "pin", pin)
    for dev in req["devices"]:
        init_token_here(module, dev["id"], secrets.token_hex(16).encode(), pin.encode())
    t_tokens = time.monotonic() - t0

    # this child runs no TLS stack on the tokens: key work in-process instead of a spawned interpreter per call
    worker.run_isolated = lambda fn, *args, timeout=120.0: fn(*args)
    from agent.config import load
    from agent.enroll import enroll

    errors = {}
    for dev in req["devices"]:
        base = Path(dev["base"])
        base.mkdir(mode=0o700)
        (base / "agent.toml").write_text(_agent_toml(dev, req, conf, pin_file, module))
        token_file = _write_secret(base / "enroll-token", dev["token"])
        try:
            enroll(load(base / "agent.toml"), token_file, ca_file=Path(req["root"]))
        except Exception as exc:  # noqa: BLE001  (reported to the parent, which asserts on it)
            errors[dev["id"]] = f"{type(exc).__name__}: {exc}"
    return {"ok": True, "errors": errors, "tokens_s": round(t_tokens, 2),
            "total_s": round(time.monotonic() - t0, 2)}


def main() -> int:
    req = json.loads(sys.stdin.read())
    try:
        answer = {"provision": _child_provision}[req["op"]](req)
    except Exception as exc:  # noqa: BLE001
        import traceback

        answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
    print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
