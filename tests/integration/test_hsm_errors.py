"""Each misconfiguration gives one clear line, of the right hsm.errors class, and never shows the PIN."""

from __future__ import annotations

import dataclasses
import os
import secrets
import time

import pytest

from hsm import worker
from hsm.errors import HsmError, KeyExists, KeyNotFound, ModuleNotFound, PinError, TokenNotFound
from hsm.softhsm import write_secret
from tests.helpers import parse_objects, pkcs11_tool

pytestmark = pytest.mark.integration


def _one_line(exc: BaseException, *secrets_: str) -> str:
    msg = str(exc)
    assert msg.strip(), "empty error message"
    assert "\n" not in msg and "\r" not in msg, f"message is not one line: {msg!r}"
    assert len(msg) < 300, f"message is not short: {msg!r}"
    for secret in secrets_:
        assert secret not in msg, "the PIN appears in the error message"
    return msg


def _cfg(token, **changes):
    return dataclasses.replace(token.config, **changes)


def test_correct_configuration_works(softtoken):
    """Control for the tests below: the unmodified configuration generates and finds a key."""
    info = worker.generate_key(softtoken.config, "ok")
    assert worker.describe_key(softtoken.config, "ok").id == info.id


def test_wrong_pin(softtoken, tmp_path):
    wrong = secrets.token_hex(8)
    assert wrong != softtoken.pin
    pin_file = tmp_path / "wrong-pin"
    write_secret(pin_file, wrong)
    cfg = _cfg(softtoken, pin_source=f"file:{pin_file}")
    with pytest.raises(PinError) as err:
        worker.generate_key(cfg, "k")
    msg = _one_line(err.value, wrong, softtoken.pin)
    assert "wrong PIN" in msg and repr(softtoken.label) in msg
    # and nothing was generated
    rc, out = pkcs11_tool(softtoken, "-O")
    assert rc == 0 and not parse_objects(out)


def test_wrong_pin_from_environment(softtoken, monkeypatch):
    wrong = "not-" + softtoken.pin
    monkeypatch.setenv("TESSERA_TEST_WRONG_PIN", wrong)  # the spawned child inherits os.environ
    with pytest.raises(PinError) as err:
        worker.describe_key(_cfg(softtoken, pin_source="env:TESSERA_TEST_WRONG_PIN"), "k")
    msg = _one_line(err.value, wrong, softtoken.pin)
    assert "wrong PIN" in msg


def test_pin_from_environment_works(softtoken, monkeypatch):
    monkeypatch.setenv("TESSERA_TEST_GOOD_PIN", softtoken.pin)
    info = worker.generate_key(_cfg(softtoken, pin_source="env:TESSERA_TEST_GOOD_PIN"), "env-key")
    assert info.label == "env-key"


def test_missing_token_label(softtoken):
    with pytest.raises(TokenNotFound) as err:
        worker.describe_key(_cfg(softtoken, label="no-such-token"), "k")
    msg = _one_line(err.value, softtoken.pin)
    assert "'no-such-token'" in msg and softtoken.module in msg


def test_missing_module_path(softtoken, tmp_path):
    missing = str(tmp_path / "nowhere" / "libpkcs11-missing.so")
    with pytest.raises(ModuleNotFound) as err:
        worker.generate_key(_cfg(softtoken, module=missing), "k")
    msg = _one_line(err.value, softtoken.pin)
    assert missing in msg and "not found" in msg


