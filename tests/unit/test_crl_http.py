"""The plain-HTTP CRL listener: what it answers (hub.serve.crlfiles, no socket) and its connection limits and port
rules (hub.serve.crlhttp on real sockets, without a hub). About 7 s, 4 of them the request deadline test."""

from __future__ import annotations

import contextlib
import socket
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hub.config import HubConfig
from hub.est.connlimits import Limits
from hub.serve import crlhttp
from hub.serve.crlfiles import MAX_AGE, CrlFiles, answer, etag_matches, modified_since

NOW = datetime(2027, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
KEY = ec.generate_private_key(ec.SECP256R1())
NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])


def crl(this_update: datetime = NOW - timedelta(hours=1), lifetime: timedelta = timedelta(days=7),
        serials: tuple[int, ...] = ()) -> x509.CertificateRevocationList:
    builder = (x509.CertificateRevocationListBuilder().issuer_name(NAME).last_update(this_update)
               .next_update(this_update + lifetime).add_extension(x509.CRLNumber(1), critical=False))
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(this_update).build())
    return builder.sign(KEY, hashes.SHA256())


def write(directory: Path, name: str, value: x509.CertificateRevocationList, pem: bool = False) -> bytes:
    directory.mkdir(parents=True, exist_ok=True)
    data = value.public_bytes(serialization.Encoding.PEM if pem else serialization.Encoding.DER)
    tmp = directory / f".{name}.tmp"
    tmp.write_bytes(data)
    tmp.replace(directory / name)  # as the publisher does: a new file renamed into place
    return value.public_bytes(serialization.Encoding.DER)


@pytest.fixture
def files(tmp_path) -> CrlFiles:
    return CrlFiles(tmp_path / "crl")


def test_the_device_crl_as_published(files):
    der = write(files.crl_dir, "device.crl", crl())
    ans = answer(files, "GET", "/crl/device.crl", now=NOW)
    assert (ans.status, ans.body) == (200, der)
    assert ans.headers["Content-Type"] == "application/pkix-crl"
    assert ans.headers["Last-Modified"] == format_datetime(NOW - timedelta(hours=1), usegmt=True)
    assert ans.headers["Cache-Control"] == f"public, max-age={MAX_AGE}, no-transform"
    assert ans.headers["ETag"].startswith('"') and ans.headers["ETag"].endswith('"')
    assert answer(files, "HEAD", "/crl/device.crl?x=1", now=NOW) == ans  # aiohttp leaves a HEAD's body out
    assert answer(files, "GET", "http://crl.example.com:8080/crl/device.crl", now=NOW) == ans  # absolute-form
    assert answer(files, "GET", "HTTP://x/crl/device.crl?a", now=NOW) == ans


def test_the_service_crl_pem_goes_out_as_der(files):
    der = write(files.crl_dir, "service.crl.pem", crl(serials=(7,)), pem=True)
    ans = answer(files, "GET", "/crl/service.crl", now=NOW)
    assert (ans.status, ans.body) == (200, der)


def test_missing_crls(files):
    assert answer(files, "GET", "/crl/device.crl").status == 503  # always published by init: a moment's gap
    assert answer(files, "GET", "/crl/device.crl").headers == {"Retry-After": "10"}
    assert answer(files, "GET", "/crl/service.crl").status == 404  # none until serve's first publication
    files.crl_dir.mkdir(parents=True)
    (files.crl_dir / "device.crl").write_bytes(b"not a CRL")
    assert answer(files, "GET", "/crl/device.crl").status == 503


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "get", "PROPFIND"])
def test_other_methods_are_405(files, method):
    write(files.crl_dir, "device.crl", crl())
    assert answer(files, method, "/crl/device.crl") == answer(files, method, "/nothing")
    ans = answer(files, method, "/crl/device.crl")
    assert (ans.status, ans.headers, ans.body) == (405, {"Allow": "GET, HEAD"}, b"")


@pytest.mark.parametrize("target", ["/crl/../crl/device.crl", "/crl/%2e%2e/crl/device.crl", "/crl/./device.crl",
                                    "/crl//device.crl", "/crl/device.crl/", "/crl/device.crl.pem", "/crl/device%2Ecrl",
                                    "/crl/service.crl.pem", "crl/device.crl", "/CRL/DEVICE.CRL", "", "http://",
                                    "http://x", "http://x/crl/../crl/device.crl", "https://x/crl/device.crl",
                                    "http:/crl/device.crl", "http://x//crl/device.crl"])
