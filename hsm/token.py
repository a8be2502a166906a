"""Open a PKCS#11 module and a token by label, with the PIN read from an RFC 7512 pin-source (file or env)."""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import ModuleNotFound, PinError, TokenNotFound
from .secretfile import PrivateFileError, read_private_file

#: Where distributions put SoftHSM2's module; the first that exists is the default.
SOFTHSM_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/arm-linux-gnueabihf/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


def default_module() -> str:
    """The platform's SoftHSM2 module path ($TESSERA_PKCS11_MODULE wins when set)."""
    env = os.environ.get("TESSERA_PKCS11_MODULE")
    if env:
        return env
    for cand in SOFTHSM_CANDIDATES:
        if os.path.exists(cand):
            return cand
    return SOFTHSM_CANDIDATES[0]


def read_pin(source: str) -> str:
    """Read a PIN from a pin-source: ``file:/path`` (RFC 7512) or ``env:NAME`` (Tessera extension).

    A PIN file must be a regular file not readable by group or others (0600 or tighter).
    Only the first line is used; the trailing newline is stripped.
    """
    if not source:
        raise PinError("no PIN source configured (use file:/path or env:NAME)")
    if source.startswith("env:"):
        name = source[4:]
        value = os.environ.get(name)
        if value is None or value == "":
            raise PinError(f"PIN environment variable {name} is not set")
        return value
    if source.startswith("file:"):
        path = Path(source[5:].removeprefix("//"))
    elif source.startswith("/"):
        path = Path(source)
    else:
        scheme = source.split(":", 1)[0] if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]{0,15}:.*", source, re.S) else ""
        shown = f" {scheme!r}" if scheme else ""  # never echo a value that may be the PIN itself
        raise PinError(f"unsupported PIN source{shown} (use file:/path or env:NAME)")
    try:
        text = read_private_file(path, "PIN file").decode("utf-8")
    except PrivateFileError as exc:
        raise PinError(str(exc)) from None
    except UnicodeDecodeError:
        raise PinError(f"PIN file {path} is not UTF-8 text") from None
    pin = text.splitlines()[0] if text else ""
    if not pin:
        raise PinError(f"PIN file {path} is empty")
    return pin


@dataclass(frozen=True)
class TokenConfig:
    """Which token to use: module path, token label and where the user PIN comes from."""

    label: str
    pin_source: str
    module: str = ""
    #: SoftHSM2 only: the SOFTHSM2_CONF to use (a private token directory); empty = the process environment.
    softhsm_conf: str = ""

    @property
    def module_path(self) -> str:
        return self.module or default_module()


def load_module(path: str):
    """Load a PKCS#11 module with python-pkcs11, turning loader failures into ModuleNotFound."""
    import pkcs11

    if not os.path.exists(path):
        raise ModuleNotFound(f"PKCS#11 module not found: {path}")
    try:
        return pkcs11.lib(path)
    except pkcs11.PKCS11Error as exc:
        raise ModuleNotFound(f"cannot load PKCS#11 module {path}: {exc}") from None


def find_token(lib, label: str, module_path: str):
    """The one token with this label; slots are never addressed by number (SoftHSM renumbers them)."""
    import pkcs11

    try:
        return lib.get_token(token_label=label)
    except pkcs11.NoSuchToken:
        raise TokenNotFound(f"no token labelled {label!r} in PKCS#11 module {module_path}") from None
    except pkcs11.MultipleTokensReturned:
        raise TokenNotFound(f"more than one token labelled {label!r} in {module_path}; labels must be unique") from None


@contextlib.contextmanager
def open_session(cfg: TokenConfig, rw: bool = False) -> Iterator["object"]:
    """A logged-in python-pkcs11 session on the configured token, closed on exit.

    Call this only in a process that does not also run the TLS stack on the same token
    (see hsm.worker): python-pkcs11 and the OpenSSL engine/provider must not share PKCS#11 state.
    """
    import pkcs11

    if cfg.softhsm_conf:
        os.environ["SOFTHSM2_CONF"] = cfg.softhsm_conf
    lib = load_module(cfg.module_path)
    token = find_token(lib, cfg.label, cfg.module_path)
    pin = read_pin(cfg.pin_source)
    try:
        session = token.open(user_pin=pin, rw=rw)
    except pkcs11.PinIncorrect:
        raise PinError(f"wrong PIN for token {cfg.label!r}") from None
    except pkcs11.PinLocked:
        raise PinError(f"PIN of token {cfg.label!r} is locked") from None
    except (pkcs11.PinLenRange, pkcs11.PinInvalid):
        raise PinError(f"PIN for token {cfg.label!r} has an invalid length or format") from None
    finally:
        del pin
    try:
        yield session
    finally:
        session.close()
