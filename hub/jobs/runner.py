"""The job runner: a thread of `tessera-hub serve` that moves every running job forward a tick (~200 ms) at a time.

Each tick: apply the command acks the hub saw since the last tick (an ack listener on LiveHub queues them; an ack
is matched to its device row by command id, so acks of commands sent before a hub restart still count), time out
devices sent too long ago (running and paused jobs), then for each running job let the engine decide: abort,
complete, expire the devices still waiting at the deadline, or send the next devices the rate allows.

Sending walks the job's queued devices in id order from a cursor, at most SCAN rows a tick (bounded work however
large the job): an online device is sent the command (`LiveHub.send_command`) while tokens last; an offline one is
marked `offline` at once under the `fail` policy, or skipped (it stays queued; the cursor wraps around) under
`wait`. Everything the runner knows lives in the registry except the token bucket and the cursor, which start
afresh (full bucket, first queued device) after a restart: a hub restart resumes every running job.

Several hubs on one PostgreSQL registry: only the holder of the jobs lease (hub/jobs/leader.py) times out, sends
and finishes; a follower's tick only applies the acks its hub received (acks reach whichever hub's MQTT session the
broker delivered them to). Applying an ack twice counts it once (store.apply_acks). A follower may see an ack
before the leader has recorded that send (the leader records a tick's sends after publishing them): an ack whose
command id no job device has yet is kept and tried again for ACK_KEEP seconds. A runner that takes the lease over
starts with fresh buckets and cursors, as after a restart.

Presence settles after a start: the broker restarted with the hub, so a device's `online` flag is only news once
the device has reconnected since (its `last_seen` is after the start). For SETTLE seconds after the start, a device
without fresh presence is neither sent nor marked offline: it is looked at again later (as under `wait`), so a
hub restart does not fail the devices that simply have not reconnected yet.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from hub.broker import BrokerError

from . import engine, store
from .leader import Lease

log = logging.getLogger("tessera.jobs")

TICK = 0.2  # seconds between ticks
SCAN = 500  # queued devices a job's tick looks at, at most
MAX_ACKS = 5000  # acks applied in one transaction
SETTLE = 30.0  # seconds after the start during which only fresh presence counts (agents reconnect with backoff)
ACK_KEEP = 10.0  # seconds a follower keeps an ack of a command no job device has yet (see the module docstring)


class JobRunner:
    """Runs the jobs of one hub: `start(stop)` its thread, `on_ack` is LiveHub's ack listener, `tick` one step."""

    def __init__(self, live, clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 tick: float = TICK, settle: float = SETTLE, lease: Lease | None = None):
        self.live, self.registry, self.clock, self.interval = live, live.registry, clock, tick
        self.lease = lease or Lease(self.registry)
        self.started = clock()
        self._started_ts = store.ts(self.started)
        self.settle = settle
        self._acks: queue.SimpleQueue = queue.SimpleQueue()
        self._unknown: list[tuple[datetime, tuple[str, str, bool, str]]] = []  # (received, ack), followers only
        self._buckets: dict[int, engine.Bucket] = {}
        self._cursors: dict[int, str] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # --- acks -------------------------------------------------------------------------------------------------------
    def on_ack(self, device_id: str, ack: dict) -> None:
        """Called by LiveHub for every well-formed ack (any thread): queued for the next tick."""
        self._acks.put((device_id, ack))

    def _drain_acks(self, now: datetime, leader: bool = True) -> None:
        batch: list[tuple[str, str, bool, str]] = []
        while len(batch) < MAX_ACKS:
            try:
                device_id, ack = self._acks.get_nowait()
            except queue.Empty:
                break
            ok = ack.get("ok") is True
            if ok:
                detail = json.dumps(ack.get("result"), sort_keys=True)
            else:
                detail = str(ack.get("error") or "failed without an error message")
            batch.append((device_id, ack["id"], ok, detail[:500]))
        if batch or self._unknown:
            self._apply(batch, now, leader)

    def _apply(self, batch: list[tuple[str, str, bool, str]], now: datetime, leader: bool) -> None:
        keep = now - timedelta(seconds=ACK_KEEP)
        waiting = [(at, ack) for at, ack in self._unknown if at >= keep]
        known = store.known_commands(self.registry, [ack[1] for _, ack in waiting])  # a read: no write lock
        self._unknown = [(at, ack) for at, ack in waiting if ack[1] not in known]
        batch = batch + [ack for _, ack in waiting if ack[1] in known]
        if not batch:
            return
        unknown: list | None = None if leader else []
        store.apply_acks(self.registry, batch, now, unknown)
        self._unknown += [(now, ack) for ack in unknown or ()]

    # --- the loop ---------------------------------------------------------------------------------------------------
    def start(self, stop: threading.Event | None = None) -> threading.Thread:
        if stop is not None:
            self._stop = stop

        def loop() -> None:
            while not self._stop.wait(self.interval):
                try:
                    self.tick()
                except Exception:  # noqa: BLE001  (a bad tick is logged; the next one retries)
                    log.exception("job runner tick failed")

        self._thread = threading.Thread(target=loop, name="job-runner", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        """End the thread, apply the acks still queued, then give up the jobs lease (another hub takes over)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()
        self.lease.release()

    def flush(self) -> None:
        """Apply every ack queued so far. serve calls it once its MQTT session has ended (after the runner thread
        stopped), so no ack the hub received is lost at a shutdown."""
        while not self._acks.empty():
            self._drain_acks(self.clock())

    def tick(self) -> None:
        now = self.clock()
        leader = self.lease.held(now)
        self._drain_acks(now, leader)
        if not leader:  # another hub drives the jobs; if it takes over later, it starts afresh
            self._buckets.clear()
            self._cursors.clear()
            return
        active = store.active_jobs(self.registry)
        for row in active:
            spec = store.spec_of(row)
            if row["n_sent"]:
                store.time_out(self.registry, row["id"], engine.timed_out_before(spec, now), now,
                               retries=spec.retries)
            if row["state"] == "running":
                self._advance(row["id"], spec, now)
        ids = {row["id"] for row in active}
        for gone in set(self._buckets) - ids:
            self._buckets.pop(gone, None)
            self._cursors.pop(gone, None)

    def _advance(self, job_id: int, spec: engine.Spec, now: datetime) -> None:
        rows = self.registry.query("SELECT * FROM jobs WHERE id = ?", [job_id])
        if not rows or rows[0]["state"] != "running":
            return
        row = rows[0]
        counts = store.counts_of(row)
        bucket = engine.refill(self._buckets.get(job_id) or engine.new_bucket(spec, now), spec, now, counts)
        decision = engine.decide(spec, counts, bucket, now)
        if decision.abort:
            if store.finish(self.registry, job_id, "aborted", decision.abort, now):
                log.warning("job %d aborted: %s", job_id, decision.abort)
            return
        if decision.complete:
            if store.finish(self.registry, job_id, "completed", None, now):
                log.info("job %d completed: %s", job_id, counts.as_dict())
            return
        if decision.expire_queued:
            store.expire_queued(self.registry, job_id, now, "still offline at the job's deadline")
            return
        self._buckets[job_id] = self._send(row, spec, bucket, decision.send, now)

    def _send(self, row: dict[str, Any], spec: engine.Spec, bucket: engine.Bucket, budget: int,
              now: datetime) -> engine.Bucket:
        job_id = row["id"]
        if budget == 0 and spec.offline == "wait":
            return bucket
        cursor = self._cursors.get(job_id, "")
        queued = store.next_queued(self.registry, job_id, cursor, SCAN)
        if not queued:
            self._cursors[job_id] = ""  # wrap around: waiting devices may be online now
            return bucket
        args = json.loads(row["args"])
        actor = f"{row['created_by']} (job {job_id})"
        sent: list[tuple[str, str]] = []
        offline: list[str] = []
        settling = (now - self.started).total_seconds() < self.settle
        try:
            for item in queued:
                fresh = (item["last_seen"] or "") >= self._started_ts
                if settling and not (item["online"] and fresh):
                    cursor = item["device_id"]  # presence unknown yet since the start: look again later
                    continue
                action = engine.offline_action(spec, bool(item["online"]))
                if action == "send":
                    if budget <= 0 or not self.lease.valid(self.clock()):
                        break  # (the lease ran out unrenewed: another hub may lead now)
                    try:
                        cid = self.live.send_command(item["device_id"], row["command"], args, actor=actor)
                    except BrokerError as exc:
                        log.warning("job %d: cannot send to %s now (%s); retrying", job_id, item["device_id"], exc)
                        break
                    except ValueError:  # no such device (any more)
                        offline.append(item["device_id"])
                    else:
                        sent.append((item["device_id"], cid))
                        bucket = engine.spend(bucket, 1)
                        budget -= 1
                elif action == "offline":
                    offline.append(item["device_id"])
                cursor = item["device_id"]
        finally:
            self._cursors[job_id] = cursor
            if sent:
                store.record_sent(self.registry, job_id, sent, now)
            if offline:
                store.mark_offline(self.registry, job_id, offline, now, "offline when its turn came")
        return bucket
