"""Errors raised by the hsm package: one class per failure a user can act on, each with a one-line message."""

from __future__ import annotations


class HsmError(Exception):
    """Base class. str(err) is one clear line, never containing a PIN."""


class ModuleNotFound(HsmError):
    """The PKCS#11 module (shared library) is missing or cannot be loaded."""


class TokenNotFound(HsmError):
    """No token with the requested label is present in the module."""


class PinError(HsmError):
    """The PIN could not be read, or the token refused it (wrong or locked)."""


class KeyNotFound(HsmError):
    """No key matches the requested label or id."""


class KeyExists(HsmError):
    """A key with that label already exists; Tessera never overwrites token keys."""


class UnsupportedKeyType(HsmError):
    """A key type Tessera does not generate or use."""


class ExportRefused(HsmError):
    """Private key material never leaves the token; every export path raises this."""


class TlsRouteError(HsmError):
    """Neither pkcs11-provider nor the libp11 engine can bring the token key into OpenSSL here."""


class TemplateRefused(HsmError):
    """The token refused a key template; the message names the key type and the templates sent."""


class MechanismRefused(HsmError):
    """The token does not support a mechanism, curve or key size Tessera asked for (named in the message)."""


class KeyUsageRefused(HsmError):
    """A token key is not sign-only (it can decrypt, unwrap, derive or be extracted); Tessera will not use it."""
