"""Device agent benchmark: start-to-connected time, memory, spool throughput and drain rate.

``python -m bench.agent_bench [--quick]`` prints a result table and a memory breakdown; ``run(quick)`` returns the
rows (dicts: metric, value, goal, pass; rows whose goal is "info" only report a number).

Everything is real: a `tessera-hub serve` (its Mosquitto, device-message log on), one enrolled device with its key
in a SoftHSM2 token, and the venv's `tessera-agent`. Measured:

- start -> connected, two ways: (a) the CLI: from spawning `tessera-agent run` to its status.json saying
  'online' (polled every 2 ms); (b) in a `python -c` child that builds `agent.session.Agent` itself: from
  spawning the child to `Agent.connected_at` (CONNACK), split into interpreter start, imports, Agent(), loading
  the token key into the SSLContext, and the TLS + MQTT connect;
- peak RSS (VmHWM, /proc/<pid>/status) of `tessera-agent run` after ~5 s of telemetry every 0.05 s, with its
  private (RssAnon) and proportional (Pss) parts; the in-process child's RSS after each import stage shows what
  dominates;
- spool: put/s one message per transaction (each one fsync'd), put_many in batches of 100, ack/s;
- drain: N messages spooled while the agent is down, then the time from CONNACK to an empty spool (messages/s
  handed to the broker and PUBACKed), checked end to end in the hub's device-messages.jsonl.

Goals (from the issue): start -> connected <= 1 s, peak RSS <= 30 MB.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
DEVICE = "bench-agent-1"
GOAL_CONNECT_S = 1.0
GOAL_RSS_MB = 30.0


@dataclass
class Setup:
    connect_samples: int = 5
    rss_after_s: float = 5.0
    spool_single: int = 500
    spool_batched: int = 5000
    drain_n: int = 2000


def _settings(quick: bool) -> Setup:
    return Setup(connect_samples=2, rss_after_s=5.0, spool_single=150, spool_batched=1000, drain_n=500) if quick \
        else Setup()


# --- processes ----------------------------------------------------------------------------------------------------

def _bin(name: str) -> str:
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} is not installed (pip install -e .)")
    return found


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TESSERA_HUB_DIR", "TESSERA_AGENT_CONFIG", "SOFTHSM2_CONF", "COLUMNS", "LINES")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _pdeathsig() -> None:  # child, before exec: die with the benchmark
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def _run(argv: list[str], timeout: float = 120.0) -> str:
    proc = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, timeout: float = 10.0) -> int | None:
    """SIGTERM, then (hub: SIGTERM may land on a non-main thread) SIGTERM to the main thread, then SIGKILL."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).tgkill(proc.pid, proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        return None


def _smaps_by_file(pid: int, top: int = 12) -> list[tuple[str, float]]:
    """RSS of a process grouped by mapping (library path, [heap], [anon]...), largest first, in MB."""
    sizes: dict[str, int] = {}
    name = "?"
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):
                parts = line.split(None, 5)
                name = parts[5].strip() if len(parts) > 5 else "[anon]"
                name = os.path.basename(name) if name.startswith("/") else name
            elif first == "Rss:":
                sizes[name] = sizes.get(name, 0) + int(line.split()[1])
    return [(k, v / 1024) for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])[:top]]


