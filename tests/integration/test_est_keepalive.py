"""HTTP/1.1 keep-alive on the EST listener (hub/est/server.py): many requests per TLS connection, and where it ends.

A provisioning station enrolls device after device over one connection (one TLS handshake); every request is still
rate limited and has its own deadlines. The connection ends after an error answer, on the client's
Connection: close, after `keepalive_requests` requests, when it stays idle past the header deadline (no refusal
counted: it is no slow client), and whenever a body was not read (a GET's body must never be read as the next
request).

Cost: one hub with 2 workers, about 6 s on 2 cores.
"""

from __future__ import annotations

import socket
import ssl

import pytest

from hub.est.connlimits import Limits
from tests.integration.hubfixtures import EST_PREFIX, b64_body, basic, make_csr, new_key, running_hub, tls_context

pytestmark = pytest.mark.integration

ENROLL = f"{EST_PREFIX}/simpleenroll"
CACERTS = f"{EST_PREFIX}/cacerts"


class Conn:
    """One TLS connection; `ask()` sends one request and reads one response (status, headers, body)."""

    def __init__(self, hub, source: str = "127.0.0.1"):
        raw = socket.create_connection(("127.0.0.1", hub.port), timeout=20, source_address=(source, 0))
        self.sock: ssl.SSLSocket = tls_context(hub).wrap_socket(raw, server_hostname="127.0.0.1")
        self.file = self.sock.makefile("rb")

    def send(self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in (headers or {}).items())]
        if body or method == "POST":
            lines.append(f"Content-Length: {len(body)}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    def read(self) -> tuple[int, dict[str, str], bytes]:
        status_line = self.file.readline()
        assert status_line, "the server closed the connection"
        headers = {}
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(status_line.split()[1]), headers, self.file.read(int(headers["content-length"]))

    def ask(self, *args, **kw) -> tuple[int, dict[str, str], bytes]:
        self.send(*args, **kw)
        return self.read()

    def closed_by_server(self) -> bool:
        try:
            return self.file.read(1) == b""
        except (ConnectionError, ssl.SSLError):
            return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with running_hub(tmp_path_factory.mktemp("keepalive"), workers=2, header_timeout=1.0, rate_per_source=0.001,
                     rate_burst=3) as hub:
        yield hub


def _enroll(conn: Conn, device_id: str, token: str):
    return conn.ask("POST", ENROLL, {"Content-Type": "application/pkcs10", "Authorization": basic(device_id, token)},
                    b64_body(make_csr(new_key(), device_id)))


def test_a_station_enrolls_devices_over_one_connection_each_request_rate_limited(hub):
    tokens = {f"ka-{i}": hub.add_device(f"ka-{i}") for i in range(4)}
    conn = Conn(hub, "127.0.0.2")
    try:
        answers = [_enroll(conn, d, t) for d, t in tokens.items()]
        assert [a[0] for a in answers] == [200, 200, 200, 429]  # the burst of 3 counts requests, not connections
        assert [a[1].get("connection") for a in answers] == [None, None, None, "close"]
        assert 1 <= int(answers[3][1]["retry-after"])
        assert conn.closed_by_server()
    finally:
        conn.close()
    assert [hub.cert_count(d) for d in tokens] == [1, 1, 1, 0]


def test_an_error_answer_or_the_clients_close_ends_the_connection(hub):
    conn = Conn(hub, "127.0.0.3")
    try:
        status, headers, _ = conn.ask("POST", ENROLL, {"Content-Type": "application/pkcs10"}, b"x")  # the challenge
        assert (status, headers["connection"]) == (401, "close") and conn.closed_by_server()
    finally:
        conn.close()
    conn = Conn(hub)
    try:
        assert conn.ask("GET", CACERTS)[0] == 200
        status, headers, _ = conn.ask("GET", CACERTS, {"Connection": "close"})
        assert (status, headers["connection"]) == (200, "close") and conn.closed_by_server()
    finally:
        conn.close()


def test_a_gets_body_is_never_read_as_the_next_request(hub):
    conn = Conn(hub)
    try:
        smuggled = b"GET /.well-known/est/csrattrs HTTP/1.1\r\nHost: x\r\n\r\n"
        status, headers, _ = conn.ask("GET", CACERTS, body=smuggled)
        assert (status, headers["connection"]) == (200, "close")
        assert conn.closed_by_server()  # one answer, not two
    finally:
        conn.close()


def test_a_connection_carries_at_most_keepalive_requests(hub):
    conn = Conn(hub)
    try:
        for i in range(Limits.keepalive_requests - 1):
            status, headers, _ = conn.ask("GET", CACERTS)
            assert (status, headers.get("connection")) == (200, None), i
        status, headers, _ = conn.ask("GET", CACERTS)
        assert (status, headers["connection"]) == (200, "close") and conn.closed_by_server()
    finally:
        conn.close()


def test_an_idle_connection_is_closed_after_the_header_deadline_without_a_refusal(hub):
    mark = hub.last_audit_id()
    conn = Conn(hub, "127.0.0.4")
    try:
        assert conn.ask("GET", CACERTS)[0] == 200
        assert conn.closed_by_server()  # idle past header_timeout (1 s): the server closes it
    finally:
        conn.close()
    # a request that starts and then stalls is still a slow client: cut and counted
    conn = Conn(hub, "127.0.0.5")
    try:
        assert conn.ask("GET", CACERTS)[0] == 200
        conn.sock.sendall(b"GET /.well-known/est/cacerts HTTP/1.1\r\n")  # no end of headers
        assert conn.closed_by_server()
    finally:
        conn.close()
    rows = hub.wait_audit(mark, lambda r: "request_timeout" in (r["detail"] or ""))
    assert [r["source"] for r in rows if "request_timeout" in (r["detail"] or "")] == ["127.0.0.5"]
