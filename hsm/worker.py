"""Key management in a short-lived spawned child process, so python-pkcs11 never shares PKCS#11 state with TLS.

The agent's TLS stack holds the token through OpenSSL (engine/provider) in its own process; python-pkcs11 in the
same process would C_Initialize the module twice, and closing its session logs the TLS stack out. So every
python-pkcs11 operation the agent needs runs here, in a fresh process started with the *spawn* method (PKCS#11
state must not cross a fork). The PIN is read inside the child from its pin-source; nothing secret is in argv.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, TypeVar

from .errors import HsmError
from .keys import DEFAULT_KEY_TYPE, KeyInfo
from .token import TokenConfig

T = TypeVar("T")


def run_isolated(fn: Callable[..., T], *args, timeout: float = 120.0) -> T:
    """Run fn(*args) in a fresh spawned process and return its result (exceptions are re-raised here)."""
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    try:
        result = pool.submit(fn, *args).result(timeout=timeout)
    except BrokenProcessPool:
        pool.shutdown(wait=False, cancel_futures=True)
        raise HsmError("the key worker process died (PKCS#11 module crashed?)") from None
    except FuturesTimeout:
        for proc in list(getattr(pool, "_processes", {}).values()):  # a hung module must not hang us
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        raise HsmError(f"the key worker did not answer within {timeout:.0f} s") from None
    except BaseException:
        pool.shutdown(wait=True)
        raise
    pool.shutdown(wait=True)
    return result


# --- functions that run in the child -------------------------------------------------------------------------

def _generate(cfg: TokenConfig, label: str, key_type: str, key_id: bytes | None) -> KeyInfo:
    from .keys import generate_keypair
    from .token import open_session

    with open_session(cfg, rw=True) as session:
        return generate_keypair(session, label, key_type, key_id)


def _info(cfg: TokenConfig, label: str | None, key_id: bytes | None) -> KeyInfo:
    from .keys import key_info
    from .token import open_session

    with open_session(cfg) as session:
        return key_info(session, label, key_id)


def _csr(cfg: TokenConfig, label: str | None, key_id: bytes | None, common_name: str | None) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    from .keys import load_private_key
    from .token import open_session

    with open_session(cfg) as session:
        key = load_private_key(session, label, key_id)
        names = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
        csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names)).sign(key, hashes.SHA256())
        return csr.public_bytes(serialization.Encoding.DER)


def _delete(cfg: TokenConfig, label: str, key_id: bytes | None) -> int:
    from .keys import find_private_key, find_public_key
    from .token import open_session

    with open_session(cfg, rw=True) as session:
        priv = find_private_key(session, label, key_id)
        pub_id = bytes(priv.id)
        priv.destroy()
        try:
            find_public_key(session, key_id=pub_id).destroy()
        except Exception:  # a token may not keep the public half as an object
            pass
        return 1


# --- the API the agent and tools call --------------------------------------------------------------------------

def generate_key(cfg: TokenConfig, label: str, key_type: str = DEFAULT_KEY_TYPE,
                 key_id: bytes | None = None) -> KeyInfo:
    """Generate a token key pair (non-extractable, sign-only) in a child process."""
    return run_isolated(_generate, cfg, label, key_type, key_id)


def describe_key(cfg: TokenConfig, label: str | None = None, key_id: bytes | None = None) -> KeyInfo:
    """Label, id, type, public key and URI of a token key, read in a child process."""
    return run_isolated(_info, cfg, label, key_id)


def make_csr(cfg: TokenConfig, label: str | None = None, key_id: bytes | None = None,
             common_name: str | None = None) -> bytes:
    """A DER PKCS#10 request signed in the token (SHA-256), built in a child process."""
    return run_isolated(_csr, cfg, label, key_id, common_name)


def delete_key(cfg: TokenConfig, label: str, key_id: bytes | None = None) -> None:
    """Destroy a token key pair (after a key rotation, once the new certificate is stored)."""
    run_isolated(_delete, cfg, label, key_id)
