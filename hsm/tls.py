"""An ssl.SSLContext whose private key stays in a PKCS#11 token, for paho-mqtt and http.client.

Python's ssl module can only load keys from files, so the token key is put into the context's SSL_CTX
through OpenSSL's C API (ctypes), using whichever route is installed, chosen at run time:

- ``provider``: pkcs11-provider (OpenSSL 3 provider; Debian 13, bookworm-backports on Debian 12) — the key is
  opened through OSSL_STORE; the provider is loaded by the path it was found at (PROVIDER_DIRS, or
  $TESSERA_PKCS11_PROVIDER), not by name from OpenSSL's own module directory;
- ``engine``:   the libp11 engine (libengine-pkcs11-openssl, Debian 12 and 13) — ENGINE_load_private_key.

$TESSERA_TLS_ROUTE (provider|engine) forces one; otherwise the provider is used where installed, and the engine
takes over only when the provider failed before a PIN reached the token. Never is a PIN tried on a second route,
nor twice on one: each refusal counts towards the token's lockout. pkcs11-provider gets the PIN from a callback that
answers once per load (a second request gets no PIN, so no second C_Login); since the provider drops the login
error from OpenSSL's error queue, a load that found no key after the PIN was handed out is told apart by a second,
PIN-less look at the token: asked for a PIN again, the token is not logged in, so it refused the PIN.

Either way the SSL_CTX gets an EVP_PKEY whose signing calls C_Sign in the token: one per handshake.
This needs a Python whose _ssl links the system libssl (so ctypes and ssl share one OpenSSL); anything else is
refused with TlsRouteError. The PKCS#11 state lives in OpenSSL in this process: do not use python-pkcs11 on the
same token here (hsm.worker runs key management in a separate process for that reason).
"""

from __future__ import annotations

import ctypes
import logging
import os
import ssl
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

from .errors import HsmError, ModuleNotFound, PinError, TlsRouteError
from .token import TokenConfig, read_pin

ENGINE_DIRS = ("/usr/lib/x86_64-linux-gnu/engines-3", "/usr/lib/aarch64-linux-gnu/engines-3",
               "/usr/lib/arm-linux-gnueabihf/engines-3", "/usr/lib/engines-3", "/usr/local/lib/engines-3")
PROVIDER_DIRS = ("/usr/lib/x86_64-linux-gnu/ossl-modules", "/usr/lib/aarch64-linux-gnu/ossl-modules",
                 "/usr/lib/arm-linux-gnueabihf/ossl-modules", "/usr/lib/ossl-modules", "/usr/local/lib/ossl-modules")

PROVIDER_ENV = "TESSERA_PKCS11_PROVIDER"  # pkcs11-provider's module file, where it is in none of PROVIDER_DIRS
ROUTE_ENV = "TESSERA_TLS_ROUTE"

log = logging.getLogger("tessera.hsm.tls")

_lock = threading.Lock()
_engines: dict[tuple[str, str], int] = {}  # (module, conf) -> initialized ENGINE*, kept for the process lifetime
_provider: dict[str, str] = {}  # the provider loaded in this process: {"path", "module", "conf"}
_routes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # ssl.SSLContext -> route its token key came by


class _RouteUnusable(Exception):
    """The provider route failed before any PIN reached the token, so the engine may take over; `error` is what
    to raise where it may not."""

    def __init__(self, error: HsmError):
        super().__init__(str(error))
        self.error = error


def _find(dirs, name: str) -> str | None:
    return next((os.path.join(d, name) for d in dirs if os.path.exists(os.path.join(d, name))), None)


def provider_path() -> str | None:
    """pkcs11-provider's module: $TESSERA_PKCS11_PROVIDER if set (None if no such file), else the first
    PROVIDER_DIRS/pkcs11.so."""
    explicit = os.environ.get(PROVIDER_ENV, "").strip()
    if explicit:
        return explicit if os.path.isfile(explicit) else None
    return _find(PROVIDER_DIRS, "pkcs11.so")


def available_routes() -> list[str]:
    """Routes usable on this machine, best first."""
    routes = []
    if provider_path():
        routes.append("provider")
    if _find(ENGINE_DIRS, "pkcs11.so") or _find(ENGINE_DIRS, "libpkcs11.so"):
        routes.append("engine")
    return routes


def choose_route() -> str:
    """$TESSERA_TLS_ROUTE if set (provider|engine), else the best available route."""
    routes = available_routes()
    forced = os.environ.get(ROUTE_ENV, "").strip()
    if forced:
        if forced not in ("provider", "engine"):
            raise TlsRouteError(f"TESSERA_TLS_ROUTE must be 'provider' or 'engine', not {forced!r}")
        if forced not in routes:
            where = f" (${PROVIDER_ENV} names no file)" if forced == "provider" and os.environ.get(PROVIDER_ENV) \
                else ""
            raise TlsRouteError(f"TLS route {forced!r} is not installed here{where} (available: {routes or 'none'})")
        return forced
    if not routes:
        raise TlsRouteError("cannot use a token key for TLS: install pkcs11-provider or libengine-pkcs11-openssl")
    return routes[0]


