"""`tessera-hub --help` of every command, rendered as a user sees it (COLUMNS=80, a child process).

Rich treats help strings as markup, so a `[default: ...]` (or a `[crl]`, `[profiles.NAME]`) written in one
vanished unless escaped ("Hub directory ."); these tests walk the typer command tree, collect every bracketed
phrase a help string names, and check the rendered help shows it. Cost: one `tessera-hub ... --help` child per
command (43 commands, about 0.4 s each: ~17 s idle, 33 s measured on a busy 2-core machine).
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import pytest
import typer

from hub.cli.main import app
from tests.clihelp import commands, render as _render, squash
from tests.helpers import ROOT, child_env


def render(*args: str) -> subprocess.CompletedProcess:
    return _render("tessera-hub", *args, unset=("TESSERA_HUB_DIR", "TESSERA_HUB", "TESSERA_PROFILE", "LINES"))


COMMANDS = list(commands(typer.main.get_command(app)))


def bracketed(text: str) -> list[str]:
    """Every outermost [...] phrase of a help string as the user should read it (markup escapes removed)."""
    text = text.replace("\\[", "[")
    found, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c == "[":
            start = i if depth == 0 else start
            depth += 1
        elif c == "]" and depth:
            depth -= 1
            if depth == 0:
                found.append(text[start:i + 1])
    return found


def test_bracketed_finds_nested_defaults():
    assert bracketed(r"port \[default: fleet.toml \[crl] http_port, 8080]. A [x] y") == \
        ["[default: fleet.toml [crl] http_port, 8080]", "[x]"]


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[" ".join(p) or "tessera-hub" for p, _ in COMMANDS])
def test_help_shows_every_default_it_names(path, cmd):
    proc = render(*path, "--help")
    assert proc.returncode == 0, proc.stderr
    shown = squash(proc.stdout)
    assert max(len(line) for line in proc.stdout.splitlines()) <= 80, proc.stdout
    texts = [("the description", cmd.help or "")]
    texts += [(p.opts[0], p.help or "") for p in cmd.params if getattr(p, "help", None)]
    for where, text in texts:
        for phrase in bracketed(text):
            assert squash(phrase) in shown, \
                f"{' '.join(path)} {where}: {phrase!r} is not in the rendered help:\n{proc.stdout}"


def test_version_is_the_package_version_and_needs_no_cli_framework():
    proc = render("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"tessera-hub {version('tessera')}\n"
    code = ("import sys; sys.argv = ['tessera-hub', '--version']\nimport hub.cli.entry\ntry:\n hub.cli.entry.main()\n"
            "except SystemExit as e:\n assert e.code == 0, e.code\nprint(sorted(m for m in ('typer', 'rich', 'click', "
            "'cryptography') if m in sys.modules))")
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=child_env(),
                           cwd=ROOT)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.splitlines()[-1] == "[]", probe.stdout
    # and through typer (an eager option: `tessera-hub --version device list` prints the version, runs nothing)
    both = render("--version", "device", "list")
    assert both.returncode == 0 and both.stdout == f"tessera-hub {version('tessera')}\n", both.stdout + both.stderr
    assert "--version" in render("--help").stdout
