"""The hub's local admin socket (Unix, 0600, same-uid peers only): the CLI's way to act on a running hub."""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import struct
import threading
from pathlib import Path
from typing import Callable

log = logging.getLogger("tessera.hub.admin")

MAX_REQUEST = 64 * 1024


class AdminUnavailable(Exception):
    """No hub is listening on the admin socket."""


class AdminError(Exception):
    """The running hub refused or failed the request (message from the hub)."""


class _Handler(socketserver.StreamRequestHandler):
    server: "_Server"

    def handle(self) -> None:
        creds = self.connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid not in (os.getuid(), 0):
            log.warning("admin socket: refused peer uid %d", uid)
            return
        line = self.rfile.readline(MAX_REQUEST)
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("request must be a JSON object")
            reply = {"ok": True, "result": self.server.dispatch(request)}
        except Exception as exc:  # the CLI shows this line
            log.warning("admin request failed: %s", exc)
            reply = {"ok": False, "error": str(exc) or exc.__class__.__name__}
        self.wfile.write(json.dumps(reply, default=str).encode() + b"\n")


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, dispatch: Callable[[dict], object]):
        self.dispatch = dispatch
        super().__init__(str(path), _Handler)


def serve(path: Path, dispatch: Callable[[dict], object]) -> tuple[_Server, threading.Thread]:
    """Listen on `path` (replacing a stale socket) with mode 0600; returns (server, thread)."""
    if path.exists() or path.is_symlink():
        try:
            call(path, {"op": "ping"}, timeout=1)
            raise AdminError(f"another hub is already running on {path}")
        except AdminUnavailable:
            path.unlink()
    old = os.umask(0o177)
    try:
        server = _Server(path, dispatch)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    thread = threading.Thread(target=server.serve_forever, name="admin-socket", daemon=True)
    thread.start()
    return server, thread


def call(path: Path, request: dict, timeout: float = 30.0) -> object:
    """Send one request to the running hub; AdminUnavailable if none listens, AdminError if it refuses."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise AdminUnavailable(str(exc)) from None
    with sock:
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = sock.makefile("rb").readline(MAX_REQUEST * 4)
    if not data:
        raise AdminError("the hub closed the admin connection without answering")
    reply = json.loads(data)
    if not reply.get("ok"):
        raise AdminError(reply.get("error", "unknown error"))
    return reply.get("result")
