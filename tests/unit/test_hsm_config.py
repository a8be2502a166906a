"""Pure-Python parts of hsm: PIN sources, TLS route choice, key URIs. No PKCS#11 module is loaded here."""

from __future__ import annotations

import os

import pytest

from hsm import tls
from hsm.errors import PinError, TlsRouteError
from hsm.keys import KeyInfo
from hsm.softhsm import write_secret
from hsm.token import TokenConfig, default_module, read_pin
from hsm.uri import parse

PIN = "s3cr3t-PIN-4711"


def _check(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg and PIN not in msg
    return msg


def test_pin_from_file(tmp_path):
    path = tmp_path / "pin"
    write_secret(path, PIN)
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    assert read_pin(f"file:{path}") == PIN
    assert read_pin(f"file://{path}") == PIN
    assert read_pin(str(path)) == PIN


def test_pin_file_only_first_line(tmp_path):
    path = tmp_path / "pin"
    write_secret(path, f"{PIN}\nsecond line")
    assert read_pin(f"file:{path}") == PIN


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o660, 0o604, 0o601])
def test_pin_file_open_to_others_refused(tmp_path, mode):
    path = tmp_path / "pin"
    write_secret(path, PIN)
    os.chmod(path, mode)
    with pytest.raises(PinError) as err:
        read_pin(f"file:{path}")
    assert f"{mode:04o}" in _check(err.value)


def test_pin_file_0400_accepted(tmp_path):
    path = tmp_path / "pin"
    write_secret(path, PIN)
    os.chmod(path, 0o400)
    assert read_pin(f"file:{path}") == PIN


def test_empty_pin_file_refused(tmp_path):
    path = tmp_path / "pin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)
    with pytest.raises(PinError) as err:
        read_pin(f"file:{path}")
    assert "empty" in _check(err.value)


def test_pin_directory_refused(tmp_path):
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    with pytest.raises(PinError) as err:
        read_pin(f"file:{d}")
    assert "regular file" in _check(err.value)


def test_pin_from_env(monkeypatch):
    monkeypatch.setenv("TESSERA_UNIT_PIN", PIN)
    assert read_pin("env:TESSERA_UNIT_PIN") == PIN
    monkeypatch.delenv("TESSERA_UNIT_PIN")
    with pytest.raises(PinError) as err:
        read_pin("env:TESSERA_UNIT_PIN")
    assert "TESSERA_UNIT_PIN" in _check(err.value)


@pytest.mark.parametrize("source", ["", f"pin-value:{PIN}", "https://example.invalid/x"])
def test_bad_pin_sources(source):
    with pytest.raises(PinError) as err:
        read_pin(source)
    _check(err.value)


def test_bare_pin_as_pin_source_is_not_echoed():
    with pytest.raises(PinError) as err:
        read_pin(PIN)
    _check(err.value)


def test_token_config_module_default(monkeypatch):
    monkeypatch.delenv("TESSERA_PKCS11_MODULE", raising=False)
    assert TokenConfig("t", "env:X").module_path == default_module()
    assert TokenConfig("t", "env:X", module="/opt/lib.so").module_path == "/opt/lib.so"
    monkeypatch.setenv("TESSERA_PKCS11_MODULE", "/from/env.so")
    assert TokenConfig("t", "env:X").module_path == "/from/env.so"


@pytest.mark.parametrize(("available", "forced", "expected"), [
    (["provider", "engine"], "", "provider"),
    (["engine"], "", "engine"),
    (["provider", "engine"], "engine", "engine"),
    (["provider"], "provider", "provider"),
])
def test_choose_route(monkeypatch, available, forced, expected):
    monkeypatch.setattr(tls, "available_routes", lambda: list(available))
    monkeypatch.setenv("TESSERA_TLS_ROUTE", forced)
    assert tls.choose_route() == expected


@pytest.mark.parametrize(("available", "forced", "needle"), [
    (["engine"], "provider", "not installed"),
    ([], "engine", "not installed"),
    ([], "", "install pkcs11-provider or libengine-pkcs11-openssl"),
    (["engine"], "openssl", "'openssl'"),
])
def test_choose_route_errors(monkeypatch, available, forced, needle):
    monkeypatch.setattr(tls, "available_routes", lambda: list(available))
    monkeypatch.setenv("TESSERA_TLS_ROUTE", forced)
    with pytest.raises(TlsRouteError) as err:
        tls.choose_route()
    assert needle in _check(err.value)


def test_routes_on_this_machine():
    routes = tls.available_routes()
    assert set(routes) <= {"provider", "engine"}
    assert routes == sorted(routes, key=["provider", "engine"].index)


@pytest.mark.parametrize(("label", "key_id"), [
    ("device", b"\x01\x02"), ("with space;and/slash?q=1&x", b"\xff\x00;"), ("ünïcode", bytes(range(8))),
])
def test_key_info_uri_round_trip(label, key_id):
    info = KeyInfo(token_label="tok en", label=label, id=key_id, key_type="ec-p256", public_key_pem="")
    uri = parse(info.uri)
    assert (uri.token, uri.object, uri.id, uri.type) == ("tok en", label, key_id, "private")
    assert info.uri.startswith("pkcs11:") and "pin-" not in info.uri
