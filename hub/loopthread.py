"""An aiohttp runner served by an asyncio loop in a thread of its own: started, and stopped by calling it.

The fleet API (hub/api/server.py) and the plain-HTTP CRL listener (hub/serve/crlhttp.py) each run one next to
`serve`'s other threads.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Callable


class LoopThread:
    """`runner` (already set up on `loop`) served on its own thread; `port` is the bound port. Calling it stops it
    (idempotent): the runner is cleaned up, the loop stopped and the thread joined, then `after_stop` runs."""

    def __init__(self, loop: asyncio.AbstractEventLoop, runner, port: int, name: str,
                 after_stop: Callable[[], None] = lambda: None):
        self.loop, self.runner, self.port, self._after_stop = loop, runner, port, after_stop
        self._stopped = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def __call__(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)
            self._after_stop()
