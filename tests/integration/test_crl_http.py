"""The device CRL over plain HTTP (RFC 5280 8) from a real `tessera-hub serve`: the bytes the hub published, a
revocation showing up, conditional GETs, and nothing but the two CRLs (no other method, path or traversal).

One hub for the module (about 3 s to start), its listener on the port fleet.toml names, so a new certificate's
first distribution point is this listener and the test follows it like a relying party would.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import time
import urllib.request

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.estclient import EstClient
from tests.helpers import free_port
from tests.integration.hubfixtures import LENIENT_LIMITS, init_hub, make_csr, new_key, openssl

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    h = init_hub(tmp_path_factory.mktemp("crlhttp"), **LENIENT_LIMITS, header_timeout=3.0)
    h.crl_port = free_port()
    toml = h.dir / "fleet.toml"
    toml.write_text(toml.read_text().replace("# http_port = 8080", f"http_port = {h.crl_port}"))
    h.start()
    try:
        yield h
    finally:
        assert h.stop() == 0, h.stderr_path.read_text(errors="replace")


def http(hub, method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b"",
         timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send exactly `method target` (no normalisation on the way) and read the answer until the server closes."""
    head = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{hub.crl_port}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    data = b""
    with socket.create_connection(("127.0.0.1", hub.crl_port), timeout=timeout) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        while chunk := sock.recv(65536):
            data += chunk
    head_part, _, rest = data.partition(b"\r\n\r\n")
    lines = head_part.decode("latin-1").split("\r\n")
    found = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        found[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), found, rest


def published(hub) -> bytes:
    return (hub.dir / "crl" / "device.crl").read_bytes()


def device_ca(hub) -> x509.Certificate:
    return x509.load_pem_x509_certificate(hub.device_ca_pem.read_bytes())


def enroll(hub, device_id: str) -> x509.Certificate:
    token = hub.add_device(device_id)
    return EstClient(hub.url, cafile=str(hub.root_pem)).simpleenroll(make_csr(new_key(), device_id), device_id,
                                                                      token)[0]


def test_serve_announces_the_listener(hub):
    assert f"CRL   http://127.0.0.1:{hub.crl_port}/crl/device.crl" in hub.stdout_text()


def test_the_device_crl_over_http_is_the_published_one(hub, tmp_path):
    status, headers, body = http(hub, "GET", "/crl/device.crl")
    assert status == 200 and headers["content-type"] == "application/pkix-crl"
    assert body == published(hub) and int(headers["content-length"]) == len(body)
    crl = x509.load_der_x509_crl(body)
    assert crl.issuer == device_ca(hub).subject and crl.is_signature_valid(device_ca(hub).public_key())
    (tmp_path / "device.crl").write_bytes(body)
    proc = openssl("crl", "-inform", "DER", "-in", str(tmp_path / "device.crl"), "-noout", "-CAfile",
                   str(hub.device_ca_pem))
    assert proc.returncode == 0 and b"verify OK" in proc.stderr + proc.stdout, proc.stderr
    assert headers["etag"] == f'"{hashlib.sha256(body).hexdigest()[:32]}"'
    assert headers["last-modified"] == crl.last_update_utc.strftime("%a, %d %b %Y %H:%M:%S GMT")
    max_age = int(headers["cache-control"].split("max-age=")[1].split(",")[0])
    assert 0 < max_age <= 300 and "public" in headers["cache-control"]

    assert http(hub, "GET", f"http://127.0.0.1:{hub.crl_port}/crl/device.crl")[2] == body  # absolute-form
    status, head_headers, head_body = http(hub, "HEAD", "/crl/device.crl?cache-buster=1")
    assert status == 200 and head_body == b""
    assert {k: head_headers[k] for k in ("etag", "last-modified", "content-length", "content-type")} == \
        {k: headers[k] for k in ("etag", "last-modified", "content-length", "content-type")}


def test_the_service_crl_goes_out_as_der_once_published(hub):
    path = hub.dir / "crl" / "service.crl.pem"
    assert not path.exists() and http(hub, "GET", "/crl/service.crl")[0] == 404  # none before serve's first change
    hub.add_device("crlhttp-svc")
    hub.cli_ok("device", "revoke", "crlhttp-svc", "--reason", "cessationOfOperation")  # a change: both published
    deadline = time.monotonic() + 15
    while not path.exists():
        assert time.monotonic() < deadline, "no service CRL published"
        time.sleep(0.1)
    status, headers, body = http(hub, "GET", "/crl/service.crl")
    assert status == 200 and headers["content-type"] == "application/pkix-crl"
    assert body == x509.load_pem_x509_crl(path.read_bytes()).public_bytes(serialization.Encoding.DER)
    service_ca = x509.load_pem_x509_certificate((hub.dir / "ca" / "service-ca.pem").read_bytes())
    assert x509.load_der_x509_crl(body).is_signature_valid(service_ca.public_key())


