"""Shared bench plumbing: run `tessera-hub` commands, free ports, a fleet with lenient limits and N tokens."""

from __future__ import annotations

import csv
import os
import re
import shutil
import socket
import subprocess
import sys
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
    return [found] if found else [sys.executable, "-m", "hub.cli"]


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


def make_fleet(tmp: Path, n: int, fleet: str, prefix: str) -> tuple[Path, list[tuple[str, str]]]:
    """`init` a fleet in tmp/hub with lenient rate limits and register n devices; returns (dir, [(id, token)])."""
    hub_dir = tmp / "hub"
    hub(["init", "--fleet", fleet], hub_dir)
    toml = hub_dir / "fleet.toml"
    text = toml.read_text()
    for key, value in LENIENT:
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
