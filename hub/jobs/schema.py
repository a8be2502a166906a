"""The jobs side tables in the registry file (`jobs`, `job_devices`) and their indexes; `apply_schema` is idempotent.

Per-state counts live on the job row (`n_<state>` columns), changed in the same transaction as every device
transition, so reading a job's progress or deciding a tick never counts rows. Every query the runner and the API
make is an index range:
  next devices to send      job_devices PRIMARY KEY (job_id, device_id) walked with state = 'queued' via
                            job_devices_state (job_id, state, device_id), keyset on device_id
  timeouts                  job_devices_sent (job_id, sent_at) WHERE state = 'sent'
  an ack                    job_devices_command (command_id) UNIQUE WHERE command_id IS NOT NULL
  device list (by state)    job_devices_state, keyset on device_id
  active jobs / job list    jobs_state (state, id); the jobs primary key, newest first
"""

from __future__ import annotations

from hub.registry.store import Registry

JOBS_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, command TEXT NOT NULL,
        args TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(args)),
        selector TEXT NOT NULL CHECK (json_valid(selector)),
        rate_per_minute REAL NOT NULL, timeout_s REAL NOT NULL, abort_percent REAL NOT NULL,
        min_finished INTEGER, offline TEXT NOT NULL CHECK (offline IN ('fail', 'wait')), deadline TEXT,
        ramp_start REAL, ramp_factor REAL, ramp_every INTEGER, max_in_flight INTEGER,
        retries INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL CHECK (state IN ('running', 'paused', 'completed', 'aborted', 'cancelled')),
        total INTEGER NOT NULL DEFAULT 0,
        n_queued INTEGER NOT NULL DEFAULT 0, n_sent INTEGER NOT NULL DEFAULT 0, n_acked INTEGER NOT NULL DEFAULT 0,
        n_failed INTEGER NOT NULL DEFAULT 0, n_timed_out INTEGER NOT NULL DEFAULT 0,
        n_offline INTEGER NOT NULL DEFAULT 0,
        created_by TEXT NOT NULL, created TEXT NOT NULL, started TEXT, finished TEXT, reason TEXT)""",
    """CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, id)""",
    """CREATE TABLE IF NOT EXISTS job_devices (
        job_id INTEGER NOT NULL REFERENCES jobs(id), device_id TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('queued', 'sent', 'acked', 'failed', 'timed_out', 'offline')),
        command_id TEXT, attempts INTEGER NOT NULL DEFAULT 0, sent_at TEXT, finished_at TEXT, detail TEXT,
        PRIMARY KEY (job_id, device_id)) WITHOUT ROWID""",
    """CREATE INDEX IF NOT EXISTS job_devices_state ON job_devices(job_id, state, device_id)""",
    """CREATE INDEX IF NOT EXISTS job_devices_sent ON job_devices(job_id, sent_at) WHERE state = 'sent'""",
    """CREATE UNIQUE INDEX IF NOT EXISTS job_devices_command ON job_devices(command_id)
        WHERE command_id IS NOT NULL""",
)


#: columns added after the first version of `jobs` (a jobs table made before gets them here)
ADDED_COLUMNS = {"ramp_start": "REAL", "ramp_factor": "REAL", "ramp_every": "INTEGER", "max_in_flight": "INTEGER",
                 "retries": "INTEGER NOT NULL DEFAULT 0"}


def apply_schema(registry: Registry) -> None:
    """Create the jobs tables and indexes if they are missing, add missing columns (idempotent)."""
    with registry.write() as db:
        for statement in JOBS_SCHEMA:
            db.execute(statement)
        have = {row["name"] for row in db.query("PRAGMA table_info(jobs)")}
        for name, ddl in ADDED_COLUMNS.items():
            if name not in have:
                db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {ddl}")