def test_a_new_certificate_names_the_http_crl_first_and_a_revocation_shows_up_there(hub):
    cert = enroll(hub, "crlhttp-1")
    dp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [n.value for n in dp[0].full_name] == [f"http://localhost:{hub.crl_port}/crl/device.crl",
                                                   f"https://localhost:{hub.port}/crl/device.crl"]
    first = dp[0].full_name[0].value.replace("localhost", "127.0.0.1")  # the listener is bound to 127.0.0.1
    with urllib.request.urlopen(first, timeout=10) as resp:  # a relying party following the certificate
        before, etag = resp.read(), resp.headers["ETag"]
    assert x509.load_der_x509_crl(before).get_revoked_certificate_by_serial_number(cert.serial_number) is None

    hub.cli_ok("device", "revoke", "crlhttp-1", "--reason", "keyCompromise")
    deadline = time.monotonic() + 15
    while True:  # published in the background soon after the commit
        status, headers, body = http(hub, "GET", "/crl/device.crl", {"If-None-Match": etag})
        if status == 200:
            entry = x509.load_der_x509_crl(body).get_revoked_certificate_by_serial_number(cert.serial_number)
            if entry is not None:
                break
        assert status in (200, 304) and time.monotonic() < deadline, "the revocation never reached the HTTP CRL"
        time.sleep(0.2)
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    assert headers["etag"] != etag and body == published(hub)


def test_openssl_fetches_the_crl_from_the_certificate(hub, tmp_path):
    # `openssl verify -crl_download` follows the distribution point itself, over plain http only (OpenSSL 3.0
    # fetches no https CRL): a relying party with nothing but the certificate and the trust anchor
    kept, revoked = enroll(hub, "crlhttp-ossl-ok"), enroll(hub, "crlhttp-ossl-rev")
    hub.cli_ok("device", "revoke", "crlhttp-ossl-rev", "--reason", "keyCompromise")
    paths = {}
    for name, cert in (("kept", kept), ("revoked", revoked)):
        paths[name] = tmp_path / f"{name}.pem"
        paths[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def verify(name: str) -> subprocess.CompletedProcess:
        return openssl("verify", "-crl_check", "-crl_download", "-CAfile", str(hub.root_pem), "-untrusted",
                       str(hub.device_ca_pem), str(paths[name]))

    deadline = time.monotonic() + 15
    while (proc := verify("revoked")).returncode == 0:  # until the background publication is out
        assert time.monotonic() < deadline, proc.stdout
        time.sleep(0.2)
    assert b"certificate revoked" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    proc = verify("kept")
    assert proc.returncode == 0 and proc.stdout.strip().endswith(b": OK"), proc.stdout + proc.stderr


def test_conditional_gets(hub):
    _, headers, body = http(hub, "GET", "/crl/device.crl")
    etag, modified = headers["etag"], headers["last-modified"]
    for cond in ({"If-None-Match": etag}, {"If-None-Match": f'"other", W/{etag}'}, {"If-None-Match": "*"},
                 {"If-Modified-Since": modified}, {"If-Modified-Since": "Fri, 01 Jan 2100 00:00:00 GMT"}):
        status, got, rest = http(hub, "GET", "/crl/device.crl", cond)
        assert (status, rest) == (304, b""), cond
        assert got["etag"] == etag and got["last-modified"] == modified and "max-age=" in got["cache-control"]
    for cond in ({"If-None-Match": '"other"'}, {"If-Modified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"},
                 {"If-Modified-Since": "not a date"},
                 {"If-None-Match": '"other"', "If-Modified-Since": modified}):  # If-None-Match wins
        status, _, rest = http(hub, "GET", "/crl/device.crl", cond)
        assert (status, rest) == (200, body), cond


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"])
def test_only_get_and_head_are_answered(hub, method):
    target = "127.0.0.1:1" if method == "CONNECT" else "/crl/device.crl"
    status, headers, body = http(hub, method, target, body=b"x" * 100 if method in ("POST", "PUT") else b"")
    assert (status, headers.get("allow"), body) == (405, "GET, HEAD", b"")


@pytest.mark.parametrize("target", [
    "/", "/crl", "/crl/", "/crl/device.crl.pem", "/crl/service.crl.pem", "/fleet.toml", "/crl/../fleet.toml",
    "/crl/..%2ffleet.toml", "/crl/%2e%2e/fleet.toml", "/crl/%2E%2E%2Ffleet.toml", "/crl/..%5cfleet.toml",
    "/crl/%252e%252e/fleet.toml", "/crl/./device.crl", "//crl/device.crl", "/crl//device.crl", "/crl/device.crl/",
    "/CRL/device.crl", "/crl/%64evice.crl", "/crl/device.crl%00", "/crl/device.crl;x", "/../crl/device.crl",
    "/crl/../ca/root.key", "/registry.sqlite3", "http://127.0.0.1/crl/../fleet.toml",
])
def test_anything_else_is_404_with_no_body(hub, target):
    status, _, body = http(hub, "GET", target)
    assert (status, body) == (404, b"")


@pytest.mark.parametrize("head", [
    "GET * HTTP/1.1", "GET crl/device.crl HTTP/1.1", "GET /crl/device.crl HTTP/9.9", "BLAH", "GET /\x00 HTTP/1.1",
    "GET /crl/device.crl HTTP/1.1\r\nContent-Length: abc", "GET /" + "a" * 9000 + " HTTP/1.1",
])
def test_a_request_that_does_not_parse_is_a_bare_400(hub, head):
    data = b""
    with socket.create_connection(("127.0.0.1", hub.crl_port), timeout=10) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\nHost: x\r\n\r\n")
        while chunk := sock.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    assert status_line.split()[1] == b"400" and rest.endswith(b"\r\n\r\n"), data  # headers only, nothing echoed
    assert b"aiohttp" not in data


def test_a_slow_client_is_cut_at_the_header_deadline(hub):
    # fleet.toml [est] header_timeout (3 s here): a client that never finishes its headers is shut out at it
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", hub.crl_port), timeout=30) as sock:
        sock.sendall(b"GET /crl/device.crl HTTP/1.1\r\n")
        assert sock.recv(100) == b""
    assert 2.5 < time.monotonic() - started < 10
