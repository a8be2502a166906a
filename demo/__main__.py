"""`./dev.sh demo`: a local fleet — a hub with its broker, N devices each with its own SoftHSM token and agent.

It creates a fleet in a temporary directory, starts `tessera-hub serve`, provisions and enrolls every device,
shows them streaming telemetry in a live table, revokes one device live, shows it cut off and refused while the
others carry on, prints the measured revocation latency, and stops everything (also on Ctrl-C). Its last line is
`DEMO PASS: ...` or `DEMO FAIL: <why>` (exit 0 or 1); `--rounds N` repeats the revocation on fresh devices.

Every check waits for an event, never for a guess: the hub's API and CRL listeners get ports of their own (with
the defaults taken by another hub, serve ran without its API and the revoke fell back to the registry alone, cut
nobody for seconds, and the victim's messages meanwhile failed the demo), and the victim's silence is counted
from a barrier (a witness's ping answer reaching the hub after the cut), not from a count taken before the revoke.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

console = Console()
BIN = Path(sys.executable).parent


def say(text: str) -> None:
    """One sentence on one line: never hard-wrapped at the console width (the terminal wraps it if it must)."""
    console.print(text, soft_wrap=True, highlight=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Demo:
    def __init__(self, workdir: Path, devices: int):
        self.dir, self.n = workdir, devices
        self.hub_dir = workdir / "hub"
        self.procs: list[subprocess.Popen] = []
        self.agents: dict[str, subprocess.Popen] = {}
        # every listener on a port of its own: with the defaults (API 8444, CRL 8080) taken by another hub, serve
        # runs without its API and `device revoke` falls back to the registry alone (slow, and no session cut)
        self.est_port, self.mqtt_port, self.api_port, self.crl_port = (free_port() for _ in range(4))
        self.ids = [f"demo-{i:02d}" for i in range(1, devices + 1)]

    # --- helpers --------------------------------------------------------------------------------------------------
    def hub(self, *args: str, check: bool = True) -> str:
        res = subprocess.run([str(BIN / "tessera-hub"), *args, "--dir", str(self.hub_dir)], capture_output=True,
                             text=True, timeout=60)
        if check and res.returncode != 0:
            raise RuntimeError(f"tessera-hub {args[0]} failed: {res.stderr.strip()}")
        return res.stdout

    def spawn(self, argv: list[str], log: Path) -> subprocess.Popen:
        fh = open(log, "ab")
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        fh.close()
        self.procs.append(proc)
        return proc

    def admin(self, req: dict):
        from hub.serve import admin

        return admin.call(self.hub_dir / "admin.sock", req, timeout=10)

    # --- steps ----------------------------------------------------------------------------------------------------
    def start_hub(self) -> None:
        self.hub("init", "--fleet", "demo-fleet")
        say(f"fleet [bold]demo-fleet[/] created in {self.hub_dir}")
        log = self.dir / "hub.log"
        self.spawn([str(BIN / "tessera-hub"), "serve", "--dir", str(self.hub_dir), "--est-port", str(self.est_port),
                    "--mqtt-port", str(self.mqtt_port), "--api-port", str(self.api_port),
                    "--crl-port", str(self.crl_port)], log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if "hub ready" in text:
                if "API   not started" in text:
                    raise RuntimeError("the hub started without its fleet API: "
                                       + next(ln for ln in text.splitlines() if "API   not started" in ln).strip())
                say(f"hub running: EST https://127.0.0.1:{self.est_port}, MQTT mqtts://127.0.0.1:{self.mqtt_port}, "
                    f"API https://127.0.0.1:{self.api_port}")
                return
            if self.procs[0].poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"the hub did not start: {log.read_text(errors='replace')[-500:]}")

    def provision(self, device_id: str) -> None:
        from hsm.softhsm import create_token

        ddir = self.dir / device_id
        ddir.mkdir(mode=0o700)
        token = create_token(ddir / "token", label=device_id)
        token_file = ddir / "enroll-token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.hub("device", "add", device_id, "--group", "demo"))
        (ddir / "agent.toml").write_text(
            f'device_id = "{device_id}"\nhub_url = "https://localhost:{self.est_port}"\n'
            f'mqtt_port = {self.mqtt_port}\nca_file = "{ddir / "state" / "fleet-root.pem"}"\n'
            f'state_dir = "{ddir / "state"}"\n\n[token]\nlabel = "{device_id}"\n'
            f'pin_source = "file:{token.pin_file}"\nsofthsm_conf = "{token.conf}"\n\n'
            f'[telemetry]\ninterval = 1.0\n')
        res = subprocess.run([str(BIN / "tessera-agent"), "enroll", "-c", str(ddir / "agent.toml"), "--token-file",
                              str(token_file), "--ca-file", str(self.hub_dir / "ca" / "root.pem")],
                             capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"{device_id} did not enroll: {res.stderr.strip()}")
        self.agents[device_id] = self.spawn([str(BIN / "tessera-agent"), "run", "-c", str(ddir / "agent.toml")],
                                            ddir / "agent.log")

    def table(self, note: str = "") -> Table:
        from hub.registry.store import Registry

        reg = Registry(self.hub_dir / "registry.sqlite3")
        try:
            devices = {d["id"]: d for d in reg.list_devices()}
        finally:
            reg.close()
        try:
            traffic = self.admin({"op": "traffic"})
        except Exception:
            traffic = {}
        t = Table(title=note or None)
        for col in ("device", "status", "online", "last seen", "messages", "cert expires", "agent"):
            t.add_column(col)
        for did in self.ids:
            d = devices.get(did, {})
            st = self.agent_state(did)
            color = {"active": "green", "revoked": "red", "suspended": "yellow"}.get(d.get("status"), "")
            t.add_row(did, f"[{color}]{d.get('status', '-')}[/]", "yes" if d.get("online") else "no",
                      (traffic.get(did, {}).get("last") or d.get("last_seen") or "-")[11:19],
                      str(traffic.get(did, {}).get("messages", 0)),
                      (d.get("cert_not_after") or "-")[:10], st)
        return t

    def agent_state(self, device_id: str) -> str:
        try:
            return json.loads((self.dir / device_id / "state" / "status.json").read_text()).get("state", "?")
        except (OSError, ValueError):
            return "-"

    def messages(self) -> dict[str, int]:
        try:
            return {k: v["messages"] for k, v in self.admin({"op": "traffic"}).items()}
        except Exception:
            return {}

    def wait_online(self, live: Live, ids: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live.update(self.table("devices enrolling and connecting"))
            counts = self.messages()
            if all(self.agent_state(d) == "online" and counts.get(d, 0) > 0 for d in ids):
                return
            time.sleep(0.25)
        raise RuntimeError(f"not every device came online and published within {timeout:.0f} s: "
                           + ", ".join(f"{d} {self.agent_state(d)}" for d in ids))

    def stream(self, live: Live, seconds: float, note: str) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            live.update(self.table(note))
            time.sleep(0.25)

    def stop(self) -> None:
        for proc in reversed(self.procs):  # agents first, hub (and with it Mosquitto) last
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


class Round:
    """One revocation: the victim is cut off, stays silent and is refused while the others stream on."""

    def __init__(self, demo: Demo, live: Live, victim: str, witnesses: list[str], seconds: float):
        self.demo, self.live, self.victim, self.witnesses, self.seconds = demo, live, victim, witnesses, seconds
        self.failures: list[str] = []
        self.out, self.cli_ms, self.cut_ms, self.state, self.silent, self.others_ok = "", 0.0, 0.0, "-", False, False

    def note(self, text: str) -> None:
        self.live.update(self.demo.table(text))

    def run(self) -> None:
        demo, victim = self.demo, self.victim
        before = demo.messages()
        t0 = time.monotonic()
        self.out = demo.hub("device", "revoke", victim, "--reason", "keyCompromise").strip()
        self.cli_ms = (time.monotonic() - t0) * 1000
        if "enforced by the running hub" not in self.out:
            self.failures.append(f"the revoke did not go through the running hub: {self.out}")
        while demo.agent_state(victim) == "online" and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        self.cut_ms = (time.monotonic() - t0) * 1000
        # A barrier instead of a guess: messages the victim published before the cut may still be on their way to
        # the hub. The broker delivers to the hub's subscription in order, so once a witness's answer to a ping,
        # sent after the cut, has reached the hub, every earlier message has been counted.
        ack = demo.hub("device", "send", self.witnesses[0], "ping", check=False)
        if '"ok": true' not in ack:
            self.failures.append(f"{self.witnesses[0]} did not answer a ping after the revoke")
        silent_from = demo.messages().get(victim, 0)
        # then its reconnect is refused (after a jittered backoff of at most 0.5 s and the hub's answer why)
        while demo.agent_state(victim) != "revoked" and time.monotonic() - t0 < 20:
            self.note(f"{victim} revoked: session cut, waiting for its reconnect to be refused")
            time.sleep(0.1)
        demo.stream(self.live, self.seconds, f"{victim} revoked: cut off and refused; the others carry on")
        after = demo.messages()
        self.state = demo.agent_state(victim)
        self.silent = after.get(victim, 0) == silent_from
        self.others_ok = all(after.get(d, 0) > before.get(d, 0) for d in self.witnesses)
        if self.state != "revoked":
            self.failures.append(f"{victim}'s agent is {self.state}, not revoked, "
                                 f"{time.monotonic() - t0:.0f} s after the revoke (its reconnect was not refused)")
        if not self.silent:
            self.failures.append(f"the hub got {after.get(victim, 0) - silent_from} message(s) from {victim} "
                                 "after its session was cut")
        if not self.others_ok:
            quiet = [d for d in self.witnesses if after.get(d, 0) <= before.get(d, 0)]
            self.failures.append(f"{', '.join(quiet)} stopped streaming after the revoke")

    def result_line(self, online_before: int) -> str:
        return (f"DEMO RESULT devices={len(self.witnesses) + 1} online_before={online_before} revoked={self.victim} "
                f"victim_state={self.state} victim_silent={'yes' if self.silent else 'no'} "
                f"others_streaming={'yes' if self.others_ok else 'no'} cli_ms={self.cli_ms:.0f} cut_ms={self.cut_ms:.0f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m demo", description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=5, help="how many devices (default 5)")
    ap.add_argument("--seconds", type=float, default=6.0, help="how long each streaming phase lasts")
    ap.add_argument("--rounds", type=int, default=1,
                    help="revocations in a row: each round after the first enrolls a new device and revokes it "
                         "(one hub, for repeating the revocation cheaply)")
    ap.add_argument("--keep", type=Path, help="keep the fleet in this directory instead of a temporary one")
    args = ap.parse_args(argv)
    if args.devices < 2:
        ap.error("--devices must be at least 2 (one gets revoked)")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="tessera-demo-"))
    workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    demo = Demo(workdir, args.devices)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    verdict = "DEMO FAIL: interrupted"
    failures: list[str] = []
    try:
        console.rule("[bold]Tessera local fleet demo")
        demo.start_hub()
        for did in demo.ids:
            demo.provision(did)
            say(f"  {did}: key generated in its own SoftHSM token, enrolled over EST, agent started")
        victim = demo.ids[len(demo.ids) // 2]
        revoked: list[str] = []
        rounds: list[Round] = []
        with Live(demo.table(), console=console, refresh_per_second=4, transient=False) as live:
            demo.wait_online(live, demo.ids, timeout=60)
            online_before = sum(1 for d in demo.ids if demo.messages().get(d))
            demo.stream(live, args.seconds, "all devices streaming telemetry over mTLS")
            for r in range(args.rounds):
                if r:  # a fresh device to revoke: enrolled, online and publishing first
                    victim = f"demo-{len(demo.ids) + 1:02d}"
                    demo.ids.append(victim)
                    demo.provision(victim)
                    demo.wait_online(live, [victim], timeout=60)
                witnesses = [d for d in demo.ids if d != victim and d not in revoked]
                rnd = Round(demo, live, victim, witnesses, args.seconds)
                rnd.run()
                revoked.append(victim)
                rounds.append(rnd)
                failures += [f"round {r + 1}: {f}" if args.rounds > 1 else f for f in rnd.failures]
        if not console.is_terminal:
            console.line()  # Live leaves the cursor after the table's last line when writing to a file or pipe
        for rnd in rounds:
            say(escape(rnd.out))
            say(f"revocation latency: CLI round trip {rnd.cli_ms:.0f} ms, {rnd.victim} saw its session cut after "
                f"{rnd.cut_ms:.0f} ms; {rnd.victim} now [bold]{rnd.state}[/]")
            say(rnd.result_line(online_before))
        if failures:
            verdict = "DEMO FAIL: " + "; ".join(failures)
        else:
            verdict = (f"DEMO PASS: {len(rounds)} revocation(s); each device was cut off, stayed silent and was "
                       "refused while the others kept streaming")
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        verdict = f"DEMO FAIL: {' '.join(str(exc).split()) or type(exc).__name__}"
    finally:
        demo.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        say("everything stopped")
    say(("[green]" if verdict.startswith("DEMO PASS") else "[red]") + escape(verdict) + "[/]")
    return 0 if verdict.startswith("DEMO PASS") else 1


if __name__ == "__main__":
    raise SystemExit(main())