def test_module_path_that_is_not_a_pkcs11_module(softtoken, tmp_path):
    fake = tmp_path / "libfake.so"
    fake.write_bytes(b"\x7fELF not really")
    with pytest.raises(ModuleNotFound) as err:
        worker.describe_key(_cfg(softtoken, module=str(fake)), "k")
    msg = _one_line(err.value, softtoken.pin)
    assert str(fake) in msg


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_pin_file_readable_by_others_is_refused(softtoken, tmp_path, mode):
    pin_file = tmp_path / "pin-open"
    write_secret(pin_file, softtoken.pin)  # the right PIN: only the mode is wrong
    os.chmod(pin_file, mode)
    with pytest.raises(PinError) as err:
        worker.generate_key(_cfg(softtoken, pin_source=f"file:{pin_file}"), "k")
    msg = _one_line(err.value, softtoken.pin)
    assert f"{mode:04o}" in msg and "0600" in msg and str(pin_file) in msg
    # the same file with mode 0600 is accepted (so the refusal was about the mode)
    os.chmod(pin_file, 0o600)
    assert worker.generate_key(_cfg(softtoken, pin_source=f"file:{pin_file}"), "k").label == "k"


def test_missing_pin_file(softtoken, tmp_path):
    missing = tmp_path / "no-pin-here"
    with pytest.raises(PinError) as err:
        worker.describe_key(_cfg(softtoken, pin_source=f"file:{missing}"), "k")
    msg = _one_line(err.value, softtoken.pin)
    assert str(missing) in msg


def test_missing_pin_environment_variable(softtoken, monkeypatch):
    monkeypatch.delenv("TESSERA_TEST_UNSET_PIN", raising=False)
    with pytest.raises(PinError) as err:
        worker.generate_key(_cfg(softtoken, pin_source="env:TESSERA_TEST_UNSET_PIN"), "k")
    msg = _one_line(err.value, softtoken.pin)
    assert "TESSERA_TEST_UNSET_PIN" in msg and "not set" in msg


def test_empty_pin_environment_variable(softtoken, monkeypatch):
    monkeypatch.setenv("TESSERA_TEST_EMPTY_PIN", "")
    with pytest.raises(PinError) as err:
        worker.generate_key(_cfg(softtoken, pin_source="env:TESSERA_TEST_EMPTY_PIN"), "k")
    _one_line(err.value, softtoken.pin)


@pytest.mark.parametrize("source", ["", "pin-value:1234", "https://example.invalid/pin"])
def test_unsupported_pin_source(softtoken, source):
    with pytest.raises(PinError) as err:
        worker.describe_key(_cfg(softtoken, pin_source=source), "k")
    msg = _one_line(err.value, softtoken.pin, "1234")
    assert "file:" in msg and "env:" in msg


@pytest.mark.parametrize("label", ["", "x" * 65, "é" * 65])
def test_malformed_key_label(softtoken, label):
    with pytest.raises(HsmError) as err:
        worker.generate_key(softtoken.config, label)
    assert type(err.value) is HsmError  # not KeyExists / PinError / ...
    msg = _one_line(err.value, softtoken.pin)
    assert "label" in msg and "1..64" in msg
    rc, out = pkcs11_tool(softtoken, "-O")
    assert rc == 0 and not parse_objects(out), out


def test_longest_allowed_label_works(softtoken):
    label = "L" * 64
    info = worker.generate_key(softtoken.config, label)
    assert info.label == label
    with pytest.raises(KeyExists):
        worker.generate_key(softtoken.config, label)


def test_unknown_key_label(softtoken):
    worker.generate_key(softtoken.config, "present")
    with pytest.raises(KeyNotFound) as err:
        worker.describe_key(softtoken.config, "absent")
    msg = _one_line(err.value, softtoken.pin)
    assert "'absent'" in msg and repr(softtoken.label) in msg


# --- the key worker process and token creation ------------------------------------------------------------------

def test_worker_crash_is_one_clear_error():
    with pytest.raises(HsmError) as err:
        worker.run_isolated(os._exit, 3)
    assert "died" in _one_line(err.value)


def test_worker_timeout_is_enforced():
    started = time.monotonic()
    with pytest.raises(HsmError) as err:
        worker.run_isolated(time.sleep, 5, timeout=0.5)
    elapsed = time.monotonic() - started
    assert "did not answer" in _one_line(err.value)
    assert elapsed < 3, f"run_isolated returned after {elapsed:.1f} s for a 0.5 s timeout"
