"""Shared bench plumbing: run `tessera-hub` commands, free ports, a fleet with lenient limits and N tokens, a running
`tessera-hub serve`, EST enrollment of devices, process CPU time."""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
#: a benchmark talks from one source address: the per-source limits would throttle it
LENIENT = (("rate_per_source", "1000000.0"), ("rate_burst", "1000000"), ("failures_per_minute", "1000000"))


def hub_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "tessera-hub"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("tessera-hub")
    return [found] if found else [sys.executable, "-m", "hub.cli.main"]


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("TESSERA_HUB_DIR", "COLUMNS", "LINES")}
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), e.get("PYTHONPATH", "")) if p)
    return e


def hub(args: list[str], hub_dir: Path) -> str:
    proc = subprocess.run([*hub_cmd(), *args, "--dir", str(hub_dir)], env=env(), capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"tessera-hub {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def make_fleet(tmp: Path, n: int, fleet: str, prefix: str,
               settings: tuple[tuple[str, str], ...] = ()) -> tuple[Path, list[tuple[str, str]]]:
    """`init` a fleet in tmp/hub with lenient rate limits (and `settings`: more fleet.toml `key = value` lines to
    change) and register n devices; returns (dir, [(id, token)])."""
    hub_dir = tmp / "hub"
    hub(["init", "--fleet", fleet], hub_dir)
    toml = hub_dir / "fleet.toml"
    text = toml.read_text()
    for key, value in (*LENIENT, *settings):
        text, count = re.subn(rf"^{key}\s*=.*$", f"{key} = {value}", text, flags=re.M)
        if count != 1:
            raise RuntimeError(f"fleet.toml has no single {key} line to raise")
    toml.write_text(text)
    tokens_csv = tmp / "tokens.csv"
    hub(["token", "create", "--count", str(n), "--prefix", prefix, "--out", str(tokens_csv)], hub_dir)
    with open(tokens_csv, newline="") as fh:
        rows = [(r["device_id"], r["token"]) for r in csv.DictReader(fh)]
    if len(rows) != n:
        raise RuntimeError(f"{tokens_csv} holds {len(rows)} tokens, expected {n}")
    return hub_dir, rows


def cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pdeathsig() -> None:  # children of the bench go away with it
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def _tgkill(pid: int, sig: int) -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).tgkill(pid, pid, sig)


def broker_pids(conf: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", str(conf)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]
class HubProcess:
    """`tessera-hub serve` on free ports; stop() sends SIGTERM and expects exit 0 (idempotent)."""

    def __init__(self, hub_dir: Path):
        self.dir = hub_dir
        self.est_port, self.mqtt_port = free_port(), free_port()
        while self.mqtt_port == self.est_port:
            self.mqtt_port = free_port()
        self.crl_port = free_port()  # the plain-HTTP CRL listener: never the default 8080 another hub may hold
        while self.crl_port in (self.est_port, self.mqtt_port):
            self.crl_port = free_port()
        self.out_path, self.err_path = hub_dir.parent / "serve.out", hub_dir.parent / "serve.err"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> None:
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [*hub_cmd(), "serve", "--dir", str(self.dir), "--host", HOST, "--est-port", str(self.est_port),
                 "--mqtt-port", str(self.mqtt_port), "--crl-port", str(self.crl_port)], stdout=out, stderr=err,
                stdin=subprocess.DEVNULL, env=env(),
                start_new_session=True, preexec_fn=pdeathsig)
        deadline = time.monotonic() + timeout
        while "hub ready" not in self.out_path.read_text(errors="replace"):
            if self.proc.poll() is not None:
                raise RuntimeError(f"tessera-hub serve exited {self.proc.returncode}: "
                                   f"{self.err_path.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("tessera-hub serve did not get ready")
            time.sleep(0.05)

    @property
    def broker_pid(self) -> int:
        pids = broker_pids(self.dir / "broker" / "mosquitto.conf")
        if len(pids) != 1:
            raise RuntimeError(f"expected one hub broker, found {pids}")
        return pids[0]

    def stop(self) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(3)
            except subprocess.TimeoutExpired:  # SIGTERM taken by a non-main thread: hand it to the main one
                with contextlib.suppress(ProcessLookupError):
                    _tgkill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(7)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        return proc.returncode

    def shutdown(self) -> list[str]:
        """stop(), then SIGKILL (by pid) any broker of this hub that outlived it; returns what went wrong."""
        rc, notes = self.stop(), []
        conf = self.dir / "broker" / "mosquitto.conf"
        deadline = time.monotonic() + 3
        while broker_pids(conf) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = broker_pids(conf)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if rc != 0:
            notes.append(f"tessera-hub serve exited {rc} on SIGTERM")
        if left:
            notes.append(f"mosquitto {left} outlived the hub (killed)")
        return notes


@dataclass
class Dev:
    id: str  # the principal: device id, or svc.<name> for a service identity (also the client id)
    chain: str
    key: str


def enroll(hub: HubProcess, rows: list[tuple[str, str]], work: Path) -> list[Dev]:
    """EST simpleenroll for each (device, token) with a new P-256 file key; chain PEM + 0600 key files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from agent.estclient import EstClient

    client = EstClient(f"https://{HOST}:{hub.est_port}", cafile=str(hub.dir / "ca" / "root.pem"))
    devs = []
    for device_id, token in rows:
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
               .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
        certs = client.simpleenroll(csr, device_id, token)
        chain = work / f"{device_id}.pem"
        chain.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
        key_path = work / f"{device_id}.key"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
        devs.append(Dev(device_id, str(chain), str(key_path)))
    return devs
