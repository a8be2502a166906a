"""A throwaway PostgreSQL server for the registry tests: one per session (`pg_server`), a fresh database per test.

The server is Debian's PostgreSQL (`/usr/lib/postgresql/<version>/bin`, the newest one installed; the packaged
cluster is never touched): `initdb` into a new temporary directory, `pg_ctl start` on a free 127.0.0.1 port with
its unix socket inside that directory, stopped and removed at the end. initdb refuses to run as root, so as root
(CI) the server runs as the `postgres` system user (`runuser`), which owns the directory; otherwise as the current
user. The superuser `tessera` has a random password (scram-sha-256) that exists only in two 0600 files: initdb's
`--pwfile` (the server's copy) and a libpq passfile (the clients': `passfile=` in the URL), so it is never in argv,
a URL, a log or an exception. Tests without the binaries are skipped with the reason.

Durability is off (fsync, synchronous_commit, full_page_writes): the server is thrown away, and tests should not
wait on disk flushes. `bench/registry_pg_bench.py` starts its own with `durable=True`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import free_port

USER = "tessera"
HOST = "127.0.0.1"


def pg_bindir() -> Path | None:
    """The bin directory of the newest PostgreSQL installed from Debian's packages, or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name)
                   if p.parent.parent.name.isdigit() else 0)
    return found[-1].parent if found else None


class PgServer:
    """One PostgreSQL server in its own directory (see the module docstring). `url(db)` names a database."""

    def __init__(self, bindir: Path, durable: bool = False) -> None:
        self.bindir = bindir
        self.durable = durable
        self.dir = Path(tempfile.mkdtemp(prefix="tessera-pg-"))
        self.data = self.dir / "data"
        self.passfile = self.dir / "pgpass"  # the clients' copy (owned by the caller)
        self.log = self.dir / "server.log"
        self.port = 0
        self._owner: pwd.struct_passwd | None = None
        self._seq = itertools.count(1)
        if os.geteuid() == 0:
            try:
                self._owner = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("PostgreSQL cannot run as root and there is no 'postgres' user") from None

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / argv[0]), *argv[1:]]
        if self._owner is not None:
            cmd = ["runuser", "-u", self._owner.pw_name, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.dir)
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}\n{log}")
        return proc

    def start(self) -> PgServer:
        password = secrets.token_urlsafe(24)
        server_pw = self.dir / "initdb-pw"
        with open(os.open(server_pw, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(password + "\n")
        self.port = free_port()
        with open(os.open(self.passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(f"{HOST}:{self.port}:*:{USER}:{password}\n")
        if self._owner is not None:  # the server's files are the postgres user's; the passfile stays ours
            os.chown(self.dir, self._owner.pw_uid, self._owner.pw_gid)
            os.chown(server_pw, self._owner.pw_uid, self._owner.pw_gid)
        os.chmod(self.dir, 0o700)
        self._run("initdb", "-D", str(self.data), "-U", USER, f"--pwfile={server_pw}", "--auth=scram-sha-256",
                  "-E", "UTF8", "--locale=C", "--no-sync")
        server_pw.unlink()
        opts = [f"-c listen_addresses={HOST}", f"-p {self.port}", f"-k {self.dir}", "-c max_connections=200",
                "-c shared_buffers=64MB"]
        if not self.durable:
            opts += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", " ".join(opts),
                  "start")
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of `database` (no password: libpq reads it from the 0600 passfile)."""
        return f"postgresql+psycopg://{USER}@{HOST}:{self.port}/{database}?passfile={self.passfile}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host=HOST, port=self.port, user=USER, dbname="postgres", passfile=str(self.passfile),
                             autocommit=True) as conn:
            conn.execute(sql)

    def create_database(self, name: str | None = None) -> str:
        """A new empty database (from template0); returns its name."""
        name = name or f"t{os.getpid()}_{next(self._seq)}"
        self._admin(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return name

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def pg_running(durable: bool = False) -> Iterator[PgServer]:
    """A started PgServer, stopped and removed on exit. RuntimeError when the binaries are missing."""
    bindir = pg_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb; apt-get install "
                           "postgresql)")
    server = PgServer(bindir, durable=durable)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The session's PostgreSQL server (skipped with the reason when PostgreSQL is not installed)."""
    if pg_bindir() is None:
        pytest.skip("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb; ./dev.sh setup installs it)")
    with pg_running() as server:
        yield server


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """The URL of a fresh database on the session's server, dropped after the test."""
    name = pg_server.create_database()
    try:
        yield pg_server.url(name)
    finally:
        pg_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_target(request, tmp_path: Path) -> str:
    """What fleet.toml's [registry] would name, once per dialect: '' (the SQLite file in the hub directory
    tmp_path) or the URL of a fresh PostgreSQL database. For tests of modules that must run on both."""
    return "" if request.param == "sqlite" else request.getfixturevalue("pg_url")


@pytest.fixture
def any_registry(registry_target: str, tmp_path: Path):
    """A fresh Registry on each dialect (home: tmp_path, which holds the audit key), closed after the test."""
    from hub.registry.store import Registry

    registry = Registry(registry_target or tmp_path / "registry.sqlite3", home=tmp_path)
    yield registry
    registry.close()
