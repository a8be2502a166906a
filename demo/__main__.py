"""`./dev.sh demo`: a local fleet — a hub with its broker, N devices each with its own SoftHSM token and agent.

It creates a fleet in a temporary directory, starts `tessera-hub serve`, provisions and enrolls every device,
shows them streaming telemetry in a live table, revokes one device live, shows it cut off and refused while the
others carry on, prints the measured revocation latency, and stops everything (also on Ctrl-C).
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
from rich.table import Table

console = Console()
BIN = Path(sys.executable).parent


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
        self.est_port, self.mqtt_port = free_port(), free_port()
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
        console.print(f"fleet [bold]demo-fleet[/] created in {self.hub_dir}")
        log = self.dir / "hub.log"
        self.spawn([str(BIN / "tessera-hub"), "serve", "--dir", str(self.hub_dir), "--est-port", str(self.est_port),
                    "--mqtt-port", str(self.mqtt_port)], log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if "hub ready" in log.read_text(errors="replace"):
                console.print(f"hub running: EST https://127.0.0.1:{self.est_port}, "
                              f"MQTT mqtts://127.0.0.1:{self.mqtt_port}")
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
                      (d.get("last_seen") or "-")[11:19], str(traffic.get(did, {}).get("messages", 0)),
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

    def wait_all_online(self, live: Live, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live.update(self.table("devices enrolling and connecting"))
            counts = self.messages()
            if all(self.agent_state(d) == "online" and counts.get(d, 0) > 0 for d in self.ids):
                return
            time.sleep(0.25)
        raise RuntimeError("not every device came online and published in time")

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m demo", description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=5, help="how many devices (default 5)")
    ap.add_argument("--seconds", type=float, default=6.0, help="how long each streaming phase lasts")
    ap.add_argument("--keep", type=Path, help="keep the fleet in this directory instead of a temporary one")
    args = ap.parse_args(argv)
    if args.devices < 2:
        ap.error("--devices must be at least 2 (one gets revoked)")
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="tessera-demo-"))
    workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    demo = Demo(workdir, args.devices)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    code = 1
    try:
        console.rule("[bold]Tessera local fleet demo")
        demo.start_hub()
        for did in demo.ids:
            demo.provision(did)
            console.print(f"  {did}: key generated in its own SoftHSM token, enrolled over EST, agent started")
        with Live(demo.table(), console=console, refresh_per_second=4, transient=False) as live:
            demo.wait_all_online(live, timeout=60)
            demo.stream(live, args.seconds, "all devices streaming telemetry over mTLS")
            victim = demo.ids[len(demo.ids) // 2]
            before = demo.messages()
            t0 = time.monotonic()
            out = demo.hub("device", "revoke", victim, "--reason", "keyCompromise")
            cli_ms = (time.monotonic() - t0) * 1000
            while demo.agent_state(victim) not in ("revoked", "offline") and time.monotonic() - t0 < 10:
                time.sleep(0.01)
            cut_ms = (time.monotonic() - t0) * 1000
            # then its reconnect is refused at the TLS handshake (after a jittered backoff of up to a few s)
            while demo.agent_state(victim) != "revoked" and time.monotonic() - t0 < 20:
                live.update(demo.table(f"{victim} revoked: session cut, waiting for its reconnect to be refused"))
                time.sleep(0.1)
            demo.stream(live, args.seconds, f"{victim} revoked: cut off and refused; the others carry on")
            after = demo.messages()
        console.print(out.strip())
        others_ok = all(after.get(d, 0) > before.get(d, 0) for d in demo.ids if d != victim)
        victim_state = demo.agent_state(victim)
        victim_stopped = after.get(victim, 0) <= before.get(victim, 0) + 1
        console.print(f"revocation latency: CLI round trip {cli_ms:.0f} ms, device saw its session cut after "
                      f"{cut_ms:.0f} ms; {victim} now [bold]{victim_state}[/]")
        console.print(f"DEMO RESULT devices={len(demo.ids)} online_before={sum(1 for d in demo.ids if before.get(d))} "
                      f"revoked={victim} victim_state={victim_state} victim_silent={'yes' if victim_stopped else 'no'} "
                      f"others_streaming={'yes' if others_ok else 'no'} cli_ms={cli_ms:.0f} cut_ms={cut_ms:.0f}",
                      highlight=False, soft_wrap=True)
        code = 0 if (others_ok and victim_state == "revoked" and victim_stopped) else 1
    except KeyboardInterrupt:
        console.print("interrupted")
    except Exception as exc:
        console.print(f"[red]demo failed:[/] {exc}")
    finally:
        demo.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        console.print("everything stopped")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
