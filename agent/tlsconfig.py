"""`tessera-agent tls-config`: the files and command lines third-party OpenSSL tools need to use the device key.

Tools such as `mosquitto_pub` and `openssl s_client` reach a token key through one of two OpenSSL routes:

- pkcs11-provider (OpenSSL 3 provider; Debian 13, Debian 12 from bookworm-backports): an OPENSSL_CONF file loads
  the provider with the token's PKCS#11 module and a ``file:`` PIN source (the PIN itself never in argv or in the
  file), and the key is named either by its ``pkcs11:`` URI (tools that open keys through OSSL_STORE: openssl) or
  by a *URI file* (tools that only read PEM files: mosquitto_pub ``--key``), a PEM block ``PKCS#11 PROVIDER URI``
  holding DER ``SEQUENCE { VisibleString "PKCS#11 Provider URI v1.0", UTF8String uri }``, which the provider's
  decoder turns into the token key. This works with SoftHSM2 and with a TPM through tpm2-pkcs11.
- the libp11 engine (``--tls-engine pkcs11 --keyform engine``): works with SoftHSM2, fails with tpm2-pkcs11.
  mosquitto_pub and the openssl CLI make the engine OpenSSL's default for *every* algorithm
  (ENGINE_set_default(e, ENGINE_METHOD_ALL)); tpm2-pkcs11's own TPM session crypto (tpm2-tss, through the same
  libcrypto) then lands in the engine, the salted auth session fails ("Could not start Auth Session with the
  TPM", "Error unsealing wrapping key"), C_Login fails and the key is "not found". Tessera's own agent loads the
  engine without making it the default, so it is not affected.

So the provider route is what this command writes. The URI file is public (it names the key, it is not the key)
and changes with a key rotation: run the command again after `renew --rotate-key`.
"""

from __future__ import annotations

import base64
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

PEM_LABEL = "PKCS#11 PROVIDER URI"
URI_DESCRIPTION = b"PKCS#11 Provider URI v1.0"
#: environment the token's module reads, passed on to the printed command lines when set here (tpm2-pkcs11's)
MODULE_ENV = ("TPM2_PKCS11_STORE", "TPM2_PKCS11_TCTI", "DBUS_SESSION_BUS_ADDRESS")


def _der(tag: int, body: bytes) -> bytes:
    """One DER TLV (definite length). Two strings in a SEQUENCE are all a URI file holds: no ASN.1 library needed."""
    n = len(body)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + body


def uri_pem(key_uri: str) -> str:
    """The pkcs11-provider URI file for `key_uri` (a PEM block any PEM-reading tool can be given as its key)."""
    if not key_uri.startswith("pkcs11:"):
        raise ValueError(f"not a PKCS#11 URI: {key_uri[:80]!r}")
    der = _der(0x30, _der(0x1A, URI_DESCRIPTION) + _der(0x0C, key_uri.encode("utf-8")))
    b64 = base64.b64encode(der).decode("ascii")
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return "\n".join([f"-----BEGIN {PEM_LABEL}-----", *lines, f"-----END {PEM_LABEL}-----", ""])


def provider_conf(module: str, pin_source: str, provider: str | None = None) -> str:
    """An OPENSSL_CONF that loads the default provider and pkcs11-provider for `module`, the PIN read from a file;
    `provider`: the provider's own file (hsm.tls.provider_path()), named so that a tool loads that one, wherever
    it is, rather than looking for "pkcs11" in its OpenSSL's module directory."""
    if not pin_source.startswith("file:"):
        raise ValueError(f"third-party tools need a file: PIN source (pkcs11-provider reads it itself), not "
                         f"{pin_source.split(':', 1)[0]}:")
    quirks = []
    if "softhsm" in Path(module).name.lower():
        # SoftHSM2 finalized from OpenSSL's exit-time cleanup uses an OpenSSL already torn down: every tool would
        # crash (SIGSEGV) at exit, after its work (openssl/openssl#22508). The process is ending anyway.
        quirks = ["# SoftHSM2 crashes when finalized during OpenSSL's exit cleanup", "pkcs11-module-quirks = no-deinit"]
    return "\n".join([
        "# pkcs11-provider for third-party OpenSSL tools (written by tessera-agent tls-config)",
        "openssl_conf = openssl_init", "",
        "[openssl_init]", "providers = provider_sect", "",
        "[provider_sect]", "default = default_sect", "pkcs11 = pkcs11_sect", "",
        "[default_sect]", "activate = 1", "",
        "[pkcs11_sect]", *([f"module = {provider}"] if provider else []), f"pkcs11-module-path = {module}", f"pkcs11-module-token-pin = {pin_source}",
        *quirks, "activate = 1", ""])


@dataclass(frozen=True)
class ToolSetup:
    """What `tls-config` writes and prints."""

    conf_path: Path
    key_path: Path
    env: dict[str, str]        # besides OPENSSL_CONF: what the token's module needs (SOFTHSM2_CONF)
    mosquitto_pub: list[str]
    s_client: list[str]

    def shell(self, argv: list[str]) -> str:
        pre = " ".join(f"{k}={shlex.quote(v)}" for k, v in {"OPENSSL_CONF": str(self.conf_path), **self.env}.items())
        return f"{pre} {shlex.join(argv)}"


def tool_setup(out: Path, *, device_id: str, key_uri: str, module: str, softhsm_conf: str, cert: Path, ca: Path,
               host: str, port: int) -> ToolSetup:
    env = {"SOFTHSM2_CONF": softhsm_conf} if softhsm_conf else {}
    conf, key = out / "openssl-pkcs11.cnf", out / "device-key.pem"
    pub = ["mosquitto_pub", "-h", host, "-p", str(port), "--cafile", str(ca), "--cert", str(cert), "--key", str(key),
           "-i", device_id, "-q", "1", "-t", f"devices/{device_id}/events", "-m", "hello"]
    s_client = ["openssl", "s_client", "-connect", f"{host}:{port}", "-CAfile", str(ca), "-cert", str(cert),
                "-key", key_uri, "-verify_return_error", "-brief"]
    return ToolSetup(conf, key, env, pub, s_client)


def write(setup: ToolSetup, key_uri: str, module: str, pin_source: str, provider: str | None = None) -> None:
    """Write the OpenSSL config (0600: it names where the PIN is) and the URI file (0644: public), each whole."""
    from .state import write_atomic

    conf_text, key_text = provider_conf(module, pin_source, provider), uri_pem(key_uri)
    setup.conf_path.parent.mkdir(parents=True, exist_ok=True)
    for path, text, mode in ((setup.conf_path, conf_text, 0o600), (setup.key_path, key_text, 0o644)):
        write_atomic(path, text.encode(), mode)
        os.chmod(path, mode)  # whatever the umask
