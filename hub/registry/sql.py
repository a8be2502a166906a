"""The registry's SQL layer: one statement text for SQLite and PostgreSQL, and the PostgreSQL connection.

The registry's SQL is written once, with `?` placeholders, in the subset both dialects run the same
(`INSERT ... ON CONFLICT DO NOTHING`, `UPDATE ... RETURNING`, partial indexes, correlated subqueries). On SQLite the
connection stays a sqlite-utils `Database` over the stdlib sqlite3 (WAL, busy_timeout, the flock that queues
writers: hub/registry/store.py), so the embedded default keeps its speed and the Mosquitto plugin keeps reading the
file. On PostgreSQL (`postgresql+psycopg://...`) it is a `PgDb`: an SQLAlchemy 2 Core connection (engine, pool and
URL from SQLAlchemy, the driver psycopg 3) in autocommit mode, with explicit BEGIN/COMMIT like the SQLite side, and
the same three calls the registry uses: `execute`, `query`, `executemany` (plus `insert`, here for both).
`?` becomes psycopg's `%s` (and a literal `%` `%%`) outside string literals, once per statement text.

Why not SQLAlchemy for SQLite too: its pysqlite layer adds per-call overhead to the 0.2 ms lookups, and the rest
of the hub (hub/authz, hub/api, hub/jobs) still speaks sqlite-utils; ported parts move to these helpers.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

SQLITE = "sqlite"
POSTGRESQL = "postgresql"
#: The advisory lock every PostgreSQL write transaction takes (see Registry._write): exclusively, so writers of all
#: hubs queue on it like SQLite's writers on BEGIN IMMEDIATE; enrollments shared, and then CHAIN_LOCK_KEY for their
#: audit rows, so the audit chain has one order. ("Tessera" in ASCII, and + 1.)
WRITE_LOCK_KEY = 0x54657373657261
CHAIN_LOCK_KEY = WRITE_LOCK_KEY + 1


def is_postgresql(url: str | object) -> bool:
    return isinstance(url, str) and url.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres")


@functools.lru_cache(maxsize=1024)
def pg_sql(sql: str) -> str:
    """`sql` with `?` placeholders as psycopg's `%s` and `%` as `%%`, string literals and quoted names untouched
    except for `%` (psycopg reads every `%` of a statement that has parameters)."""
    out, quote = [], ""
    for ch in sql:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "?":
            out.append("%s")
            continue
        out.append("%%" if ch == "%" else ch)
    return "".join(out)


class PgDb:
    """One PostgreSQL connection (this thread's), with the calls the registry makes on a sqlite-utils Database."""

    dialect = POSTGRESQL

    def __init__(self, conn: Any) -> None:
        self._conn = conn  # sqlalchemy.engine.Connection, isolation_level AUTOCOMMIT
        self.chain_locked = False  # this transaction may append to the audit chain (Registry._write)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement; the result has `rowcount` (rows RETURNING: use `query`)."""
        return self._conn.exec_driver_sql(pg_sql(sql), tuple(params))

    def query(self, sql: str, params: Sequence[Any] = ()) -> Iterator[dict[str, Any]]:
        result = self._conn.exec_driver_sql(pg_sql(sql), tuple(params))
        return (dict(row) for row in result.mappings().all())

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = [tuple(r) for r in rows]
        if rows:
            self._conn.exec_driver_sql(pg_sql(sql), rows)

    def close(self) -> None:
        self._conn.close()


def dialect(db: Any) -> str:
    return POSTGRESQL if isinstance(db, PgDb) else SQLITE


def json_values(dialect_name: str, expr: str, alias: str = "j") -> str:
    """A FROM item of the elements of the JSON array text `expr`, as column `<alias>.value` (SQLite's json_each)."""
    if dialect_name == POSTGRESQL:
        return f"jsonb_array_elements_text(({expr})::jsonb) AS {alias}(value)"
    return f"json_each({expr}) AS {alias}"


def json_items(dialect_name: str, expr: str, alias: str = "j") -> str:
    """A FROM item of the members of the JSON object text `expr`, as `<alias>.key` and `<alias>.value`."""
    if dialect_name == POSTGRESQL:
        return f"jsonb_each_text(({expr})::jsonb) AS {alias}(key, value)"
    return f"json_each({expr}) AS {alias}"


def julianday(dialect_name: str, expr: str) -> str:
    """The Julian day number (a float, days) of the stored timestamp text `expr`, as SQLite's julianday()."""
    if dialect_name == POSTGRESQL:
        return f"(EXTRACT(EPOCH FROM ({expr})::timestamptz)::float8 / 86400.0 + 2440587.5)"
    return f"julianday({expr})"


def columns(db: Any, table: str) -> set[str]:
    """The column names of `table` (empty if there is no such table), on either dialect."""
    if isinstance(db, PgDb):
        return {r["column_name"] for r in db.query(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = ?", [table])}
    return {r["name"] for r in db.query(f"PRAGMA table_info({table})")}


def has_table(db: Any, table: str) -> bool:
    return bool(columns(db, table))


def executemany(db: Any, sql: str, rows: Iterable[Sequence[Any]]) -> None:
    """`sql` once per row, in the caller's transaction, on either dialect."""
    if isinstance(db, PgDb):
        db.executemany(sql, rows)
    else:
        db.conn.executemany(sql, rows)


def insert(db: Any, table: str, row: Mapping[str, Any]) -> None:
    """INSERT one row (a plain statement: no introspection of the table, unlike sqlite-utils' `insert`)."""
    cols = list(row)
    db.execute(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
               [row[c] for c in cols])


def pg_engine(url: str, pool_size: int = 5) -> Any:
    """An SQLAlchemy engine for a PostgreSQL registry: psycopg 3, autocommit (transactions are explicit),
    parameters kept out of error messages and logs."""
    import sqlalchemy

    parsed = sqlalchemy.make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername != "postgresql+psycopg":
        raise ValueError(f"registry url: driver {parsed.drivername!r} is not supported (postgresql+psycopg)")
    return sqlalchemy.create_engine(parsed, isolation_level="AUTOCOMMIT", hide_parameters=True,
                                    pool_size=pool_size, max_overflow=pool_size * 4, pool_pre_ping=True)


def pg_connect(engine: Any, url: str) -> Any:
    """A connection from `engine`; a server that cannot be reached or refuses us is one RegistryError line
    (SQLAlchemy's own message spans lines and a URL; this one names the server without the password)."""
    import sqlalchemy

    from .errors import RegistryError

    try:
        return engine.connect()
    except sqlalchemy.exc.OperationalError as exc:
        why = " ".join(str(exc.orig or exc).split())[:300]
        raise RegistryError(f"registry {safe_url(url)}: cannot connect: {why}", code="unavailable") from None


def driver_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a registry statement can raise on either dialect (for `except`): sqlite3's, and SQLAlchemy's
    once it is loaded (only a PostgreSQL registry loads it, so the SQLite path never pays its import)."""
    import sqlite3
    import sys

    sa_exc = sys.modules.get("sqlalchemy.exc")
    return (sqlite3.Error, sa_exc.SQLAlchemyError) if sa_exc is not None else (sqlite3.Error,)


def safe_url(url: str) -> str:
    """`url` for messages: the password masked."""
    try:
        import sqlalchemy

        return sqlalchemy.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL at all: say so without echoing it
        return "<not a URL>"


#: Why a PostgreSQL registry cannot pair with the Mosquitto broker driver (config load says it in one line).
PG_NEEDS_RABBITMQ = ("the Mosquitto broker plugin reads the SQLite file itself; a PostgreSQL registry (several hubs "
                     "on one fleet) pairs with [broker] kind = \"rabbitmq\"")


def check_url(url: str) -> str:
    """fleet.toml's `[registry] url`: '' (the SQLite file in the hub directory) or a PostgreSQL URL
    (postgresql+psycopg://...). ValueError with one line saying why; the password is never repeated."""
    if not isinstance(url, str):
        raise ValueError("[registry] url must be a string")
    if url == "" or is_postgresql(url):
        if url:
            import sqlalchemy  # the URL must parse (a driver other than psycopg is refused when the engine is made)

            try:
                sqlalchemy.make_url(url)
            except Exception:  # noqa: BLE001 - its message may echo the URL, password included
                raise ValueError("[registry] url is not a valid PostgreSQL URL "
                                 "(postgresql+psycopg://user@host:port/database)") from None
        return url
    raise ValueError("[registry] url must be empty (the SQLite file registry.sqlite3 in the hub directory) or "
                     "postgresql+psycopg://user@host:port/database")
