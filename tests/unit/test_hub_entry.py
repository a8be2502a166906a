"""hub.cli.entry: only a well-formed suspend/resume/revoke with a hub running takes the fast path; the rest is typer's."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hub.cli.entry import status_fast_path


@pytest.mark.parametrize("argv", [
    [], ["device"], ["device", "list"], ["device", "revoke"], ["device", "revoke", "x", "--help"],
    ["device", "revoke", "x"],                       # --reason is required: typer says so
    ["device", "revoke", "x", "--reason", "k", "--bogus"],
    ["device", "suspend", "x", "--dir"],
    ["init", "--fleet", "x"],
])
def test_anything_else_goes_to_typer(argv):
    assert status_fast_path(argv) is None


def test_no_running_hub_answers_in_process(tmp_path, capsys):
    """No hub running: the fast path still goes through the API (in-process, hub.cli.offline), same answers."""
    subprocess.run([sys.executable, "-m", "hub.cli.main", "init", "--fleet", "f", "--dir", str(tmp_path / "h")],
                   check=True, capture_output=True)
    assert status_fast_path(["device", "suspend", "dev-1", "--dir", str(tmp_path / "h")]) == 1
    assert capsys.readouterr().err == "error: no device 'dev-1'\n"


def test_a_directory_that_is_not_a_fleet_is_one_clean_line(tmp_path, capsys):
    assert status_fast_path(["device", "revoke", "dev-1", "--reason", "r", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "fleet.toml" in err and err.count("\n") == 1


def test_a_bad_hub_url_is_one_clean_line(tmp_path, capsys):
    assert status_fast_path(["device", "revoke", "dev-1", "--reason", "r", "--hub", "http://x"]) == 1
    assert capsys.readouterr().err == "error: --hub 'http://x' is not a URL like https://hub.example:8444\n"


def test_bad_device_id_is_one_clean_line(tmp_path, capsys):
    assert status_fast_path(["device", "suspend", "Bad/Id", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: invalid device id") and err.count("\n") == 1


def test_the_fast_path_does_not_load_the_cli_framework():
    """The revoke hot path up to the request: argument parsing, credentials, TLS context, the HTTPS call (here
    to a port nothing listens on, with a remote --hub so no in-process fallback)."""
    code = ("import sys; from hub.cli.entry import status_fast_path; status_fast_path(['device', 'revoke', 'x', "
            "'--reason', 'r', '--dir', '/nonexistent']); "
            "status_fast_path(['device', 'revoke', 'x', '--reason', 'r', '--hub', 'https://127.0.0.1:1']); "
            "print(sorted(m for m in ('typer', 'rich', 'cryptography', 'sqlite_utils', 'pydantic', 'aiohttp') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
