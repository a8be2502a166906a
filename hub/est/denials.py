"""Denied EST requests in the audit log, aggregated: at most one row per (action, source, reason) a minute.

The first denial of a key is written at once, exactly as before (`"<code>: <message>"`), so a single refusal is
visible immediately. Further denials of that key in the next `window` seconds are only counted; when the window
ends (`flush()`, called by the server about twice a second) they become one row `"<code>: <message> (x17 in 60
s)"` and a new window starts, so a flood writes one row a minute per key whatever its rate. A window that ends
without further denials ends the aggregation (the next denial is written at once again). `close()` writes
everything still counted (shutdown). Messages come from the EST layer and never hold secrets.

Memory is bounded: past `max_keys` open keys, new sources are counted under the source "*".
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Protocol

#: The count in an aggregated row's detail: "... (x17 in 60 s)".
COUNT_RE = re.compile(r" \(x(\d+) in \d+ s\)$")


class _Audit(Protocol):
    def audit(self, action: str, outcome: str, now: datetime, actor: str = ..., device_id: str | None = ...,
              detail: str = ..., source: str | None = ...) -> None: ...


def row_count(detail: str) -> int:
    """How many denials one audit row stands for (1 unless it is an aggregated row)."""
    match = COUNT_RE.search(detail or "")
    return int(match.group(1)) if match else 1


@dataclass
class _Window:
    start: float
    count: int = 0                 # denials counted since the last row
    message: str = ""
    device_id: str | None = None
    mixed: bool = False            # more than one device id in the window


_Row = tuple[str, str, str | None, str]   # action, source, device id, detail


class DenialAudit:
    """Thread-safe; `registry` is anything with Registry.audit's signature."""

    def __init__(self, registry: _Audit, clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 monotonic: Callable[[], float] = time.monotonic, window: float = 60.0, max_keys: int = 10_000):
        self.registry, self.clock, self.monotonic = registry, clock, monotonic
        self.window, self.max_keys = window, max_keys
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str, str], _Window] = {}

    def denied(self, action: str, source: str, code: str, message: str, device_id: str | None = None) -> None:
        """Record one denial (writes a row now only if this key has no open window)."""
        now = self.monotonic()
        rows: list[_Row] = []
        with self._lock:
            key = (action, source, code)
            if key not in self._open and len(self._open) >= self.max_keys:
                key = (action, "*", code)
            win = self._open.get(key)
            if win is not None and now - win.start >= self.window:
                rows += self._close(key, win, now)
                win = self._open.get(key)
            if win is None:
                self._open[key] = _Window(start=now)
                rows.append((action, key[1], device_id, f"{code}: {message}"))
            else:
                if win.count and win.device_id != device_id:
                    win.mixed = True
                win.count, win.message, win.device_id = win.count + 1, message, device_id
        self._write(rows)

    def flush(self) -> None:
        """Write the rows of windows that have ended."""
        now = self.monotonic()
        with self._lock:
            rows = [row for key, win in list(self._open.items()) if now - win.start >= self.window
                    for row in self._close(key, win, now)]
        self._write(rows)

    def close(self) -> None:
        """Write every count still open (shutdown)."""
        now = self.monotonic()
        with self._lock:
            rows = [self._row(key, win, now) for key, win in self._open.items() if win.count]
            self._open.clear()
        self._write(rows)

    def _close(self, key: tuple[str, str, str], win: _Window, now: float) -> list[_Row]:
        """End `win` (lock held): with denials counted, one row and a new window (that row is its row)."""
        if not win.count:
            del self._open[key]
            return []
        row = self._row(key, win, now)
        self._open[key] = _Window(start=now)
        return [row]

    def _row(self, key: tuple[str, str, str], win: _Window, now: float) -> _Row:
        action, source, code = key
        seconds = max(1, round(now - win.start))
        device_id = None if win.mixed else win.device_id
        return action, source, device_id, f"{code}: {win.message} (x{win.count} in {seconds} s)"

    def _write(self, rows: list[_Row]) -> None:
        for action, source, device_id, detail in rows:
            self.registry.audit(action, "denied", self.clock(), actor=device_id or "anonymous",
                                device_id=device_id, detail=detail, source=None if source == "*" else source)