def _mem(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile (status) and Pss (smaps_rollup) of a process, in MB."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            if line.startswith("Pss:"):
                out["Pss"] = int(line.split()[1]) / 1024
    return out


# --- a hub and an enrolled device ------------------------------------------------------------------------------------

@dataclass
class Rig:
    tmp: Path
    hub_dir: Path
    est_port: int = 0
    mqtt_port: int = 0
    hub: subprocess.Popen | None = None
    token: object = None
    config: Path | None = None
    state: Path | None = None
    procs: list = field(default_factory=list)

    def start(self) -> None:
        _run([_bin("tessera-hub"), "init", "--fleet", "bench", "--dir", str(self.hub_dir)])
        toml = self.hub_dir / "fleet.toml"
        text, n = re.subn(r"(?m)^telemetry_log = .*$", "telemetry_log = true", toml.read_text())
        if n != 1:
            raise RuntimeError("fleet.toml has no telemetry_log line")
        toml.write_text(text)
        self.est_port, self.mqtt_port = _free_port(), _free_port()
        out = self.tmp / "hub.out"
        with open(out, "wb") as fh:
            self.hub = subprocess.Popen([_bin("tessera-hub"), "serve", "--dir", str(self.hub_dir), "--host", HOST,
                                         "--est-port", str(self.est_port), "--mqtt-port", str(self.mqtt_port)],
                                        stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_env(),
                                        cwd=ROOT, preexec_fn=_pdeathsig)
        deadline = time.monotonic() + 30
        while "hub ready" not in out.read_text(errors="replace"):
            if self.hub.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tessera-hub serve did not start: {out.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        token = _run([_bin("tessera-hub"), "device", "add", DEVICE, "--dir", str(self.hub_dir)]).strip()
        from hsm.softhsm import create_token

        dev = self.tmp / "device"
        dev.mkdir(mode=0o700)
        self.token = create_token(dev / "softhsm", label="bench")
        self.state = dev / "state"
        self.config = dev / "agent.toml"
        t = self.token
        self.config.write_text("\n".join([
            f'device_id = "{DEVICE}"', f'hub_url = "https://localhost:{self.est_port}"',
            f"mqtt_port = {self.mqtt_port}", f'ca_file = "{self.hub_dir / "ca" / "root.pem"}"',
            f'state_dir = "{self.state}"', "", "[token]", f'label = "{t.label}"', f'pin_source = "file:{t.pin_file}"',
            f'softhsm_conf = "{t.conf}"', f'module = "{t.module}"', "", "[telemetry]", "interval = 0.05", ""]))
        token_file = dev / "enroll-token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        _run([_bin("tessera-agent"), "enroll", "-c", str(self.config), "--token-file", str(token_file),
              "--ca-file", str(self.hub_dir / "ca" / "root.pem")])

    def stop(self) -> None:
        for p in self.procs:
            _stop(p)
        if self.hub is not None:
            _stop(self.hub)
        if self.token is not None:
            self.token.destroy()

    def spawn_agent(self, log: Path, *overrides: str) -> tuple[subprocess.Popen, float]:
        args = [_bin("tessera-agent"), "run", "-c", str(self.config)]
        for o in overrides:
            args += ["--set", o]
        with open(log, "wb") as fh:
            t0 = time.monotonic()
            proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=_env(), cwd=ROOT, preexec_fn=_pdeathsig)
        self.procs.append(proc)
        return proc, t0

    def wait_online(self, proc: subprocess.Popen, timeout: float = 30.0, poll: float = 0.002) -> float:
        deadline = time.monotonic() + timeout
        path = self.state / "status.json"
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                st = json.loads(path.read_text())
                if st.get("state") == "online" and st.get("pid") == proc.pid:
                    return time.monotonic()
            if proc.poll() is not None:
                raise RuntimeError(f"tessera-agent run exited {proc.returncode} before connecting")
            time.sleep(poll)
        raise RuntimeError("tessera-agent run did not connect within 30 s")

    def hub_telemetry(self) -> list[dict]:
        path = self.hub_dir / "logs" / "device-messages.jsonl"
        rows = []
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    row = json.loads(line)
                    if row["device"] == DEVICE and row["kind"] == "telemetry":
                        rows.append(json.loads(row["payload"]))
        return rows


# --- the in-process child ------------------------------------------------------------------------------------------

