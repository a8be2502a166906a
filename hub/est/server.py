"""The EST HTTPS server: stdlib ThreadingHTTPServer with TLS >= 1.2; all decisions are in hub.est.service.

The TLS handshake runs in a worker thread (a slow client never blocks accept()). Connection limits (hub.est.connlimits):
at most `max_per_source` connections at once per address and `max_queue` waiting for one of the `workers` (the
excess is closed at once), a deadline for the handshake and headers and one for the whole request, one read or
write at most 10 s. HTTP/1.1 keep-alive: a connection carries up to `keepalive_requests` requests (a factory
station enrolling many devices pays one TLS handshake), each with the same deadlines counted from the end of the
previous answer; an error answer, a client's Connection: close or HTTP/1.0 end it. Client
certificates are optional at the TLS layer (simpleenroll uses a bootstrap token) but, when sent, must chain to
the fleet's device CA: that is the only trust anchor of this listener.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from est.errors import EstError, PayloadTooLarge
from est.messages import MAX_CSR_BODY

from hub.est.connlimits import ConnectionGate, Limits, Reaper, Ticket
from hub.est.service import EstRequest, EstService
from hub.tlsposture import harden

log = logging.getLogger("tessera.hub.est")

MAX_BODY = 2 * MAX_CSR_BODY
#: seconds a closing server gives the requests it is serving to finish (their registry transaction and their
#: answer) before it cuts their connections: whoever closes it closes the registry next
DRAIN_S = 3.0
#: headers a request may carry once only (a second Authorization would otherwise silently win)
SINGLE_HEADERS = ("authorization", "content-length", "content-type", "transfer-encoding")


def repeated_headers(headers: Message) -> tuple[str, ...]:
    """The names in SINGLE_HEADERS that `headers` holds more than once."""
    return tuple(name for name in SINGLE_HEADERS if len(headers.get_all(name) or ()) > 1)


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

    def __init__(self, request, client_address, server: "EstHTTPServer", ticket: Ticket | None = None):
        self.ticket = ticket  # None: not watched (bench/est_bench.py drives the handler over a socketpair)
        self.answered = 0     # requests answered on this connection
        super().__init__(request, client_address, server)

    def handle_one_request(self) -> None:
        if self.answered and self.ticket is not None:  # kept alive: the next request's header deadline
            self.server.reaper.next_request(self.ticket, self.server.limits.header_timeout)
        super().handle_one_request()

    def parse_request(self) -> bool:  # its request line came: no longer idle (a stall from here is a slow client)
        if self.ticket is not None:
            self.ticket.idle = False
        return super().parse_request()

    def log_message(self, fmt: str, *args) -> None:  # access log at debug level (never bodies or headers)
        log.debug("%s %s", self.client_address[0], fmt % args)

    def _respond(self, status: int, body: bytes, content_type: str, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.answered += 1
        if status >= 400 or self.close_connection or self.answered >= self.server.limits.keepalive_requests \
                or self._unread_body():
            self.send_header("Connection", "close")  # also sets close_connection
        self._headers_buffer.append(b"\r\n" + body)  # end_headers() and the body in one write (one TLS record)
        self.flush_headers()

    def _unread_body(self) -> bool:
        """A body this request may carry that was not read (a GET's, a chunked one): the connection must end, or
        its bytes would be read as the next request."""
        length = (self.headers.get("Content-Length") or "0").strip()
        return bool(self.headers.get("Transfer-Encoding")) or (self.command != "POST" and length not in ("", "0"))

    def _dispatch(self, method: str) -> None:
        if self.ticket is not None:  # the headers came in time: from now on the whole request's deadline
            self.server.reaper.extend(self.ticket, self.server.limits.request_timeout)
        body = b""
        repeated = repeated_headers(self.headers)
        if method == "POST" and not repeated:
            length = self.headers.get("Content-Length")
            if length is None or not length.strip().isdigit():
                self._respond(411, b"length_required: send a Content-Length\n", "text/plain", {})
                return
            if int(length) > MAX_BODY:
                self.server.service.refused("request", self.client_address[0], PayloadTooLarge(
                    "body_too_large", f"{int(length)} bytes on {self.path[:80]!r}"), count_failure=True)
                self._respond(413, f"body_too_large: request body over {MAX_BODY} bytes\n".encode(), "text/plain", {})
                return
            body = self.rfile.read(int(length))
        peer = self.connection.getpeercert(binary_form=True) if isinstance(self.connection, ssl.SSLSocket) else None
        req = EstRequest(method=method, path=self.path, headers={k.lower(): v for k, v in self.headers.items()},
                         body=body, source=self.client_address[0], peer_cert_der=peer, repeated=repeated)
        try:
            resp = self.server.service.handle(req)
        except Exception:  # never leak internals; the log has the traceback
            log.exception("internal error on %s %r", method, self.path[:80])
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

    def __init__(self, address: tuple[str, int], service: EstService, tls: ssl.SSLContext,
                 limits: Limits = Limits(), sock: socket.socket | None = None, gate: ConnectionGate | None = None):
        """Binds `address`; or, with `sock`, serves that listening socket (shared with other worker processes:
        hub/est/pool.py), which is made non-blocking: another process may take a connection first, and accept()
        must then return at once instead of blocking the serve loop. `gate`: the connection admission (default
        this process's ConnectionGate; the workers' counts connections across the pool)."""
        self.service, self.tls, self.limits = service, tls, limits
        self.gate = gate or ConnectionGate(limits.max_per_source, limits.max_queue)
        self.pool = ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="est")
        self._inflight: dict[Future, socket.socket] = {}  # accepted connections not finished, with their socket
        self._inflight_lock = threading.Lock()
        self.reaper = Reaper(tick=min(0.2, limits.header_timeout / 10))
        super().__init__(address, _Handler, bind_and_activate=sock is None)
        service.trust.refresh(tls, force=True)  # manufacturer CAs (birth certificates) as trust anchors too
        if sock is not None:
            self.socket.close()
            sock.setblocking(False)
            self.socket, self.server_address = sock, sock.getsockname()

    def process_request(self, request, client_address) -> None:
        """In the accept thread: refuse the excess at once, else queue the connection with its header deadline."""
        source = client_address[0]
        refusal = self.gate.admit(source)
        if refusal is not None:
            self.shutdown_request(request)
            what = (f"more than {self.limits.max_per_source} connections at once from this address"
                    if refusal == "too_many_connections" else f"{self.limits.max_queue} connections already wait")
            log.debug("connection from %s refused: %s", source, refusal)
            self.service.refused("connection", source, EstError(refusal, what, status=503))
            return
        ticket = self.reaper.watch(request, self.limits.header_timeout)
        future = self.pool.submit(self._serve, request, client_address, ticket)
        with self._inflight_lock:
            self._inflight[future] = request
        future.add_done_callback(self._finished)

    def _finished(self, future: Future) -> None:
        with self._inflight_lock:
            request = self._inflight.pop(future, None)
        if future.cancelled() and request is not None:  # queued when the server closed: never served
            self.shutdown_request(request)

    def _serve(self, request, client_address, ticket: Ticket) -> None:
        self.gate.started()
        try:
            self.finish_request(request, client_address, ticket)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.reaper.done(ticket)
            self.shutdown_request(request)
            self.gate.release(client_address[0])
            if ticket.expired and ticket.idle:  # a kept-alive connection without a next request: no refusal
                log.debug("idle connection from %s closed", client_address[0])
            elif ticket.expired:
                log.info("connection from %s cut: past its deadline", client_address[0])
                self.service.refused("connection", client_address[0], EstError(
                    "request_timeout", f"request not complete within {self.limits.header_timeout:g} s (headers) "
                    f"/ {self.limits.request_timeout:g} s (request)", status=408))

    def service_actions(self) -> None:  # serve_forever's loop, about twice a second
        self.service.denials.flush()
        self.service.trust.refresh(self.tls)  # a manufacturer added since (hub/est/methods/idevid.py)

    def server_close(self) -> None:
        """Close: nothing more is accepted, the connections still queued are closed unanswered, and the requests
        being served get DRAIN_S s to finish before their connections are cut (the caller closes the registry
        next: a request still running then would be answered with an error, or not at all)."""
        super().server_close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.reaper.cut_idle()  # kept-alive connections between requests: nothing to finish
        with self._inflight_lock:
            running = list(self._inflight)
        if wait(running, timeout=DRAIN_S).not_done:
            log.warning("EST: cutting the connections still served %g s after the server closed", DRAIN_S)
            self.reaper.cut_all()
            wait(running, timeout=DRAIN_S)
        self.reaper.stop()
        self.service.denials.close()

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().server_bind()

    def finish_request(self, request, client_address, ticket: Ticket) -> None:
        request.settimeout(self.limits.io_timeout)
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            conn = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc.__class__.__name__
            if "CERTIFICATE" in str(reason).upper():
                why = getattr(exc, "verify_message", None)  # e.g. unknown CA (a birth certificate's), expired
                self.service.refused("tls", client_address[0], EstError(
                    "bad_client_cert", f"client certificate refused: {reason}" + (f" ({why})" if why else ""),
                    status=403))
            log.info("TLS handshake with %s failed: %s", client_address[0], reason)
            return
        try:
            self.RequestHandlerClass(conn, client_address, self, ticket)
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def handle_error(self, request, client_address) -> None:
        log.debug("connection error from %s", client_address[0], exc_info=True)


def start(service: EstService, host: str, port: int, tls: ssl.SSLContext,
          limits: Limits = Limits()) -> tuple[EstHTTPServer, threading.Thread]:
    """Bind and serve in a background thread; returns (server, thread). server.shutdown() stops it."""
    server = EstHTTPServer((host, port), service, tls, limits)
    thread = threading.Thread(target=server.serve_forever, name="est-server", daemon=True)
    thread.start()
    return server, thread