def test_only_the_exact_names_exist(files, target):
    write(files.crl_dir, "device.crl", crl())
    write(files.crl_dir, "service.crl.pem", crl(), pem=True)
    ans = answer(files, "GET", target)
    assert (ans.status, ans.headers, ans.body) == (404, {}, b"")


def test_conditional_requests(files):
    write(files.crl_dir, "device.crl", crl())
    full = answer(files, "GET", "/crl/device.crl", now=NOW)
    etag, modified = full.headers["ETag"], full.headers["Last-Modified"]

    def status(inm=None, ims=None) -> int:
        ans = answer(files, "GET", "/crl/device.crl", inm, ims, now=NOW)
        if ans.status == 304:
            assert ans.body == b"" and "Content-Type" not in ans.headers
            assert {k: ans.headers[k] for k in ("ETag", "Last-Modified", "Cache-Control")} == \
                {k: full.headers[k] for k in ("ETag", "Last-Modified", "Cache-Control")}
        return ans.status

    assert status(etag) == status(f"W/{etag}") == status(f'"a", {etag}') == status("*") == 304
    assert status('"a"') == status('"a", W/"b"') == status("garbage") == status("") == 200
    assert status(ims=modified) == status(ims=format_datetime(NOW, usegmt=True)) == 304
    assert status(ims=format_datetime(NOW - timedelta(hours=2), usegmt=True)) == 200
    assert status(ims="yesterday") == status(ims="Fri, 01 Jan 2027 12:00:00") == 200  # not an HTTP-date: ignored
    assert status('"a"', modified) == 200 and status(etag, "Thu, 01 Jan 1970 00:00:00 GMT") == 304  # INM wins


def test_a_new_crl_is_a_new_etag_and_is_read_again(files):
    write(files.crl_dir, "device.crl", crl())
    first = files.get("device.crl")
    assert files.get("device.crl") is first  # not re-read while the file stays
    der = write(files.crl_dir, "device.crl", crl(serials=(42,)))
    second = files.get("device.crl")
    assert second.der == der and second.etag != first.etag
    assert answer(files, "GET", "/crl/device.crl", first.etag, now=NOW).status == 200


@pytest.mark.parametrize("left, max_age", [(timedelta(days=6), MAX_AGE), (timedelta(seconds=100), 100),
                                           (timedelta(seconds=-5), 0)])
def test_max_age_never_passes_next_update(files, left, max_age):
    this_update = NOW - timedelta(hours=1)
    write(files.crl_dir, "device.crl", crl(this_update, lifetime=timedelta(hours=1) + left))
    assert answer(files, "GET", "/crl/device.crl", now=NOW).headers["Cache-Control"] == \
        f"public, max-age={max_age}, no-transform"


def test_etag_and_date_parsing():
    assert etag_matches(' "x" ', '"x"') and etag_matches('W/"y", "x"', '"x"')
    assert not etag_matches('"x', '"x"') and not etag_matches('x', '"x"') and not etag_matches('"y" "x"', '"x"')
    assert not modified_since("Fri, 01 Jan 2027 12:00:00 GMT", NOW) and modified_since("nonsense", NOW)
    assert modified_since("Fri, 01 Jan 2027 11:59:59 GMT", NOW)


# --- the listener on real sockets ---------------------------------------------------------------------------------

LIMITS = Limits(header_timeout=0.5, request_timeout=1.0, max_per_source=2)
PATIENT = Limits(header_timeout=10.0, request_timeout=20.0, max_per_source=2)  # no deadline within a test


@pytest.fixture
def listener(tmp_path, request):
    cfg = HubConfig(root=tmp_path, fleet="acme")
    write(cfg.crl_dir, "device.crl", crl())
    running = crlhttp.start(cfg, "127.0.0.1", 0, getattr(request, "param", LIMITS))
    try:
        yield running
    finally:
        running()


