"""Which hub's job runner drives the jobs: a lease row (`jobs_leader`) on a PostgreSQL registry; on SQLite this hub.

Several `tessera-hub serve` processes may share one PostgreSQL registry, and each runs a JobRunner. If two drove
the jobs, every device would be sent its command twice and each job's rate doubled, so only the lease holder sends,
times out and finishes jobs; every hub still applies the acks it receives (hub/jobs/runner.py).

The lease: one row `jobs_leader(id = 1, holder, until)`. `holder` is unique per runner (host, pid and random
bytes: a restarted hub is a new holder). The holder renews it every RENEW seconds to now + LEASE; another hub
takes it only once `until` has passed, in one write transaction (the registry's advisory write lock, and the
upsert's own WHERE) so two followers never both win. A hub that stops cleanly deletes its row, so another takes
over at its next tick; a hub killed with SIGKILL (or frozen, or cut off from the database) simply stops renewing,
and another takes over LEASE seconds after its last renewal. The holder stops sending once its own `until` has
passed without a renewal (`valid`), so a stalled leader does not keep sending after a follower may have taken over.

Why a lease and not a session-level pg_try_advisory_lock on a dedicated connection: the advisory lock is released
only when the server notices the session is gone. After a SIGKILL on a live machine the kernel closes the socket
and that is quick, but after a power loss or a network cut the server waits for TCP keepalive (hours by default),
a hub that hangs keeps the lock while driving nothing, and a pooled or proxied connection (pool_pre_ping's
reconnect, PgBouncer in transaction mode) can drop or share the lock without the hub knowing. The lease bounds
every one of those to LEASE seconds, needs no connection of its own, and runs on the runner's clock, so tests
drive take-overs with a fake clock instead of sleeping.

The times are the hubs' own clocks (UTC, stored timestamp text: text order is time order). Hubs of one fleet run
NTP; a clock ahead of the holder's by more than LEASE - RENEW (8 s) could take the lease early.

On SQLite there is one hub per registry file (the Mosquitto plugin reads that file), so leadership is trivially
held and no row is written: a hub restarted on SQLite resumes its jobs at once, instead of waiting out the lease
of its previous process.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from datetime import datetime, timedelta

from hub.registry import sql as dbsql
from hub.registry.store import Registry

from .store import ts

log = logging.getLogger("tessera.jobs")

LEASE = 10.0  # seconds a lease lasts past its last renewal
RENEW = 2.0  # seconds between the holder's renewals


def new_holder() -> str:
    """A runner's id: this host and process, and random bytes (pids are reused, hosts share names)."""
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{secrets.token_hex(4)}"


class Lease:
    """This runner's view of the jobs lease. `held(now)` at every tick; `valid(now)` while sending; `release`."""

    def __init__(self, registry: Registry, holder: str | None = None, lease: float = LEASE, renew: float = RENEW):
        if not 0 < renew < lease:
            raise ValueError("the lease must last longer than the time between renewals")
        self.registry, self.holder = registry, holder or new_holder()
        self.lease, self.renew = timedelta(seconds=lease), timedelta(seconds=renew)
        self.trivial = registry.dialect != dbsql.POSTGRESQL
        self.until: datetime | None = None  # this runner holds the lease until then (None: it does not)
        self._renewed: datetime | None = None

    def valid(self, now: datetime) -> bool:
        """Whether this runner may act now, by what it last wrote (no query: checked before each send)."""
        return self.trivial or (self.until is not None and now < self.until)

    def held(self, now: datetime) -> bool:
        """Whether this runner leads now: renews the lease when due (one write every RENEW seconds), or as a
        follower reads the row (one read a tick) and takes it once it is free or expired."""
        if self.trivial:
            return True
        if self.until is not None and self._renewed is not None and self._renewed <= now < self._renewed + self.renew:
            return now < self.until
        if self.until is None:
            rows = self.registry.query("SELECT holder, until FROM jobs_leader WHERE id = 1")
            if rows and rows[0]["holder"] != self.holder and rows[0]["until"] > ts(now):
                return False
        return self._claim(now)

    def _claim(self, now: datetime) -> bool:
        until = now + self.lease
        with self.registry.write() as db:
            rows = list(db.query("SELECT holder, until FROM jobs_leader WHERE id = 1"))
            won = bool(list(db.query(
                "INSERT INTO jobs_leader (id, holder, until) VALUES (1, ?, ?) ON CONFLICT (id) DO UPDATE "
                "SET holder = excluded.holder, until = excluded.until "
                "WHERE jobs_leader.holder = excluded.holder OR jobs_leader.until <= ? RETURNING holder",
                [self.holder, ts(until), ts(now)])))
            before = rows[0] if rows else None
            if won and (before is None or before["holder"] != self.holder):
                after = f"; {before['holder']}'s lease ran until {before['until']}" if before else ""
                self.registry.append_audit(db, [(ts(now), "hub", "jobs.lead", None, "ok",
                                                 f"{self.holder} drives the jobs now{after}", None)])
        if won:
            if self.until is None:
                log.info("job runner %s leads the jobs now (lease %.0f s)", self.holder, self.lease.total_seconds())
            self.until, self._renewed = until, now
        else:
            if self.until is not None:
                log.warning("job runner %s lost the jobs lease to %s", self.holder,
                            before["holder"] if before else "nobody")
            self.until = self._renewed = None
        return won

    def release(self) -> None:
        """Give the lease up (a clean stop): another hub takes over at its next tick."""
        if self.trivial or self.until is None:
            return
        with self.registry.write() as db:
            db.execute("DELETE FROM jobs_leader WHERE id = 1 AND holder = ?", [self.holder])
        log.info("job runner %s released the jobs lease", self.holder)
        self.until = self._renewed = None