# Imports in the order `tessera-agent run` makes them (the CLI, then the session, then the TLS stack): the RSS delta
# of each stage is what that stage adds on top of everything before it.
IMPORT_STAGES = [
    ("typer + rich (CLI framework)", ["typer", "rich.console", "rich.table"]),
    ("cryptography (x509, hazmat; Rust _rust.abi3.so)", ["cryptography.x509", "cryptography.hazmat.primitives.hashes",
                                                         "cryptography.hazmat.primitives.asymmetric.ec"]),
    ("hsm.keys / hsm.token / agent.cli", ["hsm.errors", "hsm.keys", "hsm.token", "agent.cli"]),
    ("typer command dispatch (typer._adapters: pydantic + pydantic_core)", ["typer._adapters"]),
    ("paho-mqtt (+ ssl, libssl/libcrypto)", ["paho.mqtt.client"]),
    ("agent.enroll (+ multiprocessing, concurrent.futures)", ["agent.enroll"]),
    ("agent.session (+ sqlite3, spool, telemetry)", ["agent.session"]),
    ("hsm.tls (ctypes)", ["hsm.tls"]),
]

CHILD = r"""
import time
T0 = time.time()
import json, sys, threading


def mem():
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    return out


def main():
    cfg_path, seconds, stages = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
    rows = [("python interpreter (start, json, threading)", mem(), time.time() - T0)]
    for name, modules in stages:
        t = time.monotonic()
        for m in modules:
            __import__(m)
        rows.append((name, mem(), time.monotonic() - t))
    from pathlib import Path
    from agent.config import load
    from agent.session import Agent

    cfg = load(Path(cfg_path), ["telemetry.interval=3600"])
    t = time.monotonic()
    agent = Agent(cfg)
    rows.append(("Agent() (spool open, telemetry source)", mem(), time.monotonic() - t))
    depth0 = agent.spool.depth()
    t = time.monotonic()
    agent._context()
    rows.append(("token key into SSLContext (libp11 engine + SoftHSM2, C_Login)", mem(), time.monotonic() - t))
    t_run = time.monotonic()
    th = threading.Thread(target=agent.run, kwargs={"max_seconds": seconds}, daemon=True)
    th.start()
    while agent.connected_at is None and time.monotonic() - t_run < 30 and th.is_alive():
        time.sleep(0.0005)
    if agent.connected_at is None:
        print(json.dumps({"error": "no CONNACK within 30 s"}))
        return
    connected_wall = time.time()
    rows.append(("TCP + TLS (token signs) + MQTT CONNACK", mem(), agent.connected_at - t_run))
    while agent.spool.depth() > 0 and time.monotonic() - agent.connected_at < seconds:
        time.sleep(0.001)
    drained = time.monotonic()
    left = agent.spool.depth()
    rows.append(("after draining the spool", mem(), drained - agent.connected_at))
    agent.stop_event.set()
    th.join(15)
    print(json.dumps({"t0": T0, "connected": connected_wall, "depth0": depth0, "left": left,
                      "drain_s": drained - agent.connected_at, "rows": rows, "hwm": mem()["VmHWM"]}))


if __name__ == "__main__":
    main()
"""


# What the steady-state session needs without the CLI framework and without cryptography / multiprocessing (both only
# needed for enrollment and renewal): config, spool, telemetry, paho, the token key in an SSLContext; one QoS 1
# publish as the device. Its peak RSS is the floor a leaner import structure could reach.
FLOOR_CHILD = r"""
import json, sys, time


def mem():
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def main():
    from pathlib import Path
    import paho.mqtt.client as mqtt
    from agent.config import load
    from agent.spool import Spool
    from agent.telemetry import builtin_readings, envelope
    from agent.commands import CommandHandler
    from agent.backoff import Backoff
    from hsm.tls import client_context
    from datetime import datetime, timezone

    cfg = load(Path(sys.argv[1]))
    device = sys.argv[2]
    imports = mem()
    spool = Spool(cfg.state / "floor-spool.sqlite3")
    ctx = client_context(cfg.state / "fleet-root.pem", cfg.state / "cert.pem", sys.argv[3], cfg.token_config)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv5)
    c.tls_set_context(ctx)
    acked = []
    c.on_publish = lambda *a: acked.append(a[1])
    c.connect(cfg.broker_host, cfg.mqtt_port, keepalive=30)
    c.loop_start()
    body = envelope(device, builtin_readings(), datetime.now(timezone.utc), 1)
    spool.put(f"devices/{device}/telemetry", body, now=time.time())
    info = c.publish(f"devices/{device}/telemetry", body, qos=1)
    info.wait_for_publish(10)
    c.disconnect()
    c.loop_stop()
    spool.close()
    print(json.dumps({"imports": imports, "end": mem(), "published": info.is_published(),
                      "modules": len(sys.modules), "cryptography": "cryptography" in sys.modules,
                      "typer": "typer" in sys.modules}))


if __name__ == "__main__":
    main()
"""


