"""hub/broker/rabbitmq/mgmt.py: a node that refuses the management login (401, its hub is down) or is unavailable
(5xx) is passed over for the next node; only when every node refuses does the refusal reach the caller.

The nodes are real HTTP servers on loopback answering as RabbitMQ's management API does.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hub.broker.rabbitmq.mgmt import Mgmt, MgmtError
from tests.helpers import free_port


def node(status: int, body=None):
    """A management API stand-in answering every request with `status` (and `body` as JSON); returns (url, seen,
    stop)."""
    seen: list[tuple[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            seen.append((self.command, self.path))
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_DELETE = _answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop():
        server.shutdown()
        server.server_close()
    return f"http://127.0.0.1:{server.server_address[1]}", seen, stop


@pytest.mark.parametrize("bad", [401, 503])
def test_a_node_refusing_the_login_is_passed_over(bad):
    down, down_seen, stop1 = node(bad)
    up, up_seen, stop2 = node(200, [{"user": "d1"}, {"user": "d1"}])
    try:
        mgmt = Mgmt([down, up], "s" * 48)
        assert mgmt.close_user("d1") == 2
        assert ("DELETE", "/api/connections/username/d1") in up_seen, up_seen
        assert down_seen, "the first node was not tried"
        assert mgmt.connected_users() == {"d1"}
    finally:
        stop1()
        stop2()


def test_every_node_refusing_is_an_error_naming_the_status():
    urls, stops = [], []
    for _ in range(2):
        url, _, stop = node(401)
        urls.append(url)
        stops.append(stop)
    try:
        with pytest.raises(MgmtError, match="HTTP 401"):
            Mgmt(urls, "s" * 48).user_connections("d1")
    finally:
        for stop in stops:
            stop()


def test_no_node_answering_is_an_error():
    with pytest.raises(MgmtError, match="no RabbitMQ management API answered"):
        Mgmt([f"http://127.0.0.1:{free_port()}"], "s" * 48).close_user("d1")


def test_a_404_is_an_answer_not_a_refusal():
    """No connections of that user on the first node that answers: not passed over (404 is RabbitMQ's 'none')."""
    first, _, stop1 = node(404)
    second, second_seen, stop2 = node(200, [{"user": "d1"}])
    try:
        assert Mgmt([first, second], "s" * 48).user_connections("d1") == []
        assert not second_seen
    finally:
        stop1()
        stop2()


def test_the_node_that_answered_is_asked_first_next_time():
    """Once a node answered, the refusing one before it is not asked again (a lost machine costs one timeout), until
    the answering node fails too."""
    down, down_seen, stop1 = node(401)
    up, up_seen, stop2 = node(200, [{"user": "d1"}])
    try:
        mgmt = Mgmt([down, up], "s" * 48)
        for _ in range(3):
            assert mgmt.close_user("d1") == 1
        assert len(down_seen) == 1 and len(up_seen) == 6, (down_seen, up_seen)
        stop2()
        with pytest.raises(MgmtError, match="HTTP 401"):  # the answering node gone: the others are tried again
            mgmt.user_connections("d1")
        assert len(down_seen) == 2
    finally:
        stop1()
