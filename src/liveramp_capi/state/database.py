"""The pipeline's state database (SQLite file or PostgreSQL): URLs, engines, reachability, writes.

SQLite is the embedded default; several shard tasks may write to one file at once, so it runs
in WAL mode with a generous busy timeout instead of failing fast with "database is locked".
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

#: How long an SQLite writer waits for another writer's lock before giving up.
SQLITE_BUSY_TIMEOUT_MS = 30_000

#: Execution option that makes an SQLite transaction take the write lock at BEGIN. Needed by
#: transactions that read before they write: two deferred ones would deadlock on the upgrade
#: and SQLite fails one at once, without waiting for the busy timeout.
SQLITE_BEGIN_IMMEDIATE = "capi_sqlite_begin_immediate"


_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")

_T = TypeVar("_T")


class StateDatabaseUnavailable(RuntimeError):
    """The state database cannot be reached (message names host and database, never secrets)."""


def connection_url(
    conn_id: str,
    conn_type: str | None,
    host: str | None,
    *,
    port: int | None = None,
    login: str | None = None,
    password: str | None = None,
    database: str | None = None,
) -> str:
    """The SQLAlchemy URL an Airflow connection's fields describe.

    Type ``sqlite`` maps to ``sqlite:///<host>``; types ``postgres``/``postgresql`` map to
    ``postgresql+psycopg://...``; type ``capi_state`` (or none) is SQLite when the host looks like
    a file (absolute path or ``.db`` suffix, no port) and PostgreSQL otherwise.

    :param conn_id: the connection's id, for messages.
    :param conn_type: its type.
    :param host: an SQLite file path or a PostgreSQL host.
    :param port: the PostgreSQL port.
    :param login: the PostgreSQL user.
    :param password: its password (URL-quoted, never in a message).
    :param database: the PostgreSQL database (the connection's ``schema`` field).
    :raises ValueError: for a connection that names no file or host, or has another type.
    """
    conn_type = (conn_type or "").lower()
    host = host or ""
    if conn_type == "sqlite" or (
        conn_type in ("capi_state", "") and not port and (host.startswith("/") or host.endswith(_SQLITE_SUFFIXES))
    ):
        if not host:
            raise ValueError(f"connection {conn_id!r} names no SQLite file path (host)")
        return f"sqlite:///{host}"
    if conn_type in ("postgres", "postgresql", "capi_state", ""):
        if not host:
            raise ValueError(f"connection {conn_id!r} names no database host")
        credentials = ""
        if login:
            credentials = quote(login, safe="")
            if password:
                credentials += ":" + quote(password, safe="")
            credentials += "@"
        return f"postgresql+psycopg://{credentials}{host}{f':{port}' if port else ''}/{quote(database or '', safe='')}"
    raise ValueError(f"connection {conn_id!r} has type {conn_type!r}; expected capi_state, sqlite or postgres")


def normalise_url(url: str | URL) -> URL:
    """Return ``url`` as a SQLAlchemy URL, with PostgreSQL routed to the psycopg 3 driver.

    :param url: a SQLAlchemy URL; ``postgres://`` and ``postgresql://`` are accepted.
    """
    parsed = make_url(url)
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _switch_to_wal(cursor: sqlite3.Cursor) -> None:
    # WAL is persistent in the file: usually there is nothing to do. When several processes
    # open a new file at once the switch can fail with "database is locked" without the
    # busy handler ever running, so it is retried here for up to the busy timeout.
    if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
        return
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01 + random.random() * 0.04)


def _on_sqlite_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
    # Hand transaction control to SQLAlchemy's "begin" event (pysqlite's own implicit BEGIN
    # is emitted late and not at all before DDL).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        # Busy timeout first: switching to WAL itself needs a lock another process may hold.
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        _switch_to_wal(cursor)
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _on_sqlite_begin(connection: sa.Connection) -> None:
    immediate = connection.get_execution_options().get(SQLITE_BEGIN_IMMEDIATE, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
    """Create an engine tuned for the state database.

    :param url: SQLAlchemy URL: ``sqlite:///path/state.db`` or ``postgresql://...``.
    :param kwargs: passed on to :func:`sqlalchemy.create_engine`.
    """
    parsed = normalise_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        kwargs.setdefault("connect_args", {}).setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
        engine = sa.create_engine(parsed, **kwargs)
        event.listen(engine, "connect", _on_sqlite_connect)
        event.listen(engine, "begin", _on_sqlite_begin)
        return engine
    if backend == "postgresql":
        kwargs.setdefault("pool_pre_ping", True)
    return sa.create_engine(parsed, **kwargs)


def describe(engine: Engine) -> str:
    """Name the database of ``engine`` for messages: backend, host and database, no secrets.

    :param engine: an engine from :func:`make_engine`.
    """
    url = engine.url
    backend = url.get_backend_name()
    if backend == "sqlite":
        return f"sqlite database {url.database or ':memory:'}"
    host = url.host or "localhost"
    if url.port:
        host = f"{host}:{url.port}"
    return f"{backend} database {url.database or '?'} on {host}"


def _scrub(message: str, url: URL) -> str:
    if url.password:
        message = message.replace(str(url.password), "***")
    return message.strip().splitlines()[0][:300] if message.strip() else ""


def _unavailable(engine: Engine, exc: Exception, what: str) -> StateDatabaseUnavailable:
    detail = _scrub(str(getattr(exc, "orig", None) or exc), engine.url)
    return StateDatabaseUnavailable(f"{what}: {type(exc).__name__}" + (f" ({detail})" if detail else ""))


def check_reachable(engine: Engine) -> None:
    """Run ``SELECT 1`` or raise :class:`StateDatabaseUnavailable`.

    :param engine: the state database engine.
    """
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except Exception as exc:
        # "from None": the chained driver error may repeat connection parameters.
        raise _unavailable(engine, exc, f"cannot reach the state {describe(engine)}") from None


@contextmanager
def opened(engine: Engine) -> Iterator[None]:
    """Check that the state database answers, then report a database error of the block alike.

    The block typically creates or checks the components' tables. Either failure becomes a
    :class:`StateDatabaseUnavailable` naming the database, never its password: unreachable, or
    reachable but unusable (e.g. SQLite locked by another process past the busy timeout).

    :param engine: the state database engine.
    """
    check_reachable(engine)
    try:
        yield
    except SQLAlchemyError as exc:
        raise _unavailable(engine, exc, describe(engine)) from None


def driver_placeholder(engine: Engine) -> str:
    """The driver's positional parameter mark for plain SQL (``exec_driver_sql``): ``?`` or ``%s``.

    :param engine: a SQLite (qmark) or PostgreSQL (format) engine.
    """
    return "?" if engine.dialect.paramstyle == "qmark" else "%s"


def upsert_insert(engine: Engine) -> Any:
    """The dialect's ``insert`` construct, which offers ``on_conflict_do_update`` (upserts).

    :param engine: a SQLite or PostgreSQL engine; any other dialect is refused.
    """
    dialect = engine.dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert
    if dialect == "sqlite":
        from sqlalchemy.dialects import sqlite

        return sqlite.insert
    raise ValueError(f"unsupported state database dialect: {dialect}")


# PostgreSQL: deadlock / serialization failure. Writers lock rows in key order, but a retry keeps
# the rare abort left from failing a task.
RETRYABLE_PGCODES = frozenset({"40P01", "40001"})


def _write_conflict(exc: DBAPIError) -> bool:
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    return code in RETRYABLE_PGCODES


def retrying(work: Callable[[], _T], retryable: Callable[[DBAPIError], bool] = _write_conflict) -> _T:
    """Run ``work`` (one transaction), again up to twice when it fails with a ``retryable`` error.

    :param work: the transaction; it must be safe to run again after a rollback.
    :param retryable: which driver errors are worth another try (default: a PostgreSQL deadlock
        or serialization failure).
    """
    for attempt in range(2):
        try:
            return work()
        except DBAPIError as exc:
            if not retryable(exc):
                raise
            time.sleep(0.05 * (attempt + 1))
    return work()


def execute_write(engine: Engine, statement: Any, rows: list[dict[str, Any]] | None = None) -> int:
    """Run one write in its own transaction (executemany with ``rows``); return the rows affected.

    Retried up to twice on a PostgreSQL deadlock or serialization failure.

    :param engine: the state database engine.
    :param statement: an insert, update or delete.
    :param rows: parameter sets for executemany, or None.
    """

    def write() -> int:
        with engine.begin() as connection:
            result = connection.execute(statement, rows) if rows is not None else connection.execute(statement)
            return int(result.rowcount or 0)

    return retrying(write)


def chunked(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of at most ``size`` items (bounded statements on both backends)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def write_in_chunks(engine: Engine, statement: Any, rows: Sequence[dict[str, Any]], size: int = 500) -> int:
    """Run ``statement`` executemany over ``rows``, ``size`` rows per transaction; return rows affected.

    :param engine: the state database engine.
    :param statement: an insert, update or delete with bound parameters.
    :param rows: parameter sets, in the order writers should lock them.
    :param size: rows per statement.
    """
    return sum(execute_write(engine, statement, list(chunk)) for chunk in chunked(rows, size))



def delete_where_in(engine: Engine, column: sa.Column[Any], values: Iterable[Any], size: int = 500) -> int:
    """Delete the rows whose ``column`` holds one of ``values``, ``size`` values per statement.

    :param engine: the state database engine.
    :param column: the key column (of the table to delete from).
    :param values: the keys; duplicates are fine.
    :param size: values per statement.
    :return: rows deleted.
    """
    keys = sorted(set(values))
    return sum(
        execute_write(engine, sa.delete(column.table).where(column.in_(list(chunk)))) for chunk in chunked(keys, size)
    )
