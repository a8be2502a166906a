"""Soak: 200 real agents (fleetfixtures: SoftHSM tokens, EST-enrolled, `tessera-agent run` each) sending light QoS 1
telemetry for a few minutes, with a broker restart and a hub restart in the middle.

- No telemetry message is lost. Each agent numbers its telemetry `seq` 1, 2, 3... (agent.session: one per
  interval while online, spooled to disk before it is sent, deleted from the spool on PUBACK) and writes the last
  seq it spooled to status.json (`telemetry_seq`, written again when it stops). A service identity with the
  telemetry-reader role subscribes to devices/+/telemetry at QoS 1 with a persistent session (clean start only
  the first time, session expiry 1 h) before any agent runs. After the agents stopped, every seq 1..telemetry_seq
  of every agent must have reached that subscriber, or still be in the agent's spool (sent at its next start:
  not lost); duplicates are allowed (at least once) and counted.
- The reader itself is away for READER_AWAY_S before and after each restart (its session holds what comes
  meanwhile: the broker must keep it across its own restart).
- The broker restart is a SIGTERM to the hub's Mosquitto (it saves its persistent sessions, the hub's supervisor
  starts it again); the hub restart is fleetfixtures' restart_hub (SIGTERM, exit 0, serve again on the same
  ports). A kill -9 of Mosquitto is not part of this: Mosquitto writes its in-memory queues to disk only at a clean
  exit (or every autosave_interval), so messages it acknowledged and had not delivered yet die with it.
- Memory stays flat: the RSS of the serve process, of its Mosquitto and EST workers and of the agents is sampled every
  SAMPLE_EVERY s; for each process, from WARMUP_S after its start, the median of the last quarter of its samples
  may exceed the median of the first quarter by at most max(GROWTH_MIB, GROWTH_FRACTION of it). The curve is
  written to <tmp>/memory-curve.tsv and printed, with the restart moments.

Cost: the fleet's start (~45 s for 200 agents on a 2-core machine) + TESSERA_SOAK_SECONDS (default 120) of soak
+ the stop: about 3 minutes. A manual run can go longer: TESSERA_SOAK_SECONDS=1800. Marked `fleet` (deselect with
`-m "not fleet"`); it runs with the rest of the suite by default.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import ssl
import statistics
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.integration.fleetfixtures import fleet_size, running_fleet

pytestmark = [pytest.mark.integration, pytest.mark.fleet]

SOAK_S = float(os.environ.get("TESSERA_SOAK_SECONDS", 120))
TELEMETRY_S = float(os.environ.get("TESSERA_SOAK_TELEMETRY_INTERVAL", 5))
SAMPLE_EVERY = 1.0
AGENT_SAMPLE_EVERY = 10.0
WARMUP_S = 10.0
GROWTH_MIB = 24.0
GROWTH_FRACTION = 0.25
READER = "soak-reader"
SESSION_EXPIRY_S = 3600
DRAIN_QUIET_S = 3.0
READER_AWAY_S = 5.0  # the reader is disconnected this long before each restart and after it


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def children_of(hub_pid: int) -> dict[int, str]:
    """The hub's child processes: {pid: 'mosquitto' | 'est-worker' | their command name}."""
    out = {}
    for task in Path(f"/proc/{hub_pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
                comm = Path(f"/proc/{child}/comm").read_text().strip()
            except OSError:
                continue
            out[int(child)] = "est-worker" if b"hub.est.worker" in cmdline else comm
    return out


def broker_of(hub_pid: int) -> int | None:
    """The hub's Mosquitto."""
    return next((pid for pid, kind in children_of(hub_pid).items() if kind == "mosquitto"), None)


class Subscriber:
    """The telemetry-reader identity's MQTT v5 session: persistent (session expiry SESSION_EXPIRY_S, clean start 0 on
    every connect, the first included, as the hub's own admin client does: Mosquitto 2.0 writes to its persistence
    file only sessions whose CONNECT had clean start 0, so one begun with clean start 1, paho's default for the first
    connect, is gone after a broker restart with everything queued for it), reconnecting by itself; `pause()`
    disconnects it on purpose (its session, and the messages queued for it, stay with the broker) and `resume()`
    takes the session up again."""

    def __init__(self, fleet):
        self.hub = fleet.hub
        info = json.loads(self.hub.cli_ok("identity", "add", READER, "--role", "telemetry-reader", "--json"))
        files = info["files"]
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self.ctx.load_verify_locations(cafile=files["ca.pem"])
        self.ctx.load_cert_chain(files[f"{READER}.pem"], files[f"{READER}.key"])
        self.client_id = info["client_id"]
        self.lock = threading.Lock()
        self.seqs: dict[str, list[int]] = {}
        self.bad: list[str] = []
        self.connects = 0
        self.resumed: list[bool] = []  # CONNACK session-present of each connection after the first
        self.last_message = time.monotonic()
        self.connected = threading.Event()
        self.client: mqtt.Client | None = None
        self._connect()

    def _connect(self) -> None:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        c.tls_set_context(self.ctx)
        c.reconnect_delay_set(0.2, 2)
        c.on_connect, c.on_disconnect, c.on_message = self._on_connect, self._on_disconnect, self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        c.connect("127.0.0.1", self.hub.mqtt_port, keepalive=10, clean_start=False, properties=props)
        self.client = c
        c.loop_start()
        assert self.connected.wait(20), "the telemetry reader did not connect"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.bad.append(f"CONNACK {reason_code}")
            return
        if self.connects:
            self.resumed.append(bool(flags.session_present))
        self.connects += 1
        client.subscribe("devices/+/telemetry", qos=1)
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()

    def _on_message(self, client, userdata, msg) -> None:
        try:
            body = json.loads(msg.payload)
            device, seq = body["device"], body["seq"]
            assert msg.topic == f"devices/{device}/telemetry" and isinstance(seq, int)
        except (ValueError, KeyError, TypeError, AssertionError):
            self.bad.append(f"{msg.topic}: {msg.payload[:100]!r}")
            return
        with self.lock:
            self.seqs.setdefault(device, []).append(seq)
            self.last_message = time.monotonic()

    def pause(self) -> None:
        self.close()

    def resume(self) -> None:
        self._connect()

    def received(self) -> int:
        with self.lock:
            return sum(len(v) for v in self.seqs.values())

    def drain(self, quiet: float = DRAIN_QUIET_S, timeout: float = 20.0) -> None:
        """Until no message came for `quiet` s (or `timeout`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() - self.last_message < quiet and time.monotonic() < deadline:
            time.sleep(0.2)

    def close(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None
        self.connected.clear()


class Sampler(threading.Thread):
    """RSS of the serve process, its Mosquitto and the agents, every SAMPLE_EVERY s (agents every
    AGENT_SAMPLE_EVERY s); restart moments as marks."""

    def __init__(self, fleet):
        super().__init__(name="rss-sampler", daemon=True)
        self.fleet = fleet
        self.t0 = time.monotonic()
        self.rows: list[tuple] = []   # (t, kind, pid, rss KiB)
        self.marks: list[tuple[float, str]] = []
        self.started: dict[tuple[str, int], float] = {}  # (kind, pid) -> first seen
        self.halt = threading.Event()

    def mark(self, what: str) -> None:
        self.marks.append((time.monotonic() - self.t0, what))

    def _add(self, t: float, kind: str, pid: int | None, rss: int | None) -> None:
        if pid is None or rss is None:
            return
        self.started.setdefault((kind, pid), t)
        self.rows.append((t, kind, pid, rss))

    def run(self) -> None:
        next_agents = 0.0
        while not self.halt.is_set():
            t = time.monotonic() - self.t0
            proc = self.fleet.hub.proc
            if proc is not None and proc.poll() is None:
                self._add(t, "hub", proc.pid, rss_kib(proc.pid))
                for pid, kind in children_of(proc.pid).items():  # Mosquitto and the EST worker processes
                    if kind in ("mosquitto", "est-worker"):
                        self._add(t, kind, pid, rss_kib(pid))
            if t >= next_agents:
                next_agents = t + AGENT_SAMPLE_EVERY
                sizes = [s for a in self.fleet.agents if a.proc is not None and (s := rss_kib(a.proc.pid))]
                if sizes:
                    self.rows.append((t, "agents-median", 0, int(statistics.median(sizes))))
                    self.rows.append((t, "agents-max", 0, max(sizes)))
                    self.rows.append((t, "agents-total", 0, sum(sizes)))
            self.halt.wait(SAMPLE_EVERY)

    def curve(self) -> str:
        lines = ["# t_s\tprocess\tpid\trss_mib"]
        lines += [f"{t:.1f}\t{kind}\t{pid}\t{rss / 1024:.1f}" for t, kind, pid, rss in self.rows]
        lines += [f"# {t:.1f} s: {what}" for t, what in self.marks]
        return "\n".join(lines) + "\n"

    def segments(self) -> list[dict]:
        """Per process (agents: their median/max/total), after warm-up: first and last quarter medians (MiB)."""
        out = []
        for key in sorted({(k, p) for _, k, p, _ in self.rows}):
            kind, pid = key
            start = self.started.get(key, 0.0) if kind in ("hub", "mosquitto", "est-worker") else 0.0
            samples = [(t, r / 1024) for t, k, p, r in self.rows if (k, p) == key and t >= start + WARMUP_S]
            if len(samples) < 8:
                continue
            q = max(2, len(samples) // 4)
            first, last = statistics.median(r for _, r in samples[:q]), statistics.median(r for _, r in samples[-q:])
            out.append({"kind": kind, "pid": pid, "from_s": samples[0][0], "to_s": samples[-1][0], "n": len(samples),
                        "first_mib": first, "last_mib": last, "peak_mib": max(r for _, r in samples)})
        return out


def spooled_telemetry(agent) -> tuple[list[int], int]:
    """The telemetry seqs still in a stopped agent's spool, and its dropped counter."""
    path = agent.state / "spool.sqlite3"
    if not path.exists():
        return [], 0
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT payload FROM messages WHERE topic LIKE '%/telemetry'").fetchall()
        dropped = db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()[0]
    return [json.loads(p)["seq"] for (p,) in rows], dropped


@pytest.fixture(scope="module")
def soak_fleet(request):
    """fleet_size() agents with telemetry every TELEMETRY_S s and the reader subscribed before any agent runs."""
    base = Path(tempfile.mkdtemp(prefix="tessera-soak-"))
    failed_before, clean = request.session.testsfailed, False
    holder: dict = {}

    def subscribe(fleet) -> None:
        holder["sub"] = Subscriber(fleet)

    try:
        with running_fleet(base, fleet_size(), telemetry_interval=TELEMETRY_S, before_agents=subscribe) as fleet:
            fleet.subscriber = holder["sub"]
            try:
                yield fleet
            finally:
                holder["sub"].close()
        clean = True
    finally:
        if "sub" in holder and not clean:
            holder["sub"].close()
        if clean and request.session.testsfailed == failed_before and not os.environ.get("TESSERA_KEEP_FLEET"):
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"\nsoak fleet directory kept: {base}", flush=True)


