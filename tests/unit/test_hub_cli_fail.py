"""The hub CLI's one error line shows its message literally: config sections such as `[api]` and anything that
looks like Rich markup (names, paths, subjects an attacker may choose) are printed as written."""

from __future__ import annotations

import pytest
import typer

from hub.cli.util import fail


@pytest.mark.parametrize("message", [
    "fleet.toml is not valid: [api] port must be a port number (0-65535)",
    "[registry] url names PostgreSQL: not supported by serve yet",
    "no identity 'x[bold red]y[/]'",
    "a path /tmp/[link=http://evil]x[/link]",
])
def test_fail_prints_the_message_literally(capsys, message):
    with pytest.raises(typer.Exit) as exc:
        fail(message)
    assert exc.value.exit_code == 1
    assert capsys.readouterr().err.strip() == f"error: {message}"


def test_fail_keeps_control_characters_out_of_the_terminal(capsys):
    with pytest.raises(typer.Exit):
        fail("bad name 'a\x1b[31mb'")
    assert capsys.readouterr().err.strip() == "error: bad name 'a\\x1b[31mb'"