@dataclass
class _OpenSSL:
    ssl: ctypes.CDLL
    crypto: ctypes.CDLL


_libs: _OpenSSL | None = None


def _linked_lib(prefix: str) -> str | None:
    """Path of the shared library named prefix* mapped into this process (after `import _ssl`)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.rsplit(None, 1)[-1]
            if os.path.basename(path).startswith(prefix):
                return path
    return None


def _openssl() -> _OpenSSL:
    global _libs
    if _libs is not None:
        return _libs
    import _ssl  # noqa: F401  (maps libssl into the process when dynamically linked)

    ssl_path, crypto_path = _linked_lib("libssl.so"), _linked_lib("libcrypto.so")
    if not ssl_path or not crypto_path:
        raise TlsRouteError("this Python's ssl module is not linked to a shared libssl (statically linked "
                            "OpenSSL?): token keys need a Python built against the system OpenSSL")
    libssl, libcrypto = ctypes.CDLL(ssl_path), ctypes.CDLL(crypto_path)
    libcrypto.OpenSSL_version_num.restype = ctypes.c_ulong
    libcrypto.OpenSSL_version_num.argtypes = []
    if libcrypto.OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
        raise TlsRouteError(f"the libcrypto mapped here ({crypto_path}) is not the one Python's ssl uses")
    vp, cp, i, ul, u64 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_ulong, ctypes.c_uint64
    sigs = {
        libssl: {
            "SSL_CTX_use_certificate_chain_file": (i, [vp, cp]), "SSL_CTX_use_PrivateKey": (i, [vp, vp]),
            "SSL_CTX_check_private_key": (i, [vp]), "SSL_CTX_get_verify_mode": (i, [vp]),
            "SSL_CTX_get_options": (u64, [vp]),
        },
        libcrypto: {
            "ENGINE_by_id": (vp, [cp]), "ENGINE_init": (i, [vp]), "ENGINE_free": (i, [vp]),
            "ENGINE_ctrl_cmd_string": (i, [vp, cp, cp, i]), "ENGINE_load_private_key": (vp, [vp, cp, vp, vp]),
            "EVP_PKEY_free": (None, [vp]), "ERR_get_error": (ul, []), "ERR_error_string_n": (None, [ul, cp, ctypes.c_size_t]),
            "ERR_clear_error": (None, []),
            "OSSL_PROVIDER_load": (vp, [vp, cp]), "OSSL_STORE_open": (vp, [cp, vp, vp, vp, vp]),
            "OSSL_STORE_load": (vp, [vp]), "OSSL_STORE_eof": (i, [vp]), "OSSL_STORE_close": (i, [vp]),
            "OSSL_STORE_INFO_get_type": (i, [vp]), "OSSL_STORE_INFO_get1_PKEY": (vp, [vp]),
            "OSSL_STORE_INFO_free": (None, [vp]),
            "UI_UTIL_wrap_read_pem_callback": (vp, [vp, i]), "UI_destroy_method": (None, [vp]),
        },
    }
    for lib, table in sigs.items():
        for name, (res, args) in table.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
    _libs = _OpenSSL(libssl, libcrypto)
    return _libs


_NO_ERROR = "no OpenSSL error recorded"


def _err(libs: _OpenSSL) -> str:
    msgs = []
    while code := libs.crypto.ERR_get_error():
        buf = ctypes.create_string_buffer(256)
        libs.crypto.ERR_error_string_n(code, buf, 256)
        msgs.append(buf.value.decode(errors="replace"))
    return "; ".join(msgs[-2:]) or _NO_ERROR


def _ssl_ctx_pointer(ctx: ssl.SSLContext, libs: _OpenSSL) -> int:
    """The SSL_CTX* inside an ssl.SSLContext (first field after PyObject_HEAD), checked before use."""
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr:
        raise TlsRouteError("could not find the SSL_CTX inside ssl.SSLContext")
    expect = 3 if ctx.verify_mode == ssl.CERT_REQUIRED else None  # SSL_VERIFY_PEER|FAIL_IF_NO_PEER_CERT
    if (expect is not None and libs.ssl.SSL_CTX_get_verify_mode(ptr) != expect) \
            or libs.ssl.SSL_CTX_get_options(ptr) != int(ctx.options):
        raise TlsRouteError("ssl.SSLContext layout is not the one expected (unsupported Python build)")
    return ptr


def _engine_key(libs: _OpenSSL, token: TokenConfig, key_uri: str) -> int:
    c = libs.crypto
    cache_key = (token.module_path, os.environ.get("SOFTHSM2_CONF", ""))
    with _lock:
        engine = _engines.get(cache_key)
        if engine is None:
            engine = c.ENGINE_by_id(b"pkcs11")
            if not engine:
                so_path = _find(ENGINE_DIRS, "pkcs11.so") or _find(ENGINE_DIRS, "libpkcs11.so")
                engine = c.ENGINE_by_id(b"dynamic")
                if not engine or c.ENGINE_ctrl_cmd_string(engine, b"SO_PATH", so_path.encode(), 0) != 1 \
                        or c.ENGINE_ctrl_cmd_string(engine, b"LOAD", None, 0) != 1:
                    raise TlsRouteError(f"cannot load the libp11 engine: {_err(libs)}")
            if c.ENGINE_ctrl_cmd_string(engine, b"MODULE_PATH", token.module_path.encode(), 0) != 1 \
                    or c.ENGINE_init(engine) != 1:
                c.ENGINE_free(engine)
                raise TlsRouteError(f"cannot initialise the libp11 engine with {token.module_path}: {_err(libs)}")
            _engines[cache_key] = engine
        pin = read_pin(token.pin_source).encode()
        if c.ENGINE_ctrl_cmd_string(engine, b"PIN", pin, 0) != 1:
            raise HsmError(f"the libp11 engine refused the PIN setting: {_err(libs)}")
        del pin
        pkey = c.ENGINE_load_private_key(engine, key_uri.encode(), None, None)
    if not pkey:
        detail = _err(libs)
        if "PIN" in detail.upper() and "INCORRECT" in detail.upper():
            raise PinError(f"wrong PIN for the token holding {key_uri}")
        raise HsmError(f"cannot load token key {key_uri} through the libp11 engine "
                       f"(missing token or key?): {detail}")
    return pkey


#: pem_password_cb(buf, size, rwflag, userdata): what UI_UTIL_wrap_read_pem_callback makes a UI_METHOD of.
_PEM_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p)


class _PinOnce:
    """The PIN for one OSSL_STORE load: handed out on the first request only; any later one (another slot, a
    retry) gets an empty answer, which the provider takes as no PIN (CKR_CANCEL, no C_Login)."""

    def __init__(self, pin: bytes | None):
        self._pin = pin
        self.asked = 0
        self.callback = _PEM_CB(self._answer)

    def _answer(self, buf, size, _rwflag, _userdata) -> int:
        self.asked += 1
        pin, self._pin = self._pin, None
        if not pin or len(pin) >= size:
            return 0
        ctypes.memmove(buf, pin, len(pin))
        return len(pin)


def _store_load(libs: _OpenSSL, uri: str, pin: _PinOnce) -> int | None:
    """The first private key OSSL_STORE finds at `uri` (EVP_PKEY*), the PIN asked for through `pin`; None if none."""
    c = libs.crypto
    method = c.UI_UTIL_wrap_read_pem_callback(ctypes.cast(pin.callback, ctypes.c_void_p), 0)
    if not method:
        raise _RouteUnusable(TlsRouteError(f"cannot make a PIN callback for pkcs11-provider: {_err(libs)}"))
    try:
        store = c.OSSL_STORE_open(uri.encode(), method, None, None, None)
        if not store:
            raise _RouteUnusable(HsmError(f"cannot open token key {uri} through pkcs11-provider: {_err(libs)}"))
        pkey = None
        try:
            while not pkey and not c.OSSL_STORE_eof(store):
                info = c.OSSL_STORE_load(store)
                if info:
                    if c.OSSL_STORE_INFO_get_type(info) == 4:  # OSSL_STORE_INFO_PKEY
                        pkey = c.OSSL_STORE_INFO_get1_PKEY(info)
                    c.OSSL_STORE_INFO_free(info)
        finally:
            c.OSSL_STORE_close(store)
        return pkey
    finally:
        c.UI_destroy_method(method)


def _load_provider(libs: _OpenSSL, token: TokenConfig) -> None:
    """Load pkcs11-provider (once per process, for one PKCS#11 module) by the path it was found at."""
    c = libs.crypto
    conf = os.environ.get("SOFTHSM2_CONF", "")
    if _provider:
        if (_provider["module"], _provider["conf"]) != (token.module_path, conf):
            raise TlsRouteError(f"pkcs11-provider is already loaded in this process for {_provider['module']}; "
                                f"a second PKCS#11 module ({token.module_path}) needs a process of its own")
        return
    path = provider_path()
    if not path:
        raise _RouteUnusable(TlsRouteError("pkcs11-provider is not installed here"))
    # The provider reads its PKCS#11 module from the environment once, when it is loaded.
    os.environ["PKCS11_PROVIDER_MODULE"] = token.module_path
    # By path: a bare name ("pkcs11") is looked up in OpenSSL's module directory ($OPENSSL_MODULES) only.
    if not c.OSSL_PROVIDER_load(None, b"default") or not c.OSSL_PROVIDER_load(None, os.fsencode(path)):
        raise _RouteUnusable(TlsRouteError(f"cannot load pkcs11-provider from {path}: {_err(libs)}"))
    _provider.update(path=path, module=token.module_path, conf=conf)


def _provider_key(libs: _OpenSSL, token: TokenConfig, key_uri: str) -> int:
    with _lock:
        _load_provider(libs, token)
        pin = _PinOnce(read_pin(token.pin_source).encode())
        pkey = _store_load(libs, key_uri, pin)
        if pkey:
            return pkey
        detail = _err(libs)
        if not pin.asked:  # no login now: no token matched, or one this process logged into lacks the key
            raise _RouteUnusable(HsmError(f"no private key found at {key_uri} through pkcs11-provider (no such "
                                          f"token, or no such key)" + ("" if detail == _NO_ERROR else f": {detail}")))
        # The PIN was handed out. The provider drops C_Login's error, so look again without a PIN: a token that
        # asks for one is not logged in, so it refused the PIN; one that does not is logged in and lacks the key.
        probe = _PinOnce(None)
        leftover = _store_load(libs, key_uri, probe)
        if leftover:
            libs.crypto.EVP_PKEY_free(leftover)
        libs.crypto.ERR_clear_error()
    if probe.asked:
        raise PinError(f"wrong PIN for the token holding {key_uri} (the token refused it through pkcs11-provider)")
    raise HsmError(f"no private key found at {key_uri} through pkcs11-provider (the token took the PIN)"
                   + ("" if detail == _NO_ERROR else f": {detail}"))


def route_of(ctx: ssl.SSLContext) -> str | None:
    """The route the token key in `ctx` was loaded by (use_token_key), None for a context without one."""
    return _routes.get(ctx)


def use_token_key(ctx: ssl.SSLContext, cert_chain: str | os.PathLike, key_uri: str, token: TokenConfig,
                  route: str | None = None) -> str:
    """Load `cert_chain` (PEM, leaf first) and the token key `key_uri` into `ctx`; returns the route used.

    `route` (or $TESSERA_TLS_ROUTE) forces one; otherwise pkcs11-provider where installed, the engine taking over
    only when the provider failed before the PIN reached the token."""
    forced = route is not None or bool(os.environ.get(ROUTE_ENV, "").strip())
    chosen = route or choose_route()
    if token.softhsm_conf:
        os.environ["SOFTHSM2_CONF"] = token.softhsm_conf
    if not Path(cert_chain).is_file():
        raise HsmError(f"certificate chain file not found: {cert_chain}")
    if not os.path.exists(token.module_path):
        raise ModuleNotFound(f"PKCS#11 module not found: {token.module_path}")
    libs = _openssl()
    libs.crypto.ERR_clear_error()
    ptr = _ssl_ctx_pointer(ctx, libs)
    try:
        pkey = (_provider_key if chosen == "provider" else _engine_key)(libs, token, key_uri)
    except _RouteUnusable as exc:
        # Only failures before any PIN use land here (a PinError or a key not found after login never do).
        if forced or "engine" not in available_routes():
            raise exc.error from None
        log.warning("pkcs11-provider could not load %s (%s); using the libp11 engine", key_uri, exc)
        libs.crypto.ERR_clear_error()
        chosen = "engine"
        pkey = _engine_key(libs, token, key_uri)
    try:
        if libs.ssl.SSL_CTX_use_PrivateKey(ptr, pkey) != 1:
            raise HsmError(f"OpenSSL refused the token key: {_err(libs)}")
    finally:
        libs.crypto.EVP_PKEY_free(pkey)  # the SSL_CTX holds its own reference
    # Key first, then the chain: on a mismatch OpenSSL drops the key quietly and the check below names both.
    if libs.ssl.SSL_CTX_use_certificate_chain_file(ptr, os.fsencode(cert_chain)) != 1:
        raise HsmError(f"cannot load certificate chain {cert_chain}: {_err(libs)}")
    if libs.ssl.SSL_CTX_check_private_key(ptr) != 1:
        raise HsmError(f"the token key {key_uri} does not match the certificate in {cert_chain}")
    _routes[ctx] = chosen
    log.info("token key %s loaded through the %s route", key_uri, chosen)
    return chosen


def client_context(cafile: str | os.PathLike, cert_chain: str | os.PathLike, key_uri: str, token: TokenConfig,
                   route: str | None = None) -> ssl.SSLContext:
    """A TLS >= 1.2 client context trusting only `cafile` (no system store), authenticating with the token key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=os.fspath(cafile))
    use_token_key(ctx, cert_chain, key_uri, token, route)
    return ctx
