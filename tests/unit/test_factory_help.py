"""`tessera-factory` (the installed console script of hub/manufacturer/factory.py) answers `--help` for every
command, rendered at 80 columns as a factory operator sees it; every option a command declares is named."""

from __future__ import annotations

import pytest
import typer

from hub.manufacturer.factory import _app
from tests.clihelp import commands, render, squash

COMMANDS = list(commands(typer.main.get_command(_app())))


def test_the_console_script_lists_its_commands():
    out = render("tessera-factory", "--help")
    assert out.returncode == 0, out.stderr
    names = {path[0] for path, _ in COMMANDS if path}
    assert {"init-ca", "birth"} <= names
    for name in names:
        assert name in out.stdout


@pytest.mark.parametrize("path,cmd", [c for c in COMMANDS if c[0]], ids=lambda c: " ".join(c) if isinstance(c, tuple) else None)
def test_each_command_names_its_options(path, cmd):
    out = render("tessera-factory", *path, "--help")
    assert out.returncode == 0, out.stderr
    shown = squash(out.stdout)
    for param in cmd.params:
        for opt in param.opts:
            if opt.startswith("--"):
                assert squash(opt) in shown, (path, opt)
