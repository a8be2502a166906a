"""Each misconfiguration gives one clear line, of the right hsm.errors class, and never shows the PIN."""

from __future__ import annotations

import dataclasses
import os
import secrets
import time

import pytest

from hsm import worker
from hsm import templates
from hsm.errors import (HsmError, KeyExists, KeyNotFound, KeyUsageRefused, ModuleNotFound, PinError, TemplateRefused,
                        TokenNotFound)
from hsm.keys import require_sign_only
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


def test_correct_configuration_works(token):
    """Control for the tests below: the unmodified configuration generates and finds a key."""
    info = worker.generate_key(token.config, "ok")
    assert worker.describe_key(token.config, "ok").id == info.id


def test_wrong_pin(token, tmp_path):
    wrong = secrets.token_hex(8)
    assert wrong != token.pin
    pin_file = tmp_path / "wrong-pin"
    write_secret(pin_file, wrong)
    cfg = _cfg(token, pin_source=f"file:{pin_file}")
    with pytest.raises(PinError) as err:
        worker.generate_key(cfg, "k")
    msg = _one_line(err.value, wrong, token.pin)
    assert "wrong PIN" in msg and repr(token.label) in msg
    # and nothing was generated
    rc, out = pkcs11_tool(token, "-O")
    assert rc == 0 and not parse_objects(out)


def test_wrong_pin_from_environment(token, monkeypatch):
    wrong = "not-" + token.pin
    monkeypatch.setenv("TESSERA_TEST_WRONG_PIN", wrong)  # the spawned child inherits os.environ
    with pytest.raises(PinError) as err:
        worker.describe_key(_cfg(token, pin_source="env:TESSERA_TEST_WRONG_PIN"), "k")
    msg = _one_line(err.value, wrong, token.pin)
    assert "wrong PIN" in msg


def test_pin_from_environment_works(token, monkeypatch):
    monkeypatch.setenv("TESSERA_TEST_GOOD_PIN", token.pin)
    info = worker.generate_key(_cfg(token, pin_source="env:TESSERA_TEST_GOOD_PIN"), "env-key")
    assert info.label == "env-key"


def test_missing_token_label(token):
    with pytest.raises(TokenNotFound) as err:
        worker.describe_key(_cfg(token, label="no-such-token"), "k")
    msg = _one_line(err.value, token.pin)
    assert "'no-such-token'" in msg and token.module in msg


def test_missing_module_path(token, tmp_path):
    missing = str(tmp_path / "nowhere" / "libpkcs11-missing.so")
    with pytest.raises(ModuleNotFound) as err:
        worker.generate_key(_cfg(token, module=missing), "k")
    msg = _one_line(err.value, token.pin)
    assert missing in msg and "not found" in msg


def test_module_path_that_is_not_a_pkcs11_module(token, tmp_path):
    fake = tmp_path / "libfake.so"
    fake.write_bytes(b"\x7fELF not really")
    with pytest.raises(ModuleNotFound) as err:
        worker.describe_key(_cfg(token, module=str(fake)), "k")
    msg = _one_line(err.value, token.pin)
    assert str(fake) in msg


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_pin_file_readable_by_others_is_refused(token, tmp_path, mode):
    pin_file = tmp_path / "pin-open"
    write_secret(pin_file, token.pin)  # the right PIN: only the mode is wrong
    os.chmod(pin_file, mode)
    with pytest.raises(PinError) as err:
        worker.generate_key(_cfg(token, pin_source=f"file:{pin_file}"), "k")
    msg = _one_line(err.value, token.pin)
    assert f"{mode:04o}" in msg and "0600" in msg and str(pin_file) in msg
    # the same file with mode 0600 is accepted (so the refusal was about the mode)
    os.chmod(pin_file, 0o600)
    assert worker.generate_key(_cfg(token, pin_source=f"file:{pin_file}"), "k").label == "k"


def test_missing_pin_file(token, tmp_path):
    missing = tmp_path / "no-pin-here"
    with pytest.raises(PinError) as err:
        worker.describe_key(_cfg(token, pin_source=f"file:{missing}"), "k")
    msg = _one_line(err.value, token.pin)
    assert str(missing) in msg


def test_missing_pin_environment_variable(token, monkeypatch):
    monkeypatch.delenv("TESSERA_TEST_UNSET_PIN", raising=False)
    with pytest.raises(PinError) as err:
        worker.generate_key(_cfg(token, pin_source="env:TESSERA_TEST_UNSET_PIN"), "k")
    msg = _one_line(err.value, token.pin)
    assert "TESSERA_TEST_UNSET_PIN" in msg and "not set" in msg


def test_empty_pin_environment_variable(token, monkeypatch):
    monkeypatch.setenv("TESSERA_TEST_EMPTY_PIN", "")
    with pytest.raises(PinError) as err:
        worker.generate_key(_cfg(token, pin_source="env:TESSERA_TEST_EMPTY_PIN"), "k")
    _one_line(err.value, token.pin)


