"""Initialize a PKCS#11 token (C_InitToken + C_InitPIN) with PINs passed on stdin, never in argv.

softhsm2-util and pkcs11-tool only take PINs on the command line or a terminal, and python-pkcs11 has no
C_InitToken, so this small ctypes routine does it in a child process (fresh PKCS#11 state, its own env).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

from .errors import HsmError, ModuleNotFound

CKF_RW_SESSION = 0x2
CKF_SERIAL_SESSION = 0x4
CKF_TOKEN_INITIALIZED = 0x400
CKU_SO = 0
_TOKEN_INFO_FLAGS_OFFSET = 96  # label[32] manufacturerID[32] model[16] serialNumber[16], then CK_FLAGS


class TokenExists(HsmError):
    """init_token: a token with that label is already initialized (nothing was changed)."""


def _exists(label: str) -> str:
    return f"a token labelled {label!r} already exists"


def init_token(module: str, label: str, so_pin: str, user_pin: str, env: dict[str, str] | None = None) -> None:
    """Initialize the first free token of `module` with `label` and set its user PIN.

    Runs in a child process so that no PKCS#11 state is left in the caller; PINs travel on stdin.
    Refuses a label that already exists.
    """
    if not os.path.exists(module):
        raise ModuleNotFound(f"PKCS#11 module not found: {module}")
    if not label or len(label.encode()) > 32:
        raise HsmError("token label must be 1..32 bytes")
    env = dict(os.environ if env is None else env)
    root = str(Path(__file__).resolve().parent.parent)  # so the child finds hsm/ even when not installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    payload = json.dumps({"module": module, "label": label, "so_pin": so_pin, "user_pin": user_pin})
    proc = subprocess.run(
        [sys.executable, "-m", "hsm.tokeninit"], input=payload, capture_output=True, text=True,
        env=env, timeout=60,
    )
    if proc.returncode != 0:
        msg = (proc.stderr.strip().splitlines() or ["token initialization failed"])[-1].removeprefix("error: ")
        raise (TokenExists if msg == _exists(label) else HsmError)(msg)


def _check(rv: int, what: str) -> None:
    if rv != 0:
        raise HsmError(f"{what} failed with CKR 0x{rv:08x}")


def _slots(lib) -> list[int]:
    count = ctypes.c_ulong(0)
    _check(lib.C_GetSlotList(1, None, ctypes.byref(count)), "C_GetSlotList")
    arr = (ctypes.c_ulong * max(count.value, 1))()
    _check(lib.C_GetSlotList(1, arr, ctypes.byref(count)), "C_GetSlotList")
    return list(arr[: count.value])


def _token_info(lib, slot: int) -> tuple[str, int]:
    buf = ctypes.create_string_buffer(1024)
    _check(lib.C_GetTokenInfo(ctypes.c_ulong(slot), buf), "C_GetTokenInfo")
    label = buf.raw[:32].decode("utf-8", "replace").rstrip(" \0")
    flags = ctypes.c_ulong.from_buffer_copy(buf.raw, _TOKEN_INFO_FLAGS_OFFSET).value
    return label, flags


def _run(module: str, label: str, so_pin: bytes, user_pin: bytes) -> None:
    lib = ctypes.CDLL(module)
    for name in ("C_Initialize", "C_Finalize", "C_GetSlotList", "C_GetTokenInfo", "C_InitToken",
                 "C_OpenSession", "C_Login", "C_InitPIN", "C_Logout", "C_CloseSession"):
        getattr(lib, name).restype = ctypes.c_ulong
    lib.C_GetSlotList.argtypes = [ctypes.c_ubyte, ctypes.c_void_p, ctypes.POINTER(ctypes.c_ulong)]
    lib.C_GetTokenInfo.argtypes = [ctypes.c_ulong, ctypes.c_void_p]
    lib.C_InitToken.argtypes = [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    lib.C_OpenSession.argtypes = [ctypes.c_ulong, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.POINTER(ctypes.c_ulong)]
    lib.C_Login.argtypes = [ctypes.c_ulong, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong]
    lib.C_InitPIN.argtypes = [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong]
    lib.C_Logout.argtypes = [ctypes.c_ulong]
    lib.C_CloseSession.argtypes = [ctypes.c_ulong]
    lib.C_Initialize.argtypes = [ctypes.c_void_p]
    lib.C_Finalize.argtypes = [ctypes.c_void_p]
    _check(lib.C_Initialize(None), "C_Initialize")
    try:
        free = None
        for slot in _slots(lib):
            tlabel, flags = _token_info(lib, slot)
            if flags & CKF_TOKEN_INITIALIZED and tlabel == label:
                raise HsmError(_exists(label))
            if not flags & CKF_TOKEN_INITIALIZED and free is None:
                free = slot
        if free is None:
            raise HsmError("no free (uninitialized) token slot in the module")
        padded = label.encode().ljust(32, b" ")
        _check(lib.C_InitToken(free, so_pin, len(so_pin), padded), "C_InitToken")
        slot = next((s for s in _slots(lib) if _token_info(lib, s)[0] == label), None)
        if slot is None:
            raise HsmError(f"token {label!r} vanished after initialization")
        session = ctypes.c_ulong(0)
        _check(lib.C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, None, None, ctypes.byref(session)),
               "C_OpenSession")
        _check(lib.C_Login(session, CKU_SO, so_pin, len(so_pin)), "C_Login(SO)")
        _check(lib.C_InitPIN(session, user_pin, len(user_pin)), "C_InitPIN")
        lib.C_Logout(session)
        lib.C_CloseSession(session)
    finally:
        lib.C_Finalize(None)


def main() -> int:
    try:
        req = json.loads(sys.stdin.read())
        _run(req["module"], req["label"], req["so_pin"].encode(), req["user_pin"].encode())
    except HsmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OSError, KeyError, ValueError) as exc:
        print(f"error: token initialization failed: {exc.__class__.__name__}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
