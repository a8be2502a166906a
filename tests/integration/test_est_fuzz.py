"""The atheris fuzz target fuzz/est_fuzz.py, run for a bounded time in a subprocess over the committed seeds.

EST_FUZZ_SECONDS (default 30) bounds the run; EST_FUZZ_SEED fixes libFuzzer's seed (CI: 1; else random).  A crash fails the test with the traceback, the reproducer's
bytes and the command that replays it.  The seeds (fuzz/corpus/est, made by fuzz/make_corpus.py) must each
be accepted by their entry point and cover every entry point; the past crashes (fuzz/corpus/est-crashes, added
by hand from libFuzzer's crash-* files) must each be refused with an EstError, and each fuzz run replays them.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TARGET = ROOT / "fuzz" / "est_fuzz.py"
SEEDS = ROOT / "fuzz" / "corpus" / "est"
CRASHES = ROOT / "fuzz" / "corpus" / "est-crashes"  # every crash found so far (fixed): replayed by each run
SECONDS = int(os.environ.get("EST_FUZZ_SECONDS", "30"))
# CI replays one libFuzzer seed (a failure there reruns the same way); elsewhere 0 = a new random seed each run
SEED = int(os.environ.get("EST_FUZZ_SEED") or (1 if os.environ.get("CI") else 0))
STDERR = "\n--- stderr ---\n"

pytestmark = pytest.mark.integration


def _harness():
    spec = importlib.util.spec_from_file_location("est_fuzz", TARGET)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _need_atheris() -> None:
    if importlib.util.find_spec("atheris") is None:
        if os.environ.get("CI"):
            pytest.fail("atheris is not installed (it is in pyproject.toml's test extra)")
        pytest.skip("atheris is not installed")


def run_target(tmp_path: Path, *args: str, target: Path = TARGET, timeout: float) -> tuple[int, str, list[Path]]:
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir(exist_ok=True)
    proc = subprocess.run(
        [sys.executable, str(target), f"-artifact_prefix={artifacts}/", *args],
        capture_output=True, text=True, errors="replace", timeout=timeout, cwd=ROOT,
    )
    return proc.returncode, proc.stdout + STDERR + proc.stderr, sorted(artifacts.iterdir())


def crash_report(rc: int, output: str, artifacts: list[Path]) -> str:
    """What a failing run shows: libFuzzer's report (the Python traceback) and each reproducer."""
    lines = [f"fuzz target exited {rc}"]
    summary = re.compile(r"(INFO: Seed|==\d+== ERROR|SUMMARY|MS:|artifact_)")
    lines += [line for line in output.splitlines() if summary.match(line)]
    start = output.find("=== Uncaught Python exception")  # atheris prints the traceback on stdout
    lines.append(output[start : output.find(STDERR, start)][:6000] if start >= 0 else output[-3000:])
    harness = _harness()
    for path in artifacts:
        data = path.read_bytes()
        entry = harness.ENTRY_POINTS[data[0] % len(harness.ENTRY_POINTS)][0] if data else "-"
        lines += ["", f"reproducer {path} (entry point {entry}, {len(data)} bytes): {data[:2048]!r}",
                  f"replay: .venv/bin/python fuzz/est_fuzz.py {path}"]
    return "\n".join(lines)


def test_every_seed_is_accepted_and_every_entry_point_has_one():
    harness = _harness()
    seen = set()
    for path in sorted(SEEDS.iterdir()):
        data = path.read_bytes()
        name, target = harness.ENTRY_POINTS[data[0]]
        try:
            target(data[1:])
        except harness.Rejected as exc:
            pytest.fail(f"seed {path.name} is refused by {name}: {exc} (rerun fuzz/make_corpus.py?)")
        seen.add(name)
    assert seen == {name for name, _ in harness.ENTRY_POINTS}


@pytest.mark.parametrize("name", sorted(p.name for p in CRASHES.iterdir()))
def test_past_crash_is_refused_cleanly(name):
    harness = _harness()
    data = (CRASHES / name).read_bytes()
    entry, target = harness.ENTRY_POINTS[data[0] % len(harness.ENTRY_POINTS)]
    with pytest.raises(harness.Rejected):
        target(data[1:])


def test_fuzz_target_finds_no_crash(tmp_path):
    _need_atheris()
    corpus = tmp_path / "corpus"  # libFuzzer adds new inputs to the first directory: never the seeds
    corpus.mkdir()
    rc, output, artifacts = run_target(
        tmp_path, f"-max_total_time={SECONDS}", f"-seed={SEED}", "-timeout=20", "-rss_limit_mb=2048", "-max_len=8192",
        "-print_final_stats=1", str(corpus), str(SEEDS), str(CRASHES), timeout=SECONDS + 180,
    )
    assert rc == 0 and not artifacts, crash_report(rc, output, artifacts)
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", output)
    assert runs and int(runs.group(1)) > 100, output[-3000:]


def test_a_crash_fails_with_its_reproducer(tmp_path):
    """The harness itself: an exception that is not EstError is a crash, and the report shows how to replay it."""
    _need_atheris()
    planted = tmp_path / "planted.py"
    planted.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(TARGET.parent)!r})\n"
        "import est_fuzz\n"
        "real = est_fuzz.auth.parse_basic_auth\n"
        "def planted(header):\n"
        "    if header in (b'PLANTED', 'PLANTED'):\n"
        "        raise KeyError('planted crash')\n"
        "    return real(header)\n"
        "est_fuzz.auth.parse_basic_auth = planted\n"
        "est_fuzz.main()\n"
    )
    harness = _harness()
    crash = tmp_path / "input"
    crash.write_bytes(bytes([harness.SELECTOR["basic"]]) + b"PLANTED")
    rc, output, _ = run_target(tmp_path, str(crash), target=planted, timeout=120)
    assert rc != 0, output[-3000:]
    report = crash_report(rc, output, [crash])
    assert "KeyError: 'planted crash'" in report and "entry point basic" in report and "replay:" in report
    rc, output, _ = run_target(tmp_path, str(SEEDS / "basic-ascii"), target=planted, timeout=120)
    assert rc == 0, output[-3000:]
