"""The hash-checked dependency locks: made from pyproject.toml's current lists, and setup refuses a stale one."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "requirements"))
import lockinput  # noqa: E402

PY_MINOR = "%d.%d" % sys.version_info[:2]


@pytest.mark.parametrize("name,group", [(f"py{PY_MINOR}.lock", "main"), (f"tlsscan-py{PY_MINOR}.lock", "tlsscan"),
                                        ("py3.11.lock", "main"), ("py3.13.lock", "main"),
                                        ("tlsscan-py3.11.lock", "tlsscan"), ("tlsscan-py3.13.lock", "tlsscan")])
def test_committed_locks_match_pyproject(name, group):
    lock = ROOT / "requirements" / name
    assert lockinput.check(group, lock) is None, "pyproject.toml changed without ./dev.sh lock"
    text = lock.read_text()
    pins = re.findall(r"^([A-Za-z0-9][\w.-]*)==(\S+)", text, re.M)
    assert len(pins) > 5
    # every pin carries at least one hash (pip --require-hashes would refuse the file otherwise)
    for block in re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 5)[-1]):
        if re.match(r"[A-Za-z0-9][\w.-]*==", block):
            assert "--hash=sha256:" in block, block.splitlines()[0]


def test_digest_follows_every_locked_list(tmp_path):
    base = (ROOT / "pyproject.toml").read_text()
    pp = tmp_path / "pyproject.toml"
    pp.write_text(base)
    main, scan = lockinput.digest("main", pp), lockinput.digest("tlsscan", pp)
    # reordering a list is no change; a new or changed requirement in any locked list is
    assert '"cryptography>=42",\n    "python-pkcs11>=0.7",' in base
    pp.write_text(base.replace('"cryptography>=42",\n    "python-pkcs11>=0.7",',
                               '"python-pkcs11>=0.7",\n    "cryptography>=42",'))
    assert lockinput.digest("main", pp) == main
    for old, new in [('"jinja2>=3.1",', '"jinja2>=3.1", "sslyze>=6",'), ('"pytest>=7",', '"pytest>=8",'),
                     ('requires = ["setuptools>=61"]', 'requires = ["setuptools>=70"]')]:
        assert old in base
        pp.write_text(base.replace(old, new))
        assert lockinput.digest("main", pp) != main, new
        assert lockinput.digest("tlsscan", pp) == scan
    pp.write_text(base.replace('"sslyze>=6.3,<7"', '"sslyze>=6.4,<7"'))
    assert lockinput.digest("tlsscan", pp) != scan


def test_setup_refuses_a_lock_older_than_pyproject(tmp_path):
    """`./dev.sh setup` in a copy whose pyproject gained a dependency: one line, exit 1, no venv made."""
    copy = tmp_path / "clone"
    copy.mkdir()
    shutil.copy2(ROOT / "dev.sh", copy / "dev.sh")
    shutil.copytree(ROOT / "requirements", copy / "requirements", ignore=shutil.ignore_patterns("__pycache__"))
    text = (ROOT / "pyproject.toml").read_text()
    (copy / "pyproject.toml").write_text(text.replace('"jinja2>=3.1",', '"jinja2>=3.1",\n    "sslyze>=6.3",'))
    if (ROOT / ".dev-state" / "no-pkcs11-provider").exists():  # what setup learnt about this distribution
        (copy / ".dev-state").mkdir()
        (copy / ".dev-state" / "no-pkcs11-provider").touch()
    res = subprocess.run(["bash", str(copy / "dev.sh"), "setup"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip().splitlines()[-1] == f"requirements/py{PY_MINOR}.lock is out of date: run ./dev.sh lock"
    assert not (copy / ".venv").exists()
    # the unchanged pyproject passes the same check
    (copy / "pyproject.toml").write_text(text)
    ok = subprocess.run(["/usr/bin/python3", str(copy / "requirements" / "lockinput.py"), "check", "main",
                         str(copy / "requirements" / f"py{PY_MINOR}.lock")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
