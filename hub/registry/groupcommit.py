"""Group commit of the registry's issuing transactions: the certificates of concurrent enrollments, one fsync.

A SQLite commit in WAL mode with synchronous=FULL waits for an fsync of the WAL (about 3 ms on the CI machine's
disk), under the write lock that every writer of every process queues on (Registry._write: a thread lock, then an
flock). One commit per enrollment capped the whole hub near 1/fsync, about 330 enrollments/s, however many EST
worker processes signed in parallel: the second worker added CPU, not enrollments.

`run(registry, body, cert)` queues the transaction body; the thread leading its process takes the registry's write
lock and the flock (waiting, maybe, for another process's commit) and then runs every body queued in its process by
then in one BEGIN IMMEDIATE transaction, each in its own SAVEPOINT (a body that raises
is rolled back alone and its exception goes to its caller, as before), and commits once: all of them durable at
that one fsync, each caller answered after it (see `run` for who leads). Nothing
changes for one request at a time (a batch of one); the token check and spend stay one atomic step (inside the
same transaction, under the same locks); the audit chain reads its head in the transaction, so rows of one batch
chain in order.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

SAVEPOINT = "tessera_issue"


class _Pending:
    __slots__ = ("body", "cert", "result", "error", "done", "lead", "event")

    def __init__(self, body: Callable[[Any, Any], Any], cert: Any):
        self.body, self.cert = body, cert
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False
        self.lead = False                # woken to commit the next batch (its own body not run yet)
        self.event = threading.Event()   # set when done, or when it is to lead


class _Queue:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[_Pending] = []
        self.leading = False             # a thread of this process commits (or waits for the locks to)


_queues_lock = threading.Lock()


def _queue(registry: Any) -> _Queue:
    queue = registry.__dict__.get("_group_commit")
    if queue is None:
        with _queues_lock:
            queue = registry.__dict__.setdefault("_group_commit", _Queue())
    return queue


def run(registry: Any, body: Callable[[Any, Any], Any], cert: Any) -> Any:
    """`body(db, cert)` in a write transaction shared with the other bodies queued meanwhile; its result, or its
    exception raised here. A registry that is not SQLite (no flock) runs it in a transaction of its own.

    One thread of the process leads at a time: it takes the write lock and the flock, then the batch; the others
    wait on their own event (never in a queue on the write lock, where each done thread would have to take and
    give back the lock in turn, a GIL switch apiece); when it is done it wakes them and hands the lead to the
    first body queued meanwhile."""
    if getattr(registry, "_engine", None) is not None:
        with registry._write(late_lock=True) as db:  # the write lock shared; the chain's at the audit row
            return body(db, cert)
    queue = _queue(registry)
    item = _Pending(body, cert)
    with queue.lock:
        queue.items.append(item)
        lead = not queue.leading
        queue.leading = True
    if not lead:
        item.event.wait()
        if item.done:
            return _outcome(item)
    batch: list[_Pending] = []
    try:
        with registry._write_lock, registry._process_lock():  # (what queued meanwhile joins this batch)
            with queue.lock:
                batch, queue.items = queue.items, []
            _commit(registry, batch)
    finally:
        with queue.lock:
            if not batch and item in queue.items:  # failed before it took the batch: its own body leaves
                queue.items.remove(item)
            following = queue.items[0] if queue.items else None
            queue.leading = following is not None
            if following is not None:
                following.lead = True
        for done in batch:
            done.event.set()
        if following is not None:
            following.event.set()
    return _outcome(item)


def _outcome(item: _Pending) -> Any:
    if item.error is not None:
        raise item.error
    return item.result


def _commit(registry: Any, batch: list[_Pending]) -> None:
    """One transaction for `batch` (the caller holds the write lock and the flock); every item done afterwards,
    whatever happened."""
    try:
        db = registry._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            for item in batch:
                db.execute(f"SAVEPOINT {SAVEPOINT}")
                try:
                    item.result = item.body(db, item.cert)
                except BaseException as exc:  # this one alone is undone; its caller gets the exception
                    db.execute(f"ROLLBACK TO {SAVEPOINT}")
                    item.error = exc
                db.execute(f"RELEASE {SAVEPOINT}")
            db.execute("COMMIT")
        except BaseException:
            db.rollback()
            raise
    except BaseException as exc:  # nothing of the batch was committed (the registry closed, the disk full...)
        for item in batch:
            if item.error is None:
                item.result, item.error = None, exc
    finally:
        for item in batch:
            item.done = True
