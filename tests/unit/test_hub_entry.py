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
    """The API checks the id (in-process here: no hub runs), with the policy's own message."""
    subprocess.run([sys.executable, "-m", "hub.cli.main", "init", "--fleet", "f", "--dir", str(tmp_path / "h")],
                   check=True, capture_output=True)
    for bad in ("Bad/Id", "hub", "../x"):
        assert status_fast_path(["device", "suspend", bad, "--dir", str(tmp_path / "h")]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: invalid device id" if bad != "hub" else "error: device id 'hub' is reserved")
        assert err.count("\n") == 1, err


def _credential(tmp_path):
    """A self-signed certificate and its 0600 key, named in tmp_path/.config/tessera/cli.toml (as a remote hub's
    operator credential would be)."""
    import datetime as dt
    import os

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from tests.helpers import free_port

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "svc.t")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(tmp_path / "c.key", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    os.close(fd)
    conf = tmp_path / ".config" / "tessera"
    conf.mkdir(parents=True)
    (conf / "cli.toml").write_text(f'hub = "https://127.0.0.1:{free_port()}"\ncert = "{tmp_path}/c.pem"\n'
                                   f'key = "{tmp_path}/c.key"\nca = "{tmp_path}/c.pem"\n')


def test_the_fast_path_does_not_load_the_cli_framework(tmp_path):
    """The revoke hot path up to and through the HTTPS call: argument parsing, cli.toml, the credential, the TLS
    context, connecting (here to a port nothing listens on: one clean error line, no in-process fallback for a
    remote hub) imports none of the heavy modules."""
    import os

    _credential(tmp_path)
    code = ("import sys; from hub.cli.entry import status_fast_path; "
            "rc = status_fast_path(['device', 'revoke', 'x', '--reason', 'r']); "
            "print(rc, sorted(m for m in ('typer', 'rich', 'cryptography', 'sqlite_utils', 'pydantic', 'aiohttp', "
            "'dataclasses') "
            "if m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_CONFIG_HOME", "TESSERA_HUB", "TESSERA_PROFILE")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**env, "HOME": str(tmp_path)})
    assert proc.stdout.strip() == "1 []", proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: no fleet API answers at https://127.0.0.1:") and \
        proc.stderr.count("\n") == 1, proc.stderr


def test_a_key_others_can_read_is_refused(tmp_path, monkeypatch, capsys):
    import os

    _credential(tmp_path)
    os.chmod(tmp_path / "c.key", 0o640)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("TESSERA_HUB", raising=False)
    assert status_fast_path(["device", "suspend", "x"]) == 1
    err = capsys.readouterr().err
    assert "readable by others (mode 0640)" in err and err.count("\n") == 1
