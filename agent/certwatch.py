"""Notice a certificate stored by another process (`tessera-agent renew` or `enroll` run from a shell).

Why a file watch and not a signal from `renew`: store_certificate replaces identity.json by rename, so its
(inode, mtime, size) changes with every new certificate whoever wrote it (any user, any tool, a restore from a
backup), and nothing has to trust a PID read from a status file (a recycled PID would get the signal). The running
agent stats the file at most once a second (one stat call: nothing measurable next to the MQTT loop).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

CHECK_EVERY = 1.0  # seconds between two stats of identity.json


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class FileWatch:
    """changed() is True once per replacement of `path` (checked at most every `every` seconds)."""

    def __init__(self, path: Path, every: float = CHECK_EVERY, monotonic: Callable[[], float] = time.monotonic):
        self.path, self.every, self.monotonic = Path(path), every, monotonic
        self._seen = _signature(self.path)
        self._next = monotonic() + every

    def mark(self) -> None:
        """Take the file as it is now as seen (after this process wrote it itself)."""
        self._seen = _signature(self.path)

    def changed(self, now: bool = False) -> bool:
        """True if the file was replaced since the last look; `now` looks even if the last look was recent."""
        t = self.monotonic()
        if not now and t < self._next:
            return False
        self._next = t + self.every
        sig = _signature(self.path)
        if sig == self._seen:
            return False
        self._seen = sig
        return sig is not None
