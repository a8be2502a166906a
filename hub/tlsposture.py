"""The hub's TLS posture, in one place: every listener (EST, the fleet API, MQTT) speaks TLS 1.2 or 1.3 only, and
TLS 1.2 with ECDHE and an AEAD cipher only (no CBC, no RSA key exchange, no SHA-1 MACs); TLS 1.3's suites are
OpenSSL's defaults, all AEAD. No renegotiation, no compression.
"""

from __future__ import annotations

import ssl

#: TLS 1.2 suites, OpenSSL names (also Mosquitto's `ciphers` option): ECDHE + AES-GCM / ChaCha20-Poly1305.
CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:"
           "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-CHACHA20-POLY1305")
MIN_VERSION = ssl.TLSVersion.TLSv1_2
#: MIN_VERSION in the words of Mosquitto's `tls_version` (the listener's minimum; 1.3 stays on): the broker's
#: config takes it from here, like `ciphers`, so the MQTT listener cannot drift from the Python ones
MOSQUITTO_TLS_VERSION = {ssl.TLSVersion.TLSv1_2: "tlsv1.2", ssl.TLSVersion.TLSv1_3: "tlsv1.3"}[MIN_VERSION]


def harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Apply the posture to a server (or client) context; returns it."""
    ctx.minimum_version = MIN_VERSION
    ctx.set_ciphers(CIPHERS)
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx
