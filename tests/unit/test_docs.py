"""docs/: the generated references match the code (docs/generate.py), every agent.toml key is documented, and
every message quoted in docs/troubleshooting.md still occurs in the code."""

from __future__ import annotations

import re
import runpy
from dataclasses import fields
from pathlib import Path

from agent.config import _SECTIONS, AgentConfig

ROOT = Path(__file__).resolve().parents[2]
GENERATE = runpy.run_path(str(ROOT / "docs" / "generate.py"))
SOURCES = [p for d in ("agent", "hub", "hsm", "est", "requirements") for p in (ROOT / d).rglob("*.py")] + \
    [ROOT / "dev.sh"]


def test_generated_references_are_up_to_date():
    assert GENERATE["stale"]() == [], "run: python docs/generate.py"


def test_every_agent_key_is_documented():
    for cls in (AgentConfig, *_SECTIONS.values()):
        for f in fields(cls):
            if f.name not in _SECTIONS:
                assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no doc"
    text = GENERATE["agent_toml"]()
    for name, cls in _SECTIONS.items():
        for f in fields(cls):
            assert f"`{name}.{f.name}`" in text


def test_every_troubleshooting_message_occurs_in_the_code():
    code = "\n".join(p.read_text(errors="replace") for p in SOURCES)
    table = (ROOT / "docs" / "troubleshooting.md").read_text()
    # a quote is literal text of a message; "..." and an upper-case placeholder (FILE) stand for a value
    quoted = [part for q in re.findall(r"^\| `([^`]+)`", table, re.M)
              for part in re.split(r"\.\.\.|\b[A-Z]{2,}\b|\d{4}", q) if len(part.strip()) > 3]
    assert len(quoted) >= 10
    missing = [q for q in quoted if q not in code]
    assert not missing, f"no longer in the code: {missing}"
