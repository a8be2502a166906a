"""Every listener of a running hub (EST, fleet API, MQTT) has the one TLS posture of hub/tlsposture.py:
TLS 1.2 or 1.3 only; TLS 1.2 with ECDHE + AEAD suites only (CBC and static-RSA suites refused)."""

from __future__ import annotations

import socket
import ssl

import pytest

from hub.tlsposture import CIPHERS
from tests.helpers import free_port
from tests.integration.hubfixtures import running_hub


@pytest.fixture(scope="module")
def listeners(tmp_path_factory):
    with running_hub(tmp_path_factory.mktemp("tls"), api_port=free_port()) as hub:
        tls = hub.dir / "tls"
        # EST asks for a client certificate only optionally; the API and MQTT require one (the hub's admin one)
        yield hub, {"est": (hub.port, None), "api": (hub.api_port, tls), "mqtt": (hub.mqtt_port, tls)}


def _handshake(hub, port: int, creds, *, version: ssl.TLSVersion | None = None, ciphers: str | None = None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(hub.root_pem))
    ctx.check_hostname = False
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    if creds is not None:
        ctx.load_cert_chain(str(creds / "admin.pem"), str(creds / "admin.key"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw) as tls:
            return tls.version(), tls.cipher()[0]


@pytest.mark.parametrize("name", ["est", "api", "mqtt"])
def test_modern_clients_get_an_aead_suite(listeners, name):
    hub, table = listeners
    port, creds = table[name]
    assert _handshake(hub, port, creds)[0] == "TLSv1.3"
    version, cipher = _handshake(hub, port, creds, version=ssl.TLSVersion.TLSv1_2)
    assert version == "TLSv1.2" and cipher in CIPHERS.split(":") and ("GCM" in cipher or "CHACHA20" in cipher)


@pytest.mark.parametrize("name", ["est", "api", "mqtt"])
@pytest.mark.parametrize("ciphers", ["ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:AES128-SHA",  # CBC + SHA-1
                                     "ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES256-SHA384",  # CBC
                                     "AES128-GCM-SHA256:AES256-GCM-SHA384"])  # static RSA key exchange
def test_weak_tls12_suites_are_refused(listeners, name, ciphers):
    hub, table = listeners
    port, creds = table[name]
    with pytest.raises(ssl.SSLError):
        _handshake(hub, port, creds, version=ssl.TLSVersion.TLSv1_2, ciphers=ciphers)


@pytest.mark.parametrize("name", ["est", "api", "mqtt"])
def test_tls_below_1_2_is_refused(listeners, name):
    hub, table = listeners
    port, creds = table[name]
    ctx_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        _handshake(hub, port, creds, version=ctx_version, ciphers="ALL:@SECLEVEL=0")
