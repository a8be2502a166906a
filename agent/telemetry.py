"""Telemetry readings: built-in /proc and /sys readings, or one JSON object from an external executable."""

from __future__ import annotations

import json
import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

MAX_OUTPUT = 64 * 1024
_STDERR_KEPT = 2048


class TelemetryError(Exception):
    """A telemetry source failed; the message says which program and why."""


# -- built-in readings ----------------------------------------------------------------------------------------

def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None


def _zone_number(path: Path) -> int:
    m = re.search(r"(\d+)$", path.name)
    return int(m.group(1)) if m else 0


def _cpu_temp_c(sys_root: Path) -> float | None:
    """First thermal zone (in numeric order) whose temp reads as millidegrees Celsius."""
    for zone in sorted((sys_root / "class" / "thermal").glob("thermal_zone*"), key=_zone_number):
        text = _read(zone / "temp")
        if text is None:
            continue
        try:
            return int(text.strip()) / 1000.0
        except ValueError:
            continue
    return None


def _loadavg(proc_root: Path) -> tuple[float, float, float] | None:
    text = _read(proc_root / "loadavg")
    if text is not None:
        try:
            one, five, fifteen = (float(x) for x in text.split()[:3])
            return one, five, fifteen
        except ValueError:
            return None
    if proc_root == Path("/proc") and hasattr(os, "getloadavg"):
        try:
            return os.getloadavg()
        except OSError:
            return None
    return None


def _meminfo(proc_root: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (_read(proc_root / "meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            out[key.strip()] = int(fields[0])
    return out


def _uptime_s(proc_root: Path) -> float | None:
    text = _read(proc_root / "uptime")
    try:
        return float(text.split()[0]) if text else None
    except (ValueError, IndexError):
        return None


def builtin_readings(proc_root: str | os.PathLike[str] = "/proc",
                     sys_root: str | os.PathLike[str] = "/sys") -> dict[str, float | int | None]:
    """cpu_temp_c, load_1/5/15, mem_total_kb, mem_available_kb, uptime_s; each None when unavailable.

    Never raises: a missing or unreadable file only blanks its readings.
    """
    proc, sysfs = Path(proc_root), Path(sys_root)
    load = _loadavg(proc)
    mem = _meminfo(proc)
    return {
        "cpu_temp_c": _cpu_temp_c(sysfs),
        "load_1": load[0] if load else None,
        "load_5": load[1] if load else None,
        "load_15": load[2] if load else None,
        "mem_total_kb": mem.get("MemTotal"),
        "mem_available_kb": mem.get("MemAvailable"),
        "uptime_s": _uptime_s(proc),
    }


# -- external executable ----------------------------------------------------------------------------------------

def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class ExecSource:
    """Runs `argv` (no shell, stdin /dev/null, own process group) and returns the one JSON object it prints.

    Raises TelemetryError when the program cannot start, runs longer than `timeout` seconds (its whole
    process group is killed), exits non-zero or by a signal, prints more than `max_output` bytes, or prints
    anything but a single JSON object.
    """

    def __init__(self, argv: list[str], timeout: float = 5.0, max_output: int = MAX_OUTPUT) -> None:
        if not argv or not all(isinstance(a, str) for a in argv):
            raise TelemetryError("telemetry command must be a non-empty list of strings")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.argv, self.timeout, self.max_output = list(argv), timeout, max_output
        self.name = os.path.basename(argv[0]) or argv[0]

    def __repr__(self) -> str:
        return f"ExecSource({self.argv!r}, timeout={self.timeout})"

    def _run(self) -> tuple[int, bytes, bytes]:
        try:
            proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, close_fds=True, start_new_session=True)
        except OSError as exc:
            raise TelemetryError(f"cannot run telemetry program {self.argv[0]}: {exc.strerror or exc}") from exc
        assert proc.stdout is not None and proc.stderr is not None
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + self.timeout
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ, out)
                sel.register(proc.stderr, selectors.EVENT_READ, err)
                while sel.get_map():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TelemetryError(f"telemetry program {self.name} timed out after {self.timeout:g}s")
                    for key, _ in sel.select(remaining):
                        chunk = os.read(key.fd, 65536)
                        if not chunk:
                            sel.unregister(key.fileobj)
                        elif key.data is out:
                            out += chunk
                            if len(out) > self.max_output:
                                raise TelemetryError(f"telemetry program {self.name} printed more than "
                                                     f"{self.max_output} bytes")
                        else:
                            err += chunk[:max(0, _STDERR_KEPT - len(err))]
            try:
                rc = proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise TelemetryError(f"telemetry program {self.name} timed out after {self.timeout:g}s") from None
        finally:
            if proc.returncode is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        return rc, bytes(out), bytes(err)

    def __call__(self) -> dict[str, Any]:
        rc, out, err = self._run()
        if rc != 0:
            detail = err.decode("utf-8", "replace").strip().splitlines()
            why = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
            raise TelemetryError(f"telemetry program {self.name} {why}" + (f": {detail[-1]}" if detail else ""))
        try:
            value = json.loads(out.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as exc:
            shown = out[:80].decode("utf-8", "replace")
            raise TelemetryError(f"telemetry program {self.name} did not print one JSON object "
                                 f"({exc}); output began {shown!r}") from None
        if not isinstance(value, dict):
            raise TelemetryError(f"telemetry program {self.name} printed a JSON {type(value).__name__}, "
                                 "expected an object")
        return value


def make_source(spec: str, timeout: float = 5.0) -> Callable[[], dict[str, Any]]:
    """"builtin" -> builtin_readings; otherwise an executable path (or a name on PATH) with optional
    arguments, split like a shell would (shlex) but run without one. Raises TelemetryError if not executable."""
    if spec.strip() == "builtin":
        return builtin_readings
    try:
        argv = shlex.split(spec)
    except ValueError as exc:
        raise TelemetryError(f"cannot parse telemetry command {spec!r}: {exc}") from None
    if not argv:
        raise TelemetryError("telemetry source is empty: use 'builtin' or the path of an executable")
    prog = argv[0]
    if os.sep in prog:
        if not (os.path.isfile(prog) and os.access(prog, os.X_OK)):
            raise TelemetryError(f"telemetry program {prog} is not an executable file")
    else:
        found = shutil.which(prog)
        if found is None:
            raise TelemetryError(f"telemetry program {prog!r} not found on PATH")
        argv[0] = found
    return ExecSource(argv, timeout=timeout)


# -- envelope --------------------------------------------------------------------------------------------------

def envelope(device_id: str, readings: Mapping[str, Any], now: datetime, seq: int) -> bytes:
    """The telemetry message: compact UTF-8 JSON {"device", "ts" (ISO 8601 UTC, ms), "seq", "readings"}.

    Raises ValueError for a naive `now` or a negative seq, TelemetryError if readings are not JSON
    (NaN and infinities included).
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise ValueError(f"seq must be a non-negative integer, not {seq!r}")
    ts = now.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    try:
        body = json.dumps({"device": device_id, "ts": ts, "seq": seq, "readings": dict(readings)},
                          separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TelemetryError(f"readings are not JSON-serialisable: {exc}") from None
    return body.encode("utf-8")
