"""The EST HTTPS server: stdlib ThreadingHTTPServer with TLS >= 1.2; all decisions are in hub.est.service.

The TLS handshake runs in a worker thread (a slow client never blocks accept(); I/O times out after 10 s). Client
certificates are optional at the TLS layer (simpleenroll uses a bootstrap token) but, when sent, must chain to
the fleet's device CA: that is the only trust anchor of this listener.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from est.messages import MAX_CSR_BODY

from hub.est.service import EstRequest, EstService
from hub.tlsposture import harden

log = logging.getLogger("tessera.hub.est")

MAX_BODY = 2 * MAX_CSR_BODY
IO_TIMEOUT = 10.0
WORKERS = 64  # concurrent connections being served; more wait in the accept backlog


def server_context(cert_chain: Path, key: Path, client_ca: Path) -> ssl.SSLContext:
    """Server TLS: our service cert; optional client certs verified against the device CA chain only."""
    ctx = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.load_cert_chain(str(cert_chain), str(key))
    # Only the device CA is a trust anchor here (partial chain): a certificate from the service CA, or from any
    # other CA under the fleet root, is not a device certificate and fails the handshake.
    ctx.load_verify_locations(cafile=str(client_ca))
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.num_tickets = 0  # EST clients make one request per connection; tickets only cost a signature each
    return ctx


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tessera-est"
    sys_version = ""
    server: "EstHTTPServer"

    def log_message(self, fmt: str, *args) -> None:  # access log at debug level (never bodies or headers)
        log.debug("%s %s", self.client_address[0], fmt % args)

    def _respond(self, status: int, body: bytes, content_type: str, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        if status >= 400:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _dispatch(self, method: str) -> None:
        body = b""
        if method == "POST":
            length = self.headers.get("Content-Length")
            if length is None or not length.strip().isdigit():
                self._respond(411, b"length_required: send a Content-Length\n", "text/plain", {})
                return
            if int(length) > MAX_BODY:
                self.server.service.registry.audit(
                    "request", "denied", self.server.service.clock(), actor="anonymous",
                    detail=f"body_too_large: {int(length)} bytes on {self.path[:80]}", source=self.client_address[0])
                self.server.service.limiter.fail(self.client_address[0], self.server.service.monotonic())
                self._respond(413, f"body_too_large: request body over {MAX_BODY} bytes\n".encode(), "text/plain", {})
                return
            body = self.rfile.read(int(length))
        peer = self.connection.getpeercert(binary_form=True) if isinstance(self.connection, ssl.SSLSocket) else None
        req = EstRequest(method=method, path=self.path, headers={k.lower(): v for k, v in self.headers.items()},
                         body=body, source=self.client_address[0], peer_cert_der=peer)
        try:
            resp = self.server.service.handle(req)
        except Exception:  # never leak internals; the log has the traceback
            log.exception("internal error on %s %s", method, self.path[:80])
            self._respond(500, b"internal_error: see the hub log\n", "text/plain", {})
            return
        self._respond(resp.status, resp.body, resp.content_type, resp.headers)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")


class EstHTTPServer(ThreadingHTTPServer):
    """Connections are served by a bounded pool of long-lived threads (each keeps its registry connection)."""

    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], service: EstService, tls: ssl.SSLContext, workers: int = WORKERS):
        self.service, self.tls = service, tls
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="est")
        super().__init__(address, _Handler)

    def process_request(self, request, client_address) -> None:
        self.pool.submit(self.process_request_thread, request, client_address)

    def server_close(self) -> None:
        super().server_close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().server_bind()

    def finish_request(self, request, client_address) -> None:
        request.settimeout(IO_TIMEOUT)
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            conn = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc.__class__.__name__
            if "CERTIFICATE" in str(reason).upper():
                self.service.registry.audit("tls", "denied", self.service.clock(), actor="anonymous",
                                            detail=f"client certificate refused: {reason}", source=client_address[0])
            log.info("TLS handshake with %s failed: %s", client_address[0], reason)
            return
        try:
            self.RequestHandlerClass(conn, client_address, self)
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def handle_error(self, request, client_address) -> None:
        log.debug("connection error from %s", client_address[0], exc_info=True)


def start(service: EstService, host: str, port: int, tls: ssl.SSLContext) -> tuple[EstHTTPServer, threading.Thread]:
    """Bind and serve in a background thread; returns (server, thread). server.shutdown() stops it."""
    server = EstHTTPServer((host, port), service, tls)
    thread = threading.Thread(target=server.serve_forever, name="est-server", daemon=True)
    thread.start()
    return server, thread
