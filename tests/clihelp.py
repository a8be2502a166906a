"""Shared by the CLI help tests (tests/unit/test_agent_help.py, test_hub_help.py): the typer command tree, a
command's `--help` rendered as a user sees it (a child process at COLUMNS=80), and a whitespace-free form of it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT, child_env


def commands(cmd, path: tuple[str, ...] = ()):
    """(path, command) for the command and every subcommand below it."""
    yield path, cmd
    if hasattr(cmd, "commands"):  # a group (typer vendors its own click: no isinstance against click's classes)
        for name, sub in cmd.commands.items():
            yield from commands(sub, (*path, name))


def render(program: str, *args: str, unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`program ARGS` from the venv at 80 columns, without colour and without the variables in `unset`."""
    env = child_env(COLUMNS="80", TERM="dumb")
    for name in ("NO_COLOR", *unset):
        env.pop(name, None)
    return subprocess.run([str(Path(sys.executable).with_name(program)), *args], capture_output=True, text=True,
                          timeout=60, env=env, cwd=ROOT, stdin=subprocess.DEVNULL)


def squash(text: str) -> str:
    """The rendered text without whitespace and box drawing, so a wrapped phrase still matches."""
    return re.sub(r"[\s│╭╮╰╯─]", "", text)