def get(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /crl/device.crl HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_the_listener_answers_and_closes(listener):
    data = get(listener.port)
    assert data.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in data and b"Server: tessera-crl" in data


@pytest.mark.parametrize("listener", [PATIENT], indirect=True)
def test_connections_past_the_per_source_cap_are_closed_at_once(listener):
    held = [socket.create_connection(("127.0.0.1", listener.port)) for _ in range(PATIENT.max_per_source)]
    try:
        time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as extra:
            started = time.monotonic()
            extra.sendall(b"GET /crl/device.crl HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                assert extra.recv(100) == b""
            except ConnectionResetError:
                pass
            assert time.monotonic() - started < 5  # closed at once, not cut at the deadline
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 2
    while not get(listener.port).startswith(b"HTTP/1.1 200 "):  # the slots are free again
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_client_that_never_finishes_its_headers_is_cut_at_the_deadline(listener):
    with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /crl/device.crl HTTP/1.1\r\n")
        assert sock.recv(100) == b""
        assert LIMITS.header_timeout * 0.9 < time.monotonic() - started < LIMITS.header_timeout + 2
    assert get(listener.port).startswith(b"HTTP/1.1 200 ")


def test_a_client_trickling_its_headers_is_cut_at_the_deadline(listener):
    # a byte every 50 ms: every read succeeds, only the deadline from accept ends it
    with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as sock:
        started = time.monotonic()
        with pytest.raises(OSError):
            for byte in b"GET /crl/device.crl HTTP/1.1\r\nX-Slow: " + b"a" * 1000:
                sock.send(bytes([byte]))
                time.sleep(0.05)
                assert time.monotonic() - started < LIMITS.header_timeout + 2, "never cut"
        assert sock.recv(100) == b""
        assert time.monotonic() - started > LIMITS.header_timeout * 0.9


def big_crl_der() -> bytes:
    """A CRL larger than the most a TCP send buffer holds here (tcp_wmem's maximum), so that a client that does
    not read keeps the listener's write pending (a smaller one is all in the kernel at once)."""
    try:
        most = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        most = 4 * 1024 * 1024
    entries = [x509.RevokedCertificateBuilder().serial_number(i + 1).revocation_date(NOW).build()
               for i in range(most // 21 + 10_000)]  # about 22 bytes an entry
    return (x509.CertificateRevocationListBuilder(revoked_certificates=entries).issuer_name(NAME)
            .last_update(NOW).next_update(NOW + timedelta(days=7)).add_extension(x509.CRLNumber(1), critical=False)
            .sign(KEY, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


def test_the_request_deadline_covers_the_response(tmp_path):
    # headers in time: the whole request has request_timeout from accept (not header_timeout) to be answered, and no
    # more: a client that stops reading is cut then. About 4 s (a 4 MB CRL is built once).
    cfg = HubConfig(root=tmp_path, fleet="acme")
    cfg.crl_dir.mkdir()
    (cfg.crl_dir / "device.crl").write_bytes(der := big_crl_der())
    limits = Limits(header_timeout=0.3, request_timeout=1.5, max_per_source=2)
    running = crlhttp.start(cfg, "127.0.0.1", 0, limits)

    def read_after(pause: float) -> int:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", running.port))
            sock.sendall(b"GET /crl/device.crl HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(pause)
            got = 0
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(1 << 20):
                    got += len(chunk)
            return got

    try:
        assert read_after(0.8) > len(der)  # past header_timeout: the whole answer (headers and body)
        assert read_after(2.5) < len(der)  # past request_timeout: cut, what the kernel held and no more
    finally:
        running()


def test_port_rules(tmp_path, monkeypatch):
    cfg = HubConfig(root=tmp_path, fleet="acme")
    assert crlhttp.configured_port(cfg) == (8080, False)
    assert crlhttp.configured_port(cfg, 0) == (0, True)
    cfg.crl_http_port = 9000
    assert crlhttp.configured_port(cfg) == (9000, True) and crlhttp.configured_port(cfg, 9001) == (9001, True)
    cfg.crl_http_port = 0
    stop, line = crlhttp.serve_crls(cfg, "127.0.0.1", None, on_error=pytest.fail)
    assert stop is None and "not served" in line

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        cfg.crl_http_port = None
        monkeypatch.setattr(crlhttp, "DEFAULT_CRL_HTTP_PORT", port)
        errors: list[str] = []
        stop, line = crlhttp.serve_crls(cfg, "127.0.0.1", None, on_error=errors.append)  # the default: runs on
        assert stop is None and f"port {port} unavailable" in line and len(errors) == 1
        with pytest.raises(OSError):
            crlhttp.serve_crls(cfg, "127.0.0.1", port, on_error=pytest.fail)  # asked for: an error
    finally:
        taken.close()