@pytest.mark.parametrize("source", ["", "pin-value:1234", "https://example.invalid/pin"])
def test_unsupported_pin_source(token, source):
    with pytest.raises(PinError) as err:
        worker.describe_key(_cfg(token, pin_source=source), "k")
    msg = _one_line(err.value, token.pin, "1234")
    assert "file:" in msg and "env:" in msg


@pytest.mark.parametrize("label", ["", "x" * 65, "é" * 65])
def test_malformed_key_label(token, label):
    with pytest.raises(HsmError) as err:
        worker.generate_key(token.config, label)
    assert type(err.value) is HsmError  # not KeyExists / PinError / ...
    msg = _one_line(err.value, token.pin)
    assert "label" in msg and "1..64" in msg
    rc, out = pkcs11_tool(token, "-O")
    assert rc == 0 and not parse_objects(out), out


def test_longest_allowed_label_works(token):
    label = "L" * 64
    info = worker.generate_key(token.config, label)
    assert info.label == label
    with pytest.raises(KeyExists):
        worker.generate_key(token.config, label)


def test_unknown_key_label(token):
    worker.generate_key(token.config, "present")
    with pytest.raises(KeyNotFound) as err:
        worker.describe_key(token.config, "absent")
    msg = _one_line(err.value, token.pin)
    assert "'absent'" in msg and repr(token.label) in msg


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


# --- templates a token refuses, and keys that are not sign-only --------------------------------------------------

def child_generate_with(cfg, label: str, key_type: str, public: dict, private: dict) -> None:
    """Run in the key worker: C_GenerateKeyPair with these templates through hsm.keys."""
    from hsm.keys import generate_with_templates
    from hsm.token import open_session

    with open_session(cfg, rw=True) as session:
        generate_with_templates(session, label, key_type, b"refused1", public, private)


#: A template each token refuses: tpm2-pkcs11 the public CKA_VERIFY=true Tessera sent before (it derives that
#: attribute from the TPM object), SoftHSM a public key that claims to be CKA_LOCAL (read-only). (The same claim in
#: the private template makes SoftHSM 2.6.1 leave a nameless private key behind: it fails after creating it.)
REFUSED = {
    "tpm": ({**templates.PUBLIC_TEMPLATE, "VERIFY": True, "ENCRYPT": False}, templates.PRIVATE_TEMPLATE,
            ("CKR_GENERAL_ERROR", "verify=yes", "CKA_VERIFY")),
    "softhsm": ({**templates.PUBLIC_TEMPLATE, "LOCAL": True}, templates.PRIVATE_TEMPLATE,
                ("CKR_ATTRIBUTE_READ_ONLY", "local=yes")),
}


@pytest.mark.parametrize("key_type", ["ec-p256", "rsa-2048"])
def test_refused_template_names_key_type_templates_and_reason(token, key_type):
    public, private, expected = REFUSED[token.kind]
    with pytest.raises(TemplateRefused) as err:
        worker.run_isolated(child_generate_with, token.config, "refused", key_type, public, private)
    msg = str(err.value)
    assert "\n" not in msg and repr(token.label) in msg and f"{key_type} key-pair template" in msg, msg
    for part in expected:
        assert part in msg, msg
    assert token.pin not in msg
    rc, out = pkcs11_tool(token, "-O")
    assert rc == 0 and not parse_objects(out), out  # nothing was left behind
    # control: the same call with Tessera's templates generates the key
    worker.run_isolated(child_generate_with, token.config, "accepted", key_type, templates.PUBLIC_TEMPLATE,
                        templates.PRIVATE_TEMPLATE)
    assert worker.describe_key(token.config, "accepted").key_type == key_type


def test_key_that_can_decrypt_is_refused_for_reuse(token, tmp_path):
    """A key pkcs11-tool made with --usage-sign only can still decrypt (neither token defaults that to no)."""
    rc, out = pkcs11_tool(token, "--keypairgen", "--key-type", "EC:prime256v1", "--usage-sign", "--label", "foreign",
                          "--id", "0a0b")
    assert rc == 0, out
    info = worker.describe_key(token.config, "foreign")
    assert dict(info.attributes)["decrypt"] is True, info.attributes  # the premise
    with pytest.raises(KeyUsageRefused) as err:
        require_sign_only(info)
    msg = _one_line(err.value, token.pin)
    assert "'foreign'" in msg and "decrypt=yes" in msg
    # the agent's enroll/rotate path refuses it instead of reusing it, and leaves it alone
    from agent.config import AgentConfig, TokenSection
    from agent.enroll import _ensure_key

    cfg = AgentConfig(token=TokenSection(label=token.label, pin_source=token.config.pin_source,
                                         module=token.module, softhsm_conf=token.config.softhsm_conf,
                                         key_label="foreign"))
    with pytest.raises(KeyUsageRefused):
        _ensure_key(cfg, "foreign", "sensor-0001")
    assert worker.describe_key(token.config, "foreign").id == info.id
    # control: a key Tessera generated is sign-only and reused
    made = worker.generate_key(token.config, "own")
    assert require_sign_only(made) is made
    assert _ensure_key(cfg, "own", "sensor-0001").id == made.id
