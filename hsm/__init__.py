"""PKCS#11 token layer: tokens by label, token key pairs, RFC 7512 URIs, token keys in TLS contexts.

The safe API is small: hsm.token (TokenConfig, open_session), hsm.keys (generate/find, TokenPrivateKey classes),
hsm.worker (key management in an isolated process), hsm.tls (SSLContext with a token key), hsm.uri (RFC 7512).
"""

from .errors import HsmError
from .token import TokenConfig

__all__ = ["HsmError", "TokenConfig"]
