"""The RabbitMQ management API, as the hub uses it: health, the connections of a user, closing them (stdlib HTTP).

The hub logs in as auth.MGMT_USER with its secret (Basic auth in the request header, never in argv or a URL).
DELETE /api/connections/username/{name} closes that user's connections on every node of the cluster (connection
tracking is cluster-wide); every call tries the nodes in turn until one answers. A node that refuses the login
(401: its auth back end is another hub's loopback listener, and that hub is down) or is unavailable (5xx) counts
as not answering: with each hub serving the nodes on its machine, a hub whose neighbour hub is down still kicks
through the other nodes. The node that answered last is asked first next time, so a lost machine (whose node may
not even refuse, only time out) costs one timeout, not one per call.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Sequence

from .auth import MGMT_USER


class MgmtError(Exception):
    """No node's management API answered (message names the nodes and the last error)."""


class Mgmt:
    def __init__(self, urls: Sequence[str], secret: str, timeout: float = 2.0):
        self.urls, self.timeout = [u.rstrip("/") for u in urls], timeout
        self._first: str | None = None  # the node that answered last (tried first)
        token = base64.b64encode(f"{MGMT_USER}:{secret}".encode()).decode()
        self._headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json"}

    def _call(self, url: str, method: str, path: str, timeout: float | None = None) -> tuple[int, Any]:
        req = urllib.request.Request(url + path, method=method, headers=self._headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                body = resp.read()
                return resp.status, (json.loads(body) if body else None)
        except urllib.error.HTTPError as exc:
            return exc.code, None

    def call(self, method: str, path: str, timeout: float | None = None) -> tuple[int, Any]:
        """The first node's answer that is not a refused login (401) or an unavailable node (5xx); if every node
        refused, the last refusal (the caller names its status); MgmtError if none answered at all."""
        last: Exception | None = None
        refused: tuple[int, Any] | None = None
        first = self._first
        for url in ([first] if first else []) + [u for u in self.urls if u != first]:
            try:
                answer = self._call(url, method, path, timeout)
            except (OSError, ValueError) as exc:
                last = exc
                continue
            if answer[0] != 401 and answer[0] < 500:
                self._first = url
                return answer
            refused = answer
        if refused is not None:
            return refused
        raise MgmtError(f"no RabbitMQ management API answered ({', '.join(self.urls)}): {last}")

    def healthy(self, url: str) -> bool:
        try:
            status, _ = self._call(url.rstrip("/"), "GET", "/api/health/checks/alarms", timeout=1.0)
            return status == 200
        except (OSError, ValueError):
            return False

    def user_connections(self, name: str) -> list[dict]:
        status, body = self.call("GET", "/api/connections/username/" + urllib.parse.quote(name, safe=""))
        if status == 404:
            return []
        if status != 200 or not isinstance(body, list):  # never "no sessions": a kick would be skipped unseen
            raise MgmtError(f"listing the connections of {name!r} failed: HTTP {status}")
        return body

    def close_user(self, name: str) -> int:
        """Close every connection of user `name` across the cluster; returns how many there were."""
        found = len(self.user_connections(name))
        status, _ = self.call("DELETE", "/api/connections/username/" + urllib.parse.quote(name, safe=""))
        if status not in (200, 204, 404):
            raise MgmtError(f"closing the connections of {name!r} failed: HTTP {status}")
        return found

    def connected_users(self, before_ms: float | None = None) -> set[str]:
        """Users with a connection (opened at or before `before_ms`, epoch ms, if given). From the management
        statistics: a connection shows up there within the stats interval (5 s), not at once."""
        status, body = self.call("GET", "/api/connections?columns=user,connected_at")
        if status != 200 or not isinstance(body, list):  # never "nobody": a role change's kicks would be skipped
            raise MgmtError(f"listing the connections failed: HTTP {status}")
        return {c.get("user") for c in body if isinstance(c, dict)
                and (before_ms is None or (c.get("connected_at") or 0) <= before_ms)}
