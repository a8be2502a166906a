"""`tessera-agent --help` of every command, rendered as a user sees it (COLUMNS=80, a child process).

Rich treats help strings as markup, so a `[default: ...]` written in one vanished unless escaped; these tests walk
the typer command tree, collect every default a help string names, and check the rendered help shows it. Cost:
one `tessera-agent ... --help` child per command (about 0.3 s each, ~3 s in all).
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version

import pytest
import typer

from agent.cli import app
from tests.clihelp import commands, render as _render, squash
from tests.helpers import ROOT, child_env


def render(*args: str) -> subprocess.CompletedProcess:
    return _render("tessera-agent", *args, unset=())


NAMED_DEFAULT = re.compile(r"\\?\[default: ([^\]]+)\]")
ACRONYMS = {"EST", "MQTT", "PEM", "TLS", "URI", "CSR", "JSON", "PKCS", "SIGTERM", "SIGHUP", "CLI", "PIN", "SHA",
            "CKR", "MTLS", "PID", "ENV", "NAME"}


COMMANDS = list(commands(typer.main.get_command(app)))


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[" ".join(p) or "tessera-agent" for p, _ in COMMANDS])
def test_help_shows_every_named_default_and_describes_every_option(path, cmd):
    proc = render(*path, "--help")
    assert proc.returncode == 0, proc.stderr
    shown = squash(proc.stdout)
    assert max(len(line) for line in proc.stdout.splitlines()) <= 80, proc.stdout
    for param in cmd.params:
        if param.param_type_name != "option" or getattr(param, "hidden", False):
            continue
        assert (param.help or "").strip(), f"{' '.join(path)} {param.opts[0]} has no description"
        for default in NAMED_DEFAULT.findall(param.help):
            assert squash(f"[default: {default}]") in shown, \
                f"{' '.join(path)} {param.opts[0]}: '[default: {default}]' is not in the rendered help:\n{proc.stdout}"
    names = {p.name.upper() for p in cmd.params if p.name} | {m for p in cmd.params if (m := getattr(p, "metavar", None))}
    for word in re.findall(r"\b[A-Z][A-Z0-9_]{2,}\b", cmd.help or ""):
        assert word in ACRONYMS or word in names, \
            f"{' '.join(path)}: its description names {word!r}, which is no argument of the command"


def test_version_is_the_package_version_and_needs_no_cli_framework():
    proc = render("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"tessera-agent {version('tessera')}\n"
    code = ("import sys; sys.argv = ['tessera-agent', '--version']\nimport agent.entry\ntry:\n agent.entry.main()\n"
            "except SystemExit as e:\n assert e.code == 0, e.code\nprint(sorted(m for m in ('typer', 'rich', 'click') "
            "if m in sys.modules))")
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=child_env(),
                           cwd=ROOT)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.splitlines()[-1] == "[]", probe.stdout
    # and through the CLI framework too (e.g. `tessera-agent --version status` still prints the version first)
    both = render("--version", "status")
    assert both.returncode == 0 and both.stdout.startswith("tessera-agent "), both.stdout + both.stderr
