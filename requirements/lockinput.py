"""What the dependency locks are made from, and whether a lock still matches pyproject.toml (stdlib only).

`./dev.sh lock` and `./dev.sh setup` run this with the system Python, before any venv exists. A lock group is
a set of pyproject's requirement lists: `main` is [project] dependencies, the `test` extra and the build backend
(`[build-system] requires`: the editable install runs without build isolation, so setuptools is locked too);
`tlsscan` is the `tlsscan` extra (its own venv, see pyproject.toml). Each lock's header holds the SHA-256 of its
group's lists (`# lock-input-sha256: ...`), so a dependency added to pyproject.toml without `./dev.sh lock`
is caught before anything is installed.

    lockinput.py requirements GROUP        the group's requirement lines (uv's input)
    lockinput.py digest GROUP              the SHA-256 the lock's header must carry
    lockinput.py check GROUP LOCKFILE      exit 1 with one line if LOCKFILE is missing or out of date
    lockinput.py extraneous LOCKFILE       (run by the venv's Python) installed distributions the lock lacks
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = "# lock-input-sha256: "
# which pyproject lists make up each lock: (table path, key) pairs, as data
GROUPS = {
    "main": [("project", "dependencies"), ("project.optional-dependencies", "test"), ("build-system", "requires")],
    "tlsscan": [("project.optional-dependencies", "tlsscan")],
}


def _lists(group: str, pyproject: Path) -> dict[str, list[str]]:
    data = tomllib.loads(pyproject.read_text())
    out = {}
    for table, key in GROUPS[group]:
        node = data
        for part in table.split("."):
            node = node.get(part, {})
        out[f"{table}.{key}"] = sorted(" ".join(r.split()) for r in node.get(key, []))
    return out


def requirements(group: str, pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    return [r for reqs in _lists(group, pyproject).values() for r in reqs]


def digest(group: str, pyproject: Path = ROOT / "pyproject.toml") -> str:
    blob = json.dumps(_lists(group, pyproject), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def recorded_digest(lockfile: Path) -> str | None:
    for line in lockfile.read_text().splitlines():
        if line.startswith(HEADER):
            return line[len(HEADER):].strip()
    return None


def check(group: str, lockfile: Path, pyproject: Path = ROOT / "pyproject.toml") -> str | None:
    """None if `lockfile` was made from pyproject's current lists, else the one-line reason."""
    name = lockfile.relative_to(ROOT) if lockfile.is_relative_to(ROOT) else lockfile
    if not lockfile.is_file():
        return f"{name} is missing (no lock for this Python): run ./dev.sh lock"
    if recorded_digest(lockfile) != digest(group, pyproject):
        return f"{name} is out of date: run ./dev.sh lock"
    return None


def pinned(lockfile: Path) -> set[str]:
    names = set()
    for line in lockfile.read_text().splitlines():
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==", line)
        if m:
            names.add(_canon(m.group(1)))
    return names


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def extraneous(lockfile: Path) -> list[str]:
    from importlib import metadata

    keep = pinned(lockfile) | {"tessera", "pip", "setuptools", "wheel"}  # the project and the venv's installer
    return sorted({_canon(d.metadata["Name"]) for d in metadata.distributions()} - keep)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "requirements" and argv[1] in GROUPS:
        print("\n".join(requirements(argv[1])))
    elif len(argv) >= 2 and argv[0] == "digest" and argv[1] in GROUPS:
        print(digest(argv[1]))
    elif len(argv) >= 3 and argv[0] == "check" and argv[1] in GROUPS:
        reason = check(argv[1], Path(argv[2]).resolve())
        if reason:
            print(reason, file=sys.stderr)
            return 1
    elif len(argv) >= 2 and argv[0] == "extraneous":
        for name in extraneous(Path(argv[1])):
            print(name)
    else:
        print(__doc__.split("\n\n")[-1], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
