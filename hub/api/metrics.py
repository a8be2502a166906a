"""Prometheus metrics of the hub (prometheus-client), at a cost per scrape that does not grow with the fleet.

tessera_devices{status}                 devices by status                         } counts kept by triggers in
tessera_devices_online                  devices connected now (broker presence)   } `metrics_counts`: O(1)
tessera_certificates_expiring{within}   active certificates expiring within 7 / 30 days (not yet expired):
                                        hourly buckets (`metrics_expiry`, kept by triggers) summed for the whole
                                        hours inside the window, the two partial hours at its ends counted exactly
                                        on the active-expiry index: O(hours in the window + certificates in 2 hours)
tessera_enrollments_total, tessera_renewals_total, tessera_est_denials_total{reason},
tessera_revocation_seconds{action}, tessera_revocation_unconfirmed_total{action}
                                        the hub's event counters (hub/serve/stats.py)
tessera_broker_connections              clients connected to the broker now: Mosquitto's own
                                        `$SYS/broker/clients/connected` (every client: devices, service identities
                                        and the hub's session; refreshed by the broker every sys_interval, 10 s),
                                        read by the hub's admin MQTT session; no sample while that is unknown
tessera_crl_age_seconds{crl}, tessera_crl_next_update_seconds{crl}
                                        the published device / service CRL: now - lastUpdate, nextUpdate - now
                                        (negative: overdue); parsed again only when the file changes
tessera_job_devices{job_id,state}       devices of each running job by state (not `job`: Prometheus owns that label), from the job
                                        row's per-state counters (hub/jobs/schema.py); none without those tables

Why triggers: with 1M devices the same counts as GROUP BY / COUNT queries over the indexes take 0.7-1.5 s a
scrape, the count tables 3 ms (p50; bench/metrics_bench.py). Triggers keep the counts exact whoever writes the
registry (serve, the CLI, another process); each status, presence or certificate change writes one more small
row. `apply_schema` checks them at every API start. On a PostgreSQL registry shared by several hubs, plpgsql
triggers (`PG_METRICS_SCHEMA`) append deltas in each writer's transaction, which every reader first folds into the
same tables (`fold`), so every hub's scrape shows the fleet's counts; every other query is one text for both.
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import datetime, timedelta

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from hub.broker.mqttadmin import SYS_CLIENTS
from hub.registry import sql as dbsql
from hub.registry.store import DEVICE_STATUSES, Registry, _ts
from hub.serve import stats

log = logging.getLogger("tessera.api")

EXPIRY_WINDOWS = (7, 30)
CRL_FILES = {"device": "device.crl", "service": "service.crl.pem"}
HUB_ROLE = "hub"
#: the hub's own broker rights this module needs (the hub role is fixed: nobody else edits it)
HUB_RULES = (("subscribe", SYS_CLIENTS), ("receive", SYS_CLIENTS))

_HOUR = "substr({}, 1, 13)"  # '2027-01-31T05' of a stored timestamp (fixed ISO format: text order = time order)
METRICS_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS metrics_counts (key TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS metrics_expiry (hour TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID""",
    """CREATE TRIGGER IF NOT EXISTS metrics_devices_insert AFTER INSERT ON devices BEGIN
        INSERT INTO metrics_counts VALUES ('status:' || NEW.status, 1) ON CONFLICT(key) DO UPDATE SET n = n + 1;
        INSERT INTO metrics_counts VALUES ('online', NEW.online) ON CONFLICT(key) DO UPDATE SET n = n + NEW.online;
        END""",
    """CREATE TRIGGER IF NOT EXISTS metrics_devices_delete AFTER DELETE ON devices BEGIN
        UPDATE metrics_counts SET n = n - 1 WHERE key = 'status:' || OLD.status;
        UPDATE metrics_counts SET n = n - OLD.online WHERE key = 'online'; END""",
    """CREATE TRIGGER IF NOT EXISTS metrics_devices_status AFTER UPDATE OF status ON devices
        WHEN OLD.status IS NOT NEW.status BEGIN
        UPDATE metrics_counts SET n = n - 1 WHERE key = 'status:' || OLD.status;
        INSERT INTO metrics_counts VALUES ('status:' || NEW.status, 1) ON CONFLICT(key) DO UPDATE SET n = n + 1;
        END""",
    """CREATE TRIGGER IF NOT EXISTS metrics_devices_online AFTER UPDATE OF online ON devices
        WHEN OLD.online IS NOT NEW.online BEGIN
        INSERT INTO metrics_counts VALUES ('online', NEW.online - OLD.online)
            ON CONFLICT(key) DO UPDATE SET n = n + NEW.online - OLD.online; END""",
    f"""CREATE TRIGGER IF NOT EXISTS metrics_certs_insert AFTER INSERT ON certificates
        WHEN NEW.status = 'active' BEGIN
        INSERT INTO metrics_expiry VALUES ({_HOUR.format('NEW.not_after')}, 1)
            ON CONFLICT(hour) DO UPDATE SET n = n + 1; END""",
    f"""CREATE TRIGGER IF NOT EXISTS metrics_certs_delete AFTER DELETE ON certificates
        WHEN OLD.status = 'active' BEGIN
        UPDATE metrics_expiry SET n = n - 1 WHERE hour = {_HOUR.format('OLD.not_after')}; END""",
    f"""CREATE TRIGGER IF NOT EXISTS metrics_certs_leave AFTER UPDATE OF status, not_after ON certificates
        WHEN OLD.status = 'active' BEGIN
        UPDATE metrics_expiry SET n = n - 1 WHERE hour = {_HOUR.format('OLD.not_after')}; END""",
    f"""CREATE TRIGGER IF NOT EXISTS metrics_certs_enter AFTER UPDATE OF status, not_after ON certificates
        WHEN NEW.status = 'active' BEGIN
        INSERT INTO metrics_expiry VALUES ({_HOUR.format('NEW.not_after')}, 1)
            ON CONFLICT(hour) DO UPDATE SET n = n + 1; END""",
)
#: Written by the PostgreSQL triggers, moved into the count tables by `fold`. On SQLite the triggers change the
#: counts in place and these stay empty (created there too: one schema on both dialects).
DELTA_TABLES = (
    """CREATE TABLE IF NOT EXISTS metrics_counts_delta (key TEXT NOT NULL, d INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS metrics_expiry_delta (hour TEXT NOT NULL, d INTEGER NOT NULL)""",
)
#: The same on PostgreSQL: the triggers of the same names call one plpgsql function per concern (device counts,
#: expiry buckets), told by TG_ARGV which change to count, and APPEND a delta row in the writer's transaction
#: instead of updating the count row: an upsert of one row by every row of one transaction (a factory batch, a
#: bulk revoke) leaves a row version per change for the next to walk, quadratic (100k devices in one batch: 233 s
#: instead of 3 s, bench/metrics_pg_bench.py), and every enrollment of every hub would lock the same rows until
#: its commit. `fold` moves the deltas into the count tables in one statement, `INSERT ... ON CONFLICT (key) DO
#: UPDATE SET n = n + excluded.n` over `DELETE ... RETURNING`: a delta is in exactly one of the two tables in any
#: snapshot, and rows a concurrent fold took are skipped by this one's DELETE, so counts stay exact whoever
#: writes or folds at once. (No `?` or `%` in these texts: hub.registry.sql.pg_sql would read them as placeholders.)
PG_METRICS_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS metrics_counts (key TEXT PRIMARY KEY, n INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS metrics_expiry (hour TEXT PRIMARY KEY, n INTEGER NOT NULL)""",
    *DELTA_TABLES,
    """CREATE OR REPLACE FUNCTION metrics_devices_count() RETURNS trigger LANGUAGE plpgsql AS $fn$
    BEGIN
        IF TG_ARGV[0] IN ('delete', 'status') THEN
            INSERT INTO metrics_counts_delta VALUES ('status:' || OLD.status, -1);
        END IF;
        IF TG_ARGV[0] IN ('insert', 'status') THEN
            INSERT INTO metrics_counts_delta VALUES ('status:' || NEW.status, 1);
        END IF;
        IF TG_ARGV[0] = 'insert' AND NEW.online <> 0 THEN
            INSERT INTO metrics_counts_delta VALUES ('online', NEW.online);
        ELSIF TG_ARGV[0] = 'delete' AND OLD.online <> 0 THEN
            INSERT INTO metrics_counts_delta VALUES ('online', -OLD.online);
        ELSIF TG_ARGV[0] = 'online' THEN
            INSERT INTO metrics_counts_delta VALUES ('online', NEW.online - OLD.online);
        END IF;
        RETURN NULL;
    END $fn$""",
    """CREATE OR REPLACE TRIGGER metrics_devices_insert AFTER INSERT ON devices
        FOR EACH ROW EXECUTE FUNCTION metrics_devices_count('insert')""",
    """CREATE OR REPLACE TRIGGER metrics_devices_delete AFTER DELETE ON devices
        FOR EACH ROW EXECUTE FUNCTION metrics_devices_count('delete')""",
    """CREATE OR REPLACE TRIGGER metrics_devices_status AFTER UPDATE OF status ON devices
        FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION metrics_devices_count('status')""",
    """CREATE OR REPLACE TRIGGER metrics_devices_online AFTER UPDATE OF online ON devices
        FOR EACH ROW WHEN (OLD.online IS DISTINCT FROM NEW.online) EXECUTE FUNCTION metrics_devices_count('online')""",
    f"""CREATE OR REPLACE FUNCTION metrics_certs_expiry() RETURNS trigger LANGUAGE plpgsql AS $fn$
    BEGIN
        IF TG_ARGV[0] = 'leave' THEN
            INSERT INTO metrics_expiry_delta VALUES ({_HOUR.format('OLD.not_after')}, -1);
        ELSE
            INSERT INTO metrics_expiry_delta VALUES ({_HOUR.format('NEW.not_after')}, 1);
        END IF;
        RETURN NULL;
    END $fn$""",
    """CREATE OR REPLACE TRIGGER metrics_certs_insert AFTER INSERT ON certificates
        FOR EACH ROW WHEN (NEW.status = 'active') EXECUTE FUNCTION metrics_certs_expiry('enter')""",
    """CREATE OR REPLACE TRIGGER metrics_certs_delete AFTER DELETE ON certificates
        FOR EACH ROW WHEN (OLD.status = 'active') EXECUTE FUNCTION metrics_certs_expiry('leave')""",
    """CREATE OR REPLACE TRIGGER metrics_certs_leave AFTER UPDATE OF status, not_after ON certificates
        FOR EACH ROW WHEN (OLD.status = 'active') EXECUTE FUNCTION metrics_certs_expiry('leave')""",
    """CREATE OR REPLACE TRIGGER metrics_certs_enter AFTER UPDATE OF status, not_after ON certificates
        FOR EACH ROW WHEN (NEW.status = 'active') EXECUTE FUNCTION metrics_certs_expiry('enter')""",
)
_FOLD = tuple(f"""WITH gone AS (DELETE FROM {table}_delta RETURNING {key}, d)
    INSERT INTO {table} SELECT {key}, SUM(d) FROM gone GROUP BY {key}
    ON CONFLICT ({key}) DO UPDATE SET n = {table}.n + excluded.n RETURNING {key}"""
              for table, key in (("metrics_counts", "key"), ("metrics_expiry", "hour")))
#: PostgreSQL's recount: the correction (a fresh count minus what the tables and pending deltas hold) appended as
#: deltas, in ONE statement (one snapshot): presence changes (written without the write lock) during it are
#: counted once, by their own delta, whichever side of the snapshot they commit on.
_PG_RECOUNT = """INSERT INTO metrics_counts_delta (key, d) SELECT key, SUM(d) FROM (
        SELECT 'status:' || status AS key, COUNT(*) AS d FROM devices GROUP BY status
        UNION ALL SELECT 'online', COUNT(*) FROM devices WHERE online = 1
        UNION ALL SELECT key, -n FROM metrics_counts
        UNION ALL SELECT key, -d FROM metrics_counts_delta) AS x GROUP BY key HAVING SUM(d) <> 0"""
_RECOUNT = (  # ~0.7 s at 1M devices
    "DELETE FROM metrics_counts",
    "INSERT INTO metrics_counts SELECT 'status:' || status, COUNT(*) FROM devices GROUP BY status",
    "INSERT INTO metrics_counts SELECT 'online', COUNT(*) FROM devices WHERE online = 1",
)
_REBUCKET = (  # ~4 s at 1M certificates: only when the buckets' total is not the active certificates' count
    "DELETE FROM metrics_expiry",
    f"INSERT INTO metrics_expiry SELECT {_HOUR.format('not_after')}, COUNT(*) FROM certificates "
    "WHERE status = 'active' GROUP BY 1",
)
_BUCKETS_RIGHT = ("SELECT (SELECT COALESCE(SUM(n), 0) FROM metrics_expiry) = "
                  "(SELECT COUNT(*) FROM certificates WHERE status = 'active') AS ok")
_EXACT = "SELECT COUNT(*) AS n FROM certificates WHERE status = 'active' AND not_after > ? AND not_after <= ?"


def apply_schema(registry: Registry, now: datetime) -> bool:
    """The count tables and their triggers, and the hub role's right to read the broker's client count.
    Idempotent. At every API start, in the same transaction, the device counts are recounted and the expiry
    buckets rebuilt if their total is wrong (created now, or a writer bypassed the triggers, such as a migration
    that rebuilds a table): no count stays wrong past a restart. True if the hub role's rules were added now (the
    broker must then re-read the hub's rights)."""
    pg = registry.dialect == dbsql.POSTGRESQL
    with registry.write() as db:  # on PostgreSQL under the write lock: hubs starting at once apply it in turn
        # (certificates change only under that lock: no delta of metrics_expiry_delta is pending after the fold)
        for statement in (*PG_METRICS_SCHEMA, *_FOLD, _PG_RECOUNT, *_FOLD) if pg else \
                (*METRICS_SCHEMA, *DELTA_TABLES, *_RECOUNT):
            db.execute(statement)
        if not next(db.query(_BUCKETS_RIGHT))["ok"]:
            for statement in _REBUCKET:
                db.execute(statement)
        added = 0
        if next(db.query("SELECT 1 AS one FROM roles WHERE name = ?", [HUB_ROLE]), None):
            for action, pattern in HUB_RULES:
                added += db.execute("INSERT INTO role_rules (role, action, pattern) VALUES (?, ?, ?) "
                                    "ON CONFLICT DO NOTHING", [HUB_ROLE, action, pattern]).rowcount
        if added:
            from hub.authz.policy import HUB_PRINCIPAL

            Registry.authz_event(db, HUB_PRINCIPAL, "hub rights: the broker's client count", now)
    return bool(added)


def prepare(live) -> None:
    """At API start (hub/api/server.py start_api): this schema and the expiry report's index (hub/reports), then
    the admin session follows the broker's client count (once the broker applied the hub's new rights, when they
    were just added)."""
    from hub.reports.expiry import apply_schema as apply_report_schema

    apply_report_schema(live.registry)
    if apply_schema(live.registry, live.clock()):
        try:
            live.broker.sync()
        except Exception as exc:  # noqa: BLE001  (the plugin applies the rights on its next tick anyway)
            log.warning("broker did not confirm the hub's new rights: %s", exc)
    if live.admin is not None:
        live.admin.watch_broker_clients()


def fold(registry: Registry) -> None:
    """Before reading the count tables: on PostgreSQL the triggers' pending deltas moved into them (two
    statements, each atomic on its own: no write lock needed, writers only append deltas); nothing on SQLite."""
    if registry.dialect == dbsql.POSTGRESQL:
        for statement in _FOLD:
            registry.query(statement)


def tables(registry: Registry, names: tuple[str, ...]) -> set[str]:
    """Which of the tables `names` the registry has (one catalog query, either dialect)."""
    marks = ", ".join("?" * len(names))
    if registry.dialect == dbsql.POSTGRESQL:
        sql = (f"SELECT tablename AS name FROM pg_catalog.pg_tables WHERE schemaname = current_schema() "
               f"AND tablename IN ({marks})")
    else:
        sql = f"SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ({marks})"
    return {r["name"] for r in registry.query(sql, list(names))}


def _hour_start(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def expiring(registry: Registry, start: datetime, end: datetime) -> int:
    """Active certificates with start < not_after <= end: whole hours from the buckets, the partial hours at the
    two ends counted exactly (index range)."""
    first_full, last_start = _hour_start(start) + timedelta(hours=1), _hour_start(end)
    exact = lambda a, b: int(registry.query(_EXACT, [_ts(a), _ts(b)])[0]["n"])  # noqa: E731
    if first_full > last_start:  # the window is inside one or two hours
        return exact(start, end)
    n = exact(start, first_full - timedelta(microseconds=1)) + exact(last_start - timedelta(microseconds=1), end)
    if first_full < last_start:
        n += int(registry.query("SELECT COALESCE(SUM(n), 0) AS n FROM metrics_expiry WHERE hour >= ? AND hour < ?",
                                [_ts(first_full)[:13], _ts(last_start)[:13]])[0]["n"])
    return n


class _CrlTimes:
    """lastUpdate / nextUpdate of a CRL file, parsed again only when its (mtime, size, inode) changes."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[tuple, datetime, datetime | None]] = {}
        self._lock = threading.Lock()

    def get(self, path: os.PathLike) -> tuple[datetime, datetime | None] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            hit = self._cache.get(str(path))
            if hit is not None and hit[0] == key:
                return hit[1], hit[2]
        from cryptography import x509

        try:
            with open(path, "rb") as fh:
                data = fh.read()
            crl = (x509.load_pem_x509_crl(data) if data.lstrip().startswith(b"-----BEGIN")
                   else x509.load_der_x509_crl(data))
            times = (crl.last_update_utc, crl.next_update_utc)
        except (OSError, ValueError) as exc:
            log.warning("metrics: CRL %s unreadable: %s", path, exc)
            return None
        with self._lock:
            self._cache[str(path)] = (key, *times)
        return times


class FleetCollector:
    """Registry-backed gauges, computed at scrape time from the count tables and indexes."""

    def __init__(self, api):
        self.api = api
        self.crls = _CrlTimes()

    def describe(self):
        return []  # no collection at registration time

    def collect(self):
        reg, now = self.api.registry, self.api.clock()
        fold(reg)
        counts = {r["key"]: r["n"] for r in reg.query("SELECT key, n FROM metrics_counts")}
        by_status = GaugeMetricFamily("tessera_devices", "Devices by status", labels=["status"])
        for status in DEVICE_STATUSES:
            by_status.add_metric([status], counts.get(f"status:{status}", 0))
        yield by_status
        yield GaugeMetricFamily("tessera_devices_online", "Devices connected now", value=counts.get("online", 0))
        exp = GaugeMetricFamily("tessera_certificates_expiring",
                                "Active device certificates expiring within N days (not yet expired)",
                                labels=["within"])
        for days in EXPIRY_WINDOWS:
            exp.add_metric([f"{days}d"], expiring(reg, now, now + timedelta(days=days)))
        yield exp
        yield self._broker()
        yield from self._crl(now)
        yield self._jobs(reg)

    def _broker(self) -> GaugeMetricFamily:
        fam = GaugeMetricFamily("tessera_broker_connections",
                                "Clients connected to the broker now (Mosquitto $SYS/broker/clients/connected, "
                                "refreshed every sys_interval; absent while unknown)")
        admin = getattr(self.api.live, "admin", None)
        value = getattr(admin, "broker_clients", None)
        if value is not None and admin.connected.is_set():
            fam.add_metric([], value)
        return fam

    def _crl(self, now: datetime):
        age = GaugeMetricFamily("tessera_crl_age_seconds", "Seconds since the published CRL's lastUpdate",
                                labels=["crl"])
        nxt = GaugeMetricFamily("tessera_crl_next_update_seconds",
                                "Seconds until the published CRL's nextUpdate (negative: overdue)", labels=["crl"])
        for name, filename in CRL_FILES.items():
            times = self.crls.get(self.api.cfg.crl_dir / filename)
            if times is None:
                continue
            age.add_metric([name], (now - times[0]).total_seconds())
            if times[1] is not None:
                nxt.add_metric([name], (times[1] - now).total_seconds())
        yield age
        yield nxt

    def _jobs(self, reg: Registry) -> GaugeMetricFamily:
        fam = GaugeMetricFamily("tessera_job_devices", "Devices of each running job by state",
                                labels=["job_id", "state"])
        errors = dbsql.driver_errors()  # sqlite3's, and SQLAlchemy's (psycopg's wrapped) on a PostgreSQL registry
        try:
            if len(tables(reg, ("jobs", "job_devices"))) < 2:
                return fam
            running = reg.query("SELECT * FROM jobs WHERE state = 'running' ORDER BY id")
            for job in running:
                counters = {k[2:]: v for k, v in job.items() if k.startswith("n_")}
                if not counters:  # no per-state counters on the job row: count its devices (an index range)
                    counters = {r["state"]: r["n"] for r in reg.query(
                        "SELECT state, COUNT(*) AS n FROM job_devices WHERE job_id = ? GROUP BY state", [job["id"]])}
                for state, n in sorted(counters.items()):
                    fam.add_metric([str(job["id"]), str(state)], n)
        except errors as exc:  # another shape of the jobs tables than expected: no job metrics
            log.warning("metrics: job counts unavailable: %s", exc)
        return fam


class _HubCounters:
    """The hub's event counters (hub/serve/stats.py) inside this exposition."""

    def __init__(self, registry: Registry):
        self.stats = stats.of(registry)

    def describe(self):
        return []

    def collect(self):
        return self.stats.registry.collect()


def render(api) -> tuple[bytes, str]:
    """The exposition text and its content type (one collector registry per API instance)."""
    registry = getattr(api, "_metrics_registry", None)
    if registry is None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(FleetCollector(api))
        registry.register(_HubCounters(api.registry))
        api._metrics_registry = registry
    return generate_latest(registry), CONTENT_TYPE_LATEST