def _floor(rig: Rig) -> dict:
    key_uri = json.loads((rig.state / "identity.json").read_text())["key_uri"]
    proc = subprocess.run([sys.executable, "-c", FLOOR_CHILD, str(rig.config), DEVICE, key_uri], env=_env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"floor child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _inproc(rig: Rig, seconds: float) -> dict:
    t_spawn = time.time()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(rig.config), str(seconds), json.dumps(IMPORT_STAGES)],
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=seconds + 90,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"in-process agent child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "error" in result:
        raise RuntimeError(result["error"] + proc.stderr[-2000:])
    result["spawn_to_connected"] = result["connected"] - t_spawn
    result["interpreter_start"] = result["t0"] - t_spawn
    return result


# --- spool micro-benchmarks ------------------------------------------------------------------------------------------

def _spool_bench(tmp: Path, s: Setup) -> dict[str, float]:
    from agent.spool import Spool

    d = tmp / "spool-bench"
    d.mkdir(mode=0o700)
    payload = json.dumps({"device": DEVICE, "ts": "2026-01-01T00:00:00.000Z", "seq": 1,
                          "readings": {"load_1": 0.5, "mem_available_kb": 123456, "uptime_s": 1.0}}).encode()
    topic = f"devices/{DEVICE}/telemetry"
    out = {}
    with Spool(d / "single.sqlite3") as sp:
        t = time.perf_counter()
        for _ in range(s.spool_single):
            sp.put(topic, payload, now=time.time())
        out["put_single"] = s.spool_single / (time.perf_counter() - t)
        ids = [m.id for m in sp.pending(s.spool_single)]
        t = time.perf_counter()
        for i in ids:
            sp.ack(i)
        out["ack_single"] = len(ids) / (time.perf_counter() - t)
    with Spool(d / "batched.sqlite3") as sp:
        t = time.perf_counter()
        for _ in range(s.spool_batched // 100):
            sp.put_many([(topic, payload)] * 100, now=time.time())
        out["put_batched"] = (s.spool_batched // 100) * 100 / (time.perf_counter() - t)
        t = time.perf_counter()
        n = 0
        while batch := sp.pending(100):
            n += sp.ack_many([m.id for m in batch])
        out["ack_batched"] = n / (time.perf_counter() - t)
    return out


def _prefill(rig: Rig, n: int) -> None:
    """N telemetry messages in the device's spool while no agent runs (marked readings.bench = true)."""
    from datetime import datetime, timezone

    from agent.spool import Spool

    topic = f"devices/{DEVICE}/telemetry"
    with Spool(rig.state / "spool.sqlite3") as sp:
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        items = [(topic, json.dumps({"device": DEVICE, "ts": now, "seq": 1_000_000 + i,
                                     "readings": {"bench": True, "i": i}}).encode()) for i in range(n)]
        for k in range(0, n, 500):
            sp.put_many(items[k:k + 500], now=time.time())


# --- the benchmark -------------------------------------------------------------------------------------------------

@dataclass
class Report:
    setup: Setup
    rows: list[dict]
    cli_connect: list[float]
    mem: dict[str, float]
    inproc: dict
    spool: dict[str, float]
    drain: dict
    timings: dict[str, float]
    mappings: list[tuple[str, float]] = field(default_factory=list)
    floor: dict = field(default_factory=dict)


def _row(metric: str, value: float, goal: str, ok: bool) -> dict:
    return {"metric": metric, "value": float(value), "goal": goal, "pass": bool(ok)}


def measure(quick: bool = False, setup: Setup | None = None) -> Report:
    s = setup or _settings(quick)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    # hsm.tokeninit runs `python -m hsm.tokeninit` with our environment: make the repository importable there.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tessera-agent-bench-") as tmp_name:
        tmp = Path(tmp_name)
        rig = Rig(tmp, tmp / "hub")
        try:
            t = time.perf_counter()
            rig.start()
            timings["hub + device enrollment"] = time.perf_counter() - t

            # (a) CLI start -> online; the first run keeps streaming telemetry for the RSS sample
            t = time.perf_counter()
            connect: list[float] = []
            mem: dict[str, float] = {}
            mappings: list[tuple[str, float]] = []
            for i in range(s.connect_samples):
                proc, t0 = rig.spawn_agent(tmp / f"agent-{i}.log")
                connect.append(rig.wait_online(proc) - t0)
                if i == 0:
                    time.sleep(s.rss_after_s)
                    mem = _mem(proc.pid)
                    mappings = _smaps_by_file(proc.pid)
                if _stop(proc) != 0:
                    raise RuntimeError(f"tessera-agent run did not exit 0: {(tmp / f'agent-{i}.log').read_text()}")
            produced = max((m["seq"] for m in rig.hub_telemetry()), default=0)
            timings["CLI runs"] = time.perf_counter() - t

            # (b) in-process child, with a prefilled spool to drain
            t = time.perf_counter()
            before = {m["seq"] for m in rig.hub_telemetry() if m["seq"] >= 1_000_000}
            _prefill(rig, s.drain_n)
            inproc = _inproc(rig, seconds=30.0)
            deadline = time.monotonic() + 15
            while True:
                got = {m["seq"] for m in rig.hub_telemetry() if m["seq"] >= 1_000_000} - before
                if len(got) >= s.drain_n or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            drain = {"n": s.drain_n, "seconds": inproc["drain_s"], "left": inproc["left"], "at_hub": len(got),
                     "rate": (inproc["depth0"] - inproc["left"]) / inproc["drain_s"] if inproc["drain_s"] else 0.0}
            timings["in-process child"] = time.perf_counter() - t
            t = time.perf_counter()
            floor = _floor(rig)
            timings["floor child"] = time.perf_counter() - t

            t = time.perf_counter()
            spool = _spool_bench(tmp, s)
            timings["spool micro"] = time.perf_counter() - t
        finally:
            rig.stop()
    timings["total"] = time.perf_counter() - t_all

    med = statistics.median(connect)
    hwm = mem.get("VmHWM", float("nan"))
    rows = [
        _row("agent start->online, CLI spawn to status.json (s, median)", med, f"<= {GOAL_CONNECT_S:.0f}",
             med <= GOAL_CONNECT_S),
        _row("agent start->CONNACK, in-process Agent (s, spawn to connected_at)", inproc["spawn_to_connected"],
             f"<= {GOAL_CONNECT_S:.0f}", inproc["spawn_to_connected"] <= GOAL_CONNECT_S),
        _row("agent peak RSS VmHWM after 5 s of telemetry (MB)", hwm, f"<= {GOAL_RSS_MB:.0f}", hwm <= GOAL_RSS_MB),
        _row("agent RSS private (RssAnon, MB)", mem.get("RssAnon", float("nan")), "info", True),
        _row("agent RSS file-backed (RssFile: libraries, MB)", mem.get("RssFile", float("nan")), "info", True),
        _row("agent PSS (MB)", mem.get("Pss", float("nan")), "info", True),
        _row("lean session floor: peak RSS without typer/rich/pydantic/cryptography/multiprocessing (MB)",
             floor["end"]["VmHWM"], "info (what-if)", True),
        _row("telemetry seq reached in the 5 s RSS run", produced, "info", True),
        _row("spool put/s, one message per transaction (fsync each)", spool["put_single"], "info", True),
        _row("spool ack/s, one per transaction (what the agent does per PUBACK)", spool["ack_single"], "info", True),
        _row("spool put/s, put_many batches of 100", spool["put_batched"], "info", True),
        _row("spool ack/s, ack_many batches of 100", spool["ack_batched"], "info", True),
        _row("spool drain to the broker (messages/s, CONNACK to empty)", drain["rate"], "info", True),
        _row(f"drained messages seen by the hub (of {drain['n']})", drain["at_hub"], f"== {drain['n']}",
             drain["at_hub"] == drain["n"]),
    ]
    return Report(s, rows, connect, mem, inproc, spool, drain, timings, mappings, floor)


def run(quick: bool = False) -> list[dict]:
    """Run the benchmark; rows {"metric", "value", "goal", "pass"}."""
    return measure(quick).rows


# --- printing ------------------------------------------------------------------------------------------------------

def print_report(rep: Report) -> None:
    width = max(len(r["metric"]) for r in rep.rows)
    print(f"{'metric':<{width}}  {'value':>10}  {'goal':<10} pass")
    print("-" * (width + 30))
    for r in rep.rows:
        print(f"{r['metric']:<{width}}  {r['value']:>10.3f}  {r['goal']:<10} {'yes' if r['pass'] else 'NO'}")

    if rep.mappings:
        print("\n`tessera-agent run` after 5 s: RSS by mapping (MB; [anon]/[heap] = Python objects and malloc)")
        for name, mb in rep.mappings:
            print(f"  {mb:6.1f}  {name}")
    print(f"\nCLI start->online samples (s): {', '.join(f'{x:.3f}' for x in rep.cli_connect)}")
    ip = rep.inproc
    print("\nin-process agent child: time and RSS after each stage (imports in `tessera-agent run` order)")
    print(f"  {'stage':<70} {'ms':>7} {'RSS MB':>7} {'+MB':>6} {'anon':>6} {'file':>6}")
    prev = None
    print(f"  {'spawn -> first line of the child (interpreter start)':<70} {ip['interpreter_start'] * 1e3:7.0f}")
    for name, m, secs in ip["rows"]:
        delta = m["VmRSS"] - prev if prev is not None else m["VmRSS"]
        print(f"  {name:<70} {secs * 1e3:7.0f} {m['VmRSS']:7.1f} {delta:+6.1f} {m['RssAnon']:6.1f} "
              f"{m['RssFile']:6.1f}")
        prev = m["VmRSS"]
    print(f"  child peak RSS (VmHWM): {ip['hwm']:.1f} MB; spawn -> CONNACK {ip['spawn_to_connected'] * 1e3:.0f} ms")
    if rep.floor:
        f = rep.floor
        print(f"  lean session floor (config, spool, telemetry, paho, token key TLS, one QoS 1 publish; no CLI "
              f"framework, no cryptography): {f['end']['VmHWM']:.1f} MB peak ({f['imports']['VmRSS']:.1f} MB after "
              f"imports; published: {f['published']}; cryptography loaded: {f['cryptography']}, typer loaded: "
              f"{f['typer']})")
    d = rep.drain
    print(f"\ndrain: {d['n']} spooled messages, CONNACK to empty spool in {d['seconds']:.2f} s "
          f"({d['rate']:.0f}/s); {d['at_hub']} seen by the hub; {d['left']} left")
    sp = rep.spool
    print(f"spool: put {sp['put_single']:.0f}/s single, {sp['put_batched']:.0f}/s batched; "
          f"ack {sp['ack_single']:.0f}/s "
          f"single, {sp['ack_batched']:.0f}/s batched (the agent acks one message per transaction)")
    print("\nwall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in rep.timings.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.agent_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples and smaller spool runs")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    rep = measure(args.quick)
    if args.json:
        print(json.dumps(rep.rows, indent=2))
    else:
        print_report(rep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