def test_soak_loses_no_telemetry_and_memory_stays_flat(soak_fleet, tmp_path):
    fleet, sub = soak_fleet, soak_fleet.subscriber
    n = fleet.n
    sampler = Sampler(fleet)
    sampler.start()
    phase = SOAK_S / 3
    t_soak = time.monotonic()
    try:
        # the reader is away (its messages queue in its session) while the broker restarts
        time.sleep(max(0.0, phase - READER_AWAY_S))
        fleet.assert_alive()
        sub.pause()
        sampler.mark("reader away")
        time.sleep(READER_AWAY_S)
        old_broker = broker_of(fleet.hub.proc.pid)
        assert old_broker, "no mosquitto under the hub"
        sampler.mark(f"broker restart (SIGTERM to mosquitto {old_broker})")
        t = time.monotonic()
        os.kill(old_broker, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while (new_broker := broker_of(fleet.hub.proc.pid)) in (None, old_broker):
            assert time.monotonic() < deadline, "the hub did not start its broker again within 30 s"
            time.sleep(0.1)
        fleet.wait_online()
        broker_back_s = time.monotonic() - t
        sampler.mark(f"broker back (mosquitto {new_broker}), agents online after {broker_back_s:.1f} s")
        time.sleep(READER_AWAY_S)
        sub.resume()
        sampler.mark("reader back")

        # and again across the hub's restart
        time.sleep(max(0.0, phase - 3 * READER_AWAY_S))
        sub.pause()
        sampler.mark("reader away")
        time.sleep(READER_AWAY_S)
        sampler.mark("hub restart (SIGTERM)")
        t = time.monotonic()
        gap = fleet.restart_hub()
        fleet.wait_online()
        hub_back_s = time.monotonic() - t
        sampler.mark(f"hub back (pid {fleet.hub.proc.pid}), agents online after {hub_back_s:.1f} s")
        time.sleep(READER_AWAY_S)
        sub.resume()
        sampler.mark("reader back")
        time.sleep(max(0.0, phase - READER_AWAY_S))
        fleet.assert_alive()
    finally:
        sampler.halt.set()
        sampler.join(timeout=10)
    soak_s = time.monotonic() - t_soak

    # stop the agents (each writes its last telemetry_seq), let the reader drain, then count
    problems = fleet.stop_agents()
    assert not problems, problems
    sub.drain()
    lost, dup, expected, still_spooled, dropped = {}, 0, 0, 0, 0
    for a in fleet.agents:
        st = a.status_file()
        assert st.get("state") == "stopped", (a.id, st)
        last = st["telemetry_seq"]
        spooled, dropped_here = spooled_telemetry(a)
        got = sub.seqs.get(a.id, [])
        expected += last
        dup += len(got) - len(set(got))
        still_spooled += len(spooled)
        dropped += dropped_here
        missing = set(range(1, last + 1)) - set(got) - set(spooled)
        if missing:
            lost[a.id] = sorted(missing)
        assert set(got) <= set(range(1, last + 1)), (a.id, last, sorted(set(got))[-3:])

    curve = sampler.curve()
    (tmp_path / "memory-curve.tsv").write_text(curve)
    print(f"\nmemory curve ({tmp_path / 'memory-curve.tsv'}):\n{curve}", flush=True)
    segments = sampler.segments()
    for s in segments:
        print(f"RSS {s['kind']:<14} pid {s['pid']:<8} {s['from_s']:6.1f}-{s['to_s']:6.1f} s ({s['n']} samples): "
              f"first quarter {s['first_mib']:.1f} MiB, last quarter {s['last_mib']:.1f} MiB, "
              f"peak {s['peak_mib']:.1f} MiB", flush=True)
    print(f"SOAK devices={n} soak_s={soak_s:.0f} telemetry_every_s={TELEMETRY_S:g} expected={expected} "
          f"received={sub.received()} duplicates={dup} still_spooled={still_spooled} dropped={dropped} "
          f"lost={sum(len(v) for v in lost.values())} reader_connects={sub.connects} "
          f"broker_back_s={broker_back_s:.1f} hub_restart_gap_s={gap:.1f} hub_back_s={hub_back_s:.1f}", flush=True)

    assert not sub.bad, sub.bad[:5]
    assert sub.resumed == [True, True], f"the reader's session was not resumed after each restart: {sub.resumed}"
    assert dropped == 0, f"{dropped} message(s) dropped by full spools"
    assert not lost, (f"{sum(len(v) for v in lost.values())} telemetry message(s) of {len(lost)} device(s) never "
                      f"reached the reader: {dict(list(lost.items())[:5])}")
    assert expected >= n * 2, f"only {expected} telemetry messages spooled: the soak did not run"
    for kind in ("hub", "mosquitto", "est-worker"):
        assert any(s["kind"] == kind for s in segments), f"no {kind} process ran long enough to be judged: {segments}"
    grown = [s for s in segments if s["last_mib"] - s["first_mib"] > max(GROWTH_MIB, GROWTH_FRACTION * s["first_mib"])]
    assert not grown, f"memory grew after warm-up: {grown}"
    assert not fleet.crashed_logs(), next(iter(fleet.crashed_logs().items()))
