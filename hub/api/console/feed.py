"""The console's live feed: one poller per API follows the registry cheaply and fans events out to the server-sent
event streams (GET /console/events).

Every POLL_S seconds: presence by `devices(last_seen)` after the last watermark (also recorded as presence history),
new audit rows by id > last, and the jobs some stream watches by primary key (sent when their state or counts
changed); after presence changes, the device counts (hub/api/metrics.py's trigger-kept table) for the overview. Nothing is polled per stream; a stream gets a heartbeat comment every HEARTBEAT_S seconds, and every
stream ends when the API shuts down (`stop`, on the app's on_shutdown), so the hub's shutdown never waits on one.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from hub.registry.store import Registry

from . import data

log = logging.getLogger("tessera.console")

POLL_S = 1.0
HEARTBEAT_S = 15.0
MAX_STREAMS = 200
QUEUE_MAX = 1000
BATCH = 1000


@dataclass(eq=False)
class Stream:
    """One SSE client: what it wants (presence / audit / job ids; optionally one device) and its queue."""

    presence: bool
    audit: bool
    jobs: frozenset[int]
    counts: bool = False  # device counts by status and online, sent after presence changes
    device: str | None = None
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(QUEUE_MAX))

    def offer(self, kind: str, item: dict[str, Any]) -> None:
        if self.device is not None and kind in ("presence", "audit") and item.get("device_id") != self.device:
            return
        try:
            self.queue.put_nowait((kind, item))
        except asyncio.QueueFull:  # a stalled client loses events, never the hub's memory
            pass


class Feed:
    def __init__(self, api):
        self.api = api
        self.streams: set[Stream] = set()
        self.stopping = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._seen_at: str | None = None
        self._seen_ids: set[str] = set()
        self._audit_id = 0
        self._jobs: dict[int, str] = {}

    # --- the poller -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Idempotent: the first call starts the poller (with the hub; or, where the API runs without a live hub,
        e.g. the CLI's in-process API, with the first stream)."""
        if self._task is not None or self.stopping.is_set():
            return
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def _init(self) -> None:
        reg: Registry = self.api.registry
        data.apply_schema(reg)
        self._seen_at = reg.query("SELECT MAX(last_seen) AS m FROM devices")[0]["m"] or ""
        self._audit_id = reg.query("SELECT COALESCE(MAX(id), 0) AS m FROM audit")[0]["m"]

    async def stop(self) -> None:
        self.stopping.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass

    async def _loop(self) -> None:
        ready = False
        while not self.stopping.is_set():
            try:
                if not ready:
                    await self.api.run(self._init)
                    ready = True
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001  (a failed poll is retried next time)
                log.exception("console feed poll failed")
            try:
                await asyncio.wait_for(self.stopping.wait(), POLL_S)
            except asyncio.TimeoutError:
                pass

    async def poll(self) -> None:
        presence = await self.api.run(self._presence)
        audit = await self.api.run(self._audit) if any(s.audit for s in self.streams) else []
        jobs = await self.api.run(self._job_changes) if any(s.jobs for s in self.streams) else []
        counts = (await self.api.run(data.device_counts, self.api.registry)
                  if presence and any(s.counts for s in self.streams) else None)  # O(1): trigger-kept counts
        for stream in list(self.streams):
            if stream.counts and counts is not None:
                stream.offer("counts", counts)
            if stream.presence:
                for row in presence:
                    stream.offer("presence", row)
            if stream.audit:
                for row in audit:
                    stream.offer("audit", row)
            for job in jobs:
                if job["id"] in stream.jobs:
                    stream.offer("job", job)

    def _presence(self) -> list[dict[str, Any]]:
        """Devices whose presence changed since the watermark (devices(last_seen) index), recorded as history."""
        reg: Registry = self.api.registry
        rows = reg.query("SELECT id AS device_id, id, online, last_seen, status FROM devices WHERE last_seen >= ? "
                         "ORDER BY last_seen LIMIT ?", [self._seen_at or "", BATCH])
        fresh = [r for r in rows if not (r["last_seen"] == self._seen_at and r["id"] in self._seen_ids)]
        if rows:
            top = rows[-1]["last_seen"]
            if top != self._seen_at:
                self._seen_at, self._seen_ids = top, set()
            self._seen_ids |= {r["id"] for r in rows if r["last_seen"] == top}
        data.record_presence(reg, fresh, self.api.clock())
        return [{"device_id": r["id"], "online": bool(r["online"]), "at": r["last_seen"], "status": r["status"]}
                for r in fresh]

    def _audit(self) -> list[dict[str, Any]]:
        rows = self.api.registry.query("SELECT id, at, actor, action, device_id, outcome, detail FROM audit "
                                       "WHERE id > ? ORDER BY id LIMIT ?", [self._audit_id, BATCH])
        if rows:
            self._audit_id = rows[-1]["id"]
        return rows

    def _job_changes(self) -> list[dict[str, Any]]:
        from hub.jobs import store
        from hub.api.queries import NotFound

        wanted = set().union(*(s.jobs for s in self.streams))
        out = []
        for job_id in sorted(wanted):
            try:
                job = store.get_job(self.api.registry, job_id)
            except NotFound:
                continue
            key = json.dumps([job["state"], job["counts"], job["reason"]])
            if self._jobs.get(job_id) != key:
                self._jobs[job_id] = key
                out.append({k: job[k] for k in ("id", "state", "counts", "total", "reason", "started", "finished")})
        for job_id in set(self._jobs) - wanted:
            del self._jobs[job_id]
        return out

    # --- one stream ---------------------------------------------------------------------------------------------
    async def serve(self, request: web.Request, stream: Stream, first: list[tuple[str, dict]]) -> web.StreamResponse:
        if len(self.streams) >= MAX_STREAMS:
            raise web.HTTPServiceUnavailable(text="too many live streams")
        await self.start()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no", "X-Content-Type-Options": "nosniff"})
        await resp.prepare(request)
        self.streams.add(stream)
        if stream.jobs:
            self._jobs.clear()  # a new watcher gets the current state on the next poll
        try:
            await resp.write(b"retry: 3000\n\n")
            for kind, item in first:
                await resp.write(_event(kind, item))
            while not self.stopping.is_set():
                getter = asyncio.ensure_future(stream.queue.get())
                stopper = asyncio.ensure_future(self.stopping.wait())
                done, pending = await asyncio.wait({getter, stopper}, timeout=HEARTBEAT_S,
                                                   return_when=asyncio.FIRST_COMPLETED)
                for fut in pending:
                    fut.cancel()
                if getter in done:
                    kind, item = getter.result()
                    await resp.write(_event(kind, item))
                elif not self.stopping.is_set():
                    await resp.write(b": heartbeat\n\n")
        except ConnectionResetError:
            pass
        finally:  # (a cancelled handler, e.g. the client went away, propagates after this)
            self.streams.discard(stream)
        try:
            await resp.write(b"event: bye\ndata: {}\n\n")
            await resp.write_eof()
        except (ConnectionResetError, RuntimeError):
            pass
        return resp


def _event(kind: str, item: dict[str, Any]) -> bytes:
    # json.dumps escapes nothing HTML-relevant, but the browser parses this only with JSON.parse (no markup)
    return f"event: {kind}\ndata: {json.dumps(item, default=str)}\n\n".encode()
