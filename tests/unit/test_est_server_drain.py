"""hub.est.server.EstHTTPServer.server_close: the requests being served finish (and are answered) before it returns.

Whoever closes the server closes the registry next (an EST worker whose supervisor died, a stopping hub): a request
still running then was answered 403 `closed: registry is closed` or 500 to a device whose token was good (found by
tests/integration/test_crash_consistency.py). The service here is a stand-in that takes its time (the server, TLS
and sockets are real): what is under test is only the server's shutdown order.
"""

from __future__ import annotations

import http.client
import ssl
import threading
import time

from hub.est.connlimits import Limits
from hub.est.server import EstHTTPServer
from hub.est.service import EstResponse


class SlowService:
    """Answers every request 200 after `delay` s; records when it answered."""

    def __init__(self, delay: float):
        self.delay = delay
        self.started = threading.Event()
        self.answered_at: float | None = None
        self.denials = self
        self.trust = self  # no manufacturer CAs (hub/est/methods/idevid.py ManufacturerTrust)

    def handle(self, req) -> EstResponse:
        self.started.set()
        time.sleep(self.delay)
        self.answered_at = time.monotonic()
        return EstResponse(200, b"ok\n")

    def refused(self, *args, **kwargs) -> None:
        pass

    def flush(self) -> None:
        pass

    def refresh(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def test_server_close_waits_for_the_requests_being_served(ca):
    cert, key = ca.issue_server()
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(str(cert), str(key))
    service = SlowService(delay=1.0)
    server = EstHTTPServer(("127.0.0.1", 0), service, tls, Limits())
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    answer: dict = {}

    def client() -> None:
        ctx = ssl.create_default_context(cafile=str(ca.cert_path))
        conn = http.client.HTTPSConnection("127.0.0.1", server.server_address[1], context=ctx, timeout=10)
        try:
            conn.request("GET", "/.well-known/est/cacerts")
            resp = conn.getresponse()
            answer["status"], answer["body"] = resp.status, resp.read()
        except Exception as exc:  # noqa: BLE001  (the assertion below names it)
            answer["error"] = repr(exc)
        finally:
            conn.close()

    t = threading.Thread(target=client)
    t.start()
    assert service.started.wait(10), "the request never reached the service"
    server.shutdown()
    serving.join(timeout=5)
    server.server_close()
    closed_at = time.monotonic()
    t.join(timeout=10)
    assert service.answered_at is not None and service.answered_at <= closed_at, \
        "server_close returned while a request was still being served"
    assert answer == {"status": 200, "body": b"ok\n"}, answer
