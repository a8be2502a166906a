"""`serve` refuses, with one clear line and without touching anything, to run twice on a directory, with a private
key readable by others, or on a port another program holds (hub/serve/guard.py)."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from tests.helpers import free_port
from tests.integration.hubfixtures import ROOT, Hub, cli_env, hub_binary, init_hub, running_hub


def _serve(hub: Hub, *extra: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([hub_binary(), "serve", "--dir", str(hub.dir), "--host", "127.0.0.1", *extra],
                          capture_output=True, text=True, timeout=timeout, env=cli_env(), cwd=ROOT)


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and "Traceback" not in proc.stderr, proc.stderr
    message = lines[-1]
    for needle in needles:
        assert needle in message, message
    return message


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with running_hub(tmp_path_factory.mktemp("guards")) as hub:
        yield hub


def test_a_second_serve_on_the_same_directory_is_refused_and_changes_nothing(served):
    broker_conf = {p: p.read_bytes() for p in (served.dir / "broker").iterdir() if p.is_file() and p.suffix != ".log"}
    proc = _serve(served, "--est-port", str(free_port()), "--mqtt-port", str(free_port()),
                  "--api-port", str(free_port()))
    _one_line_error(proc, "another tessera-hub serve", f"pid {served.proc.pid}")
    assert {p: p.read_bytes() for p in broker_conf} == broker_conf  # the running broker's files are untouched
    assert served.proc.poll() is None and served._accepts()  # and the running hub still serves


@pytest.mark.parametrize("name", ["EST", "MQTT", "API", "CRL"])
def test_a_port_in_use_is_named(tmp_path, name):
    other = init_hub(tmp_path)  # initialised, not running
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    ports = {"EST": free_port(), "MQTT": free_port(), "API": free_port(), "CRL": free_port()}
    ports[name] = port
    try:
        proc = _serve(other, "--est-port", str(ports["EST"]), "--mqtt-port", str(ports["MQTT"]),
                      "--api-port", str(ports["API"]), "--crl-port", str(ports["CRL"]))
    finally:
        taken.close()
    _one_line_error(proc, f"{name} port 127.0.0.1:{port}", "in use")


@pytest.mark.parametrize("key", ["tls/est.key", "tls/admin.key", "ca/root.key"])
def test_a_private_key_readable_by_others_is_refused(tmp_path, key):
    hub = init_hub(tmp_path)
    path = hub.dir / key
    if not path.exists():
        pytest.skip(f"{key} does not exist in this layout")
    os.chmod(path, 0o644)
    proc = _serve(hub, "--est-port", str(free_port()), "--mqtt-port", str(free_port()), "--api-port", str(free_port()))
    _one_line_error(proc, str(path), "chmod 600")
