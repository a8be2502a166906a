"""Tests for agent.telemetry: built-in readings from fake /proc and /sys trees, external programs, the envelope."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent.telemetry import MAX_OUTPUT, ExecSource, TelemetryError, builtin_readings, envelope, make_source

MEMINFO = """MemTotal:        8046812 kB
MemFree:          613000 kB
MemAvailable:    5120344 kB
Buffers:          210000 kB
HugePages_Total:       0
"""


def tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


@pytest.fixture
def fake_proc(tmp_path: Path) -> Path:
    return tree(tmp_path / "proc", {"loadavg": "0.52 0.31 0.18 2/345 12345\n", "meminfo": MEMINFO,
                                    "uptime": "12345.67 40000.12\n"})


@pytest.fixture
def fake_sys(tmp_path: Path) -> Path:
    return tree(tmp_path / "sys", {"class/thermal/thermal_zone0/temp": "48312\n",
                                   "class/thermal/thermal_zone1/temp": "60000\n"})


def test_builtin_readings_from_fake_trees(fake_proc: Path, fake_sys: Path) -> None:
    assert builtin_readings(fake_proc, fake_sys) == {
        "cpu_temp_c": 48.312, "load_1": 0.52, "load_5": 0.31, "load_15": 0.18,
        "mem_total_kb": 8046812, "mem_available_kb": 5120344, "uptime_s": 12345.67,
    }


def test_builtin_readings_all_absent(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    got = builtin_readings(tmp_path / "p", tmp_path / "s")
    assert got == dict.fromkeys(["cpu_temp_c", "load_1", "load_5", "load_15", "mem_total_kb", "mem_available_kb",
                                 "uptime_s"])


def test_thermal_zone_first_readable_in_numeric_order(tmp_path: Path) -> None:
    sysfs = tree(tmp_path / "sys", {
        "class/thermal/thermal_zone10/temp": "10000\n",
        "class/thermal/thermal_zone2/temp": "garbage\n",  # unparsable: skipped
        "class/thermal/thermal_zone3/temp": "-5500\n",
        "class/thermal/thermal_zone1/type": "no temp file here\n",
    })
    (sysfs / "class/thermal/thermal_zone0").mkdir()  # no temp at all
    assert builtin_readings(tmp_path / "none", sysfs)["cpu_temp_c"] == -5.5


def test_partial_and_malformed_proc(tmp_path: Path) -> None:
    proc = tree(tmp_path / "proc", {"loadavg": "not numbers\n", "meminfo": "MemTotal: 1024 kB\nweird line\n",
                                    "uptime": ""})
    got = builtin_readings(proc, tmp_path / "sys")
    assert got["load_1"] is got["load_5"] is got["load_15"] is None
    assert got["mem_total_kb"] == 1024 and got["mem_available_kb"] is None  # pre-3.14 kernels lack MemAvailable
    assert got["uptime_s"] is None


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="needs Linux /proc")
def test_builtin_readings_on_this_host() -> None:
    got = builtin_readings()
    assert got["mem_total_kb"] and got["mem_total_kb"] > 0
    assert got["uptime_s"] and got["uptime_s"] > 0
    assert got["load_1"] is not None and got["load_1"] >= 0


# -- external programs -----------------------------------------------------------------------------------------

def script(tmp_path: Path, name: str, body: str) -> Path:
    p = tmp_path / name
    p.write_text(f"#!{sys.executable}\n{body}")
    p.chmod(0o755)
    return p


def test_exec_source_reads_json_object(tmp_path: Path) -> None:
    p = script(tmp_path, "ok", 'import json, sys\nprint(json.dumps({"rpm": 1200, "arg": sys.argv[1:]}))\n')
    assert ExecSource([str(p), "a b", "c"])() == {"rpm": 1200, "arg": ["a b", "c"]}


def test_exec_source_stdin_is_empty_and_stderr_ignored(tmp_path: Path) -> None:
    p = script(tmp_path, "stdin", 'import sys\nsys.stderr.write("noise\\n" * 50000)\n'
                                  'print(\'{"stdin": %d}\' % len(sys.stdin.read()))\n')
    assert ExecSource([str(p)])() == {"stdin": 0}


@pytest.mark.parametrize("body, message", [
    ('import sys\nsys.stderr.write("sensor bus error\\n")\nsys.exit(3)\n', "exited with status 3: sensor bus error"),
    ('import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n', "killed by signal 15"),
    ('print("temperature=40")\n', "did not print one JSON object"),
    ('print("[1, 2]")\n', "printed a JSON list, expected an object"),
    ('print("42")\n', "printed a JSON int, expected an object"),
    ('print(\'{"a": 1}\\n{"b": 2}\')\n', "did not print one JSON object"),
    ('print(\'{"t": NaN}\')\n', "NaN is not valid JSON"),
    ('import sys\nsys.stdout.buffer.write(b"\\xff\\xfe")\n', "did not print one JSON object"),
    ('print("")\n', "did not print one JSON object"),
    (f'import sys\nsys.stdout.write("x" * {MAX_OUTPUT + 1})\n', f"printed more than {MAX_OUTPUT} bytes"),
    ('import sys\nsys.stdout.write("[" * 10**7)\n', f"printed more than {MAX_OUTPUT} bytes"),
])
def test_exec_source_failures(tmp_path: Path, body: str, message: str) -> None:
    p = script(tmp_path, "bad", body)
    with pytest.raises(TelemetryError, match="telemetry program bad") as exc:
        ExecSource([str(p)])()
    assert message in str(exc.value)


def test_exec_source_output_exactly_at_limit_is_fine(tmp_path: Path) -> None:
    p = script(tmp_path, "big", f'import sys\nsys.stdout.write(\'{{"s": "\' + "x" * ({MAX_OUTPUT} - 9) + \'"}}\')\n')
    assert len(ExecSource([str(p)])()["s"]) == MAX_OUTPUT - 9


def test_exec_source_timeout_kills_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    p = script(tmp_path, "slow", f'import subprocess, sys, time\n'
                                 f'g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])\n'
                                 f'open({str(pidfile)!r}, "w").write(str(g.pid))\n'
                                 f'time.sleep(60)\n')
    t0 = time.monotonic()
    with pytest.raises(TelemetryError, match="slow timed out after 1s"):
        ExecSource([str(p)], timeout=1.0)()
    assert time.monotonic() - t0 < 10
    gpid = int(pidfile.read_text())
    for _ in range(100):  # the grandchild (holding our pipe) was killed with the group
        try:
            os.kill(gpid, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{gpid}/stat").exists() and Path(f"/proc/{gpid}/stat").read_text().split()[2] == "Z":
            break  # killed, waiting for its reaper
        time.sleep(0.05)
    else:
        pytest.fail("grandchild still running after timeout")


def test_exec_source_exits_but_keeps_pipe_open_times_out(tmp_path: Path) -> None:
    p = script(tmp_path, "daemon", 'import os, sys, time\nprint("{}", flush=True)\n'
                                   'if os.fork() == 0:\n    time.sleep(60)\n')
    with pytest.raises(TelemetryError, match="timed out"):
        ExecSource([str(p)], timeout=1.0)()


def test_exec_source_cannot_start(tmp_path: Path) -> None:
    with pytest.raises(TelemetryError, match="cannot run telemetry program"):
        ExecSource([str(tmp_path / "missing")])()
    noexec = tmp_path / "noexec"
    noexec.write_text("#!/bin/sh\necho {}\n")
    with pytest.raises(TelemetryError, match="cannot run telemetry program"):
        ExecSource([str(noexec)])()
    with pytest.raises(TelemetryError):
        ExecSource([])


def test_no_shell_interpretation(tmp_path: Path) -> None:
    p = script(tmp_path, "args", 'import json, sys\nprint(json.dumps({"argv": sys.argv[1:]}))\n')
    assert ExecSource([str(p), "$HOME", "; rm -rf /", "`id`"])() == {"argv": ["$HOME", "; rm -rf /", "`id`"]}


# -- make_source -------------------------------------------------------------------------------------------------

def test_make_source_builtin() -> None:
    assert make_source("builtin") is builtin_readings


def test_make_source_executable_with_args(tmp_path: Path) -> None:
    d = tmp_path / "dir with space"
    d.mkdir()
    p = script(d, "probe", 'import json, sys\nprint(json.dumps({"argv": sys.argv[1:]}))\n')
    src = make_source(f"'{p}' --bus 1 'two words'")
    assert isinstance(src, ExecSource)
    assert src() == {"argv": ["--bus", "1", "two words"]}


def test_make_source_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = script(tmp_path, "tessera-probe", 'print("{\\"x\\": 1}")\n')
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    src = make_source("tessera-probe")
    assert isinstance(src, ExecSource) and src.argv == [str(p)]
    assert src() == {"x": 1}


@pytest.mark.parametrize("spec, message", [
    ("", "empty"),
    ("   ", "empty"),
    ("'unterminated", "cannot parse"),
    ("/nonexistent/probe", "not an executable file"),
    ("no-such-probe-anywhere-xyz", "not found on PATH"),
])
def test_make_source_errors(spec: str, message: str) -> None:
    with pytest.raises(TelemetryError, match=message):
        make_source(spec)


def test_make_source_not_executable(tmp_path: Path) -> None:
    f = tmp_path / "data.json"
    f.write_text("{}")
    with pytest.raises(TelemetryError, match="not an executable file"):
        make_source(str(f))
    with pytest.raises(TelemetryError, match="not an executable file"):
        make_source(str(tmp_path))


# -- envelope ----------------------------------------------------------------------------------------------------

def test_envelope() -> None:
    now = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=2)))
    raw = envelope("dev-001", {"cpu_temp_c": 48.3, "load_1": None, "name": "pompe é"}, now, 7)
    assert json.loads(raw) == {"device": "dev-001", "ts": "2030-01-02T01:04:05.678Z", "seq": 7,
                               "readings": {"cpu_temp_c": 48.3, "load_1": None, "name": "pompe é"}}
    assert list(json.loads(raw)) == ["device", "ts", "seq", "readings"]
    assert b" " not in raw.replace("pompe é".encode(), b"")  # compact


def test_envelope_errors() -> None:
    now = datetime(2030, 1, 1, tzinfo=timezone.utc)
    with pytest.raises(ValueError, match="timezone-aware"):
        envelope("d", {}, datetime(2030, 1, 1), 0)
    for seq in (-1, True, 1.0):
        with pytest.raises(ValueError, match="seq"):
            envelope("d", {}, now, seq)  # type: ignore[arg-type]
    with pytest.raises(TelemetryError, match="not JSON-serialisable"):
        envelope("d", {"t": float("nan")}, now, 0)
    with pytest.raises(TelemetryError, match="not JSON-serialisable"):
        envelope("d", {"t": object()}, now, 0)
