"""Schema creation and versions of the state database's components (``capi_schema_version``).

Every component keeping tables in the state database (the delivery ledger, the envelope store,
the held conversions, the partition lease) creates them on first use through
:func:`ensure_component_schema`, which records its schema version and refuses a database written
by a newer version of this package.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from liveramp_capi.state.database import SQLITE_BEGIN_IMMEDIATE, retrying

metadata = sa.MetaData()

schema_version_table = sa.Table(
    "capi_schema_version",
    metadata,
    sa.Column("component", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

# Serialises schema creation between processes on PostgreSQL (any stable 63-bit constant).
_SCHEMA_LOCK_KEY = (
    int.from_bytes(hashlib.blake2b(b"liveramp_capi.schema", digest_size=8).digest(), "big") >> 1
)


class SchemaVersionError(RuntimeError):
    """The database holds a component schema this code does not know (a newer version)."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _lost_creation_race(exc: DBAPIError) -> bool:
    return "already exists" in str(exc.orig).lower()


def ensure_component_schema(
    engine: Engine, tables: Sequence[sa.Table], component: str, version: int
) -> None:
    """Create a component's tables (and ``capi_schema_version``) if missing; check its version.

    Safe when several processes call it at once: PostgreSQL serialises the creation on a
    transaction-level advisory lock; SQLite takes the write lock at BEGIN (so the existence check
    and the CREATE happen under one lock) and a lost race is retried.

    :param engine: the state database engine.
    :param tables: the component's tables, in creation order.
    :param component: the component's name in ``capi_schema_version``.
    :param version: the schema version this code writes.
    :raises SchemaVersionError: when the database holds a newer version of the component.
    """
    dialect = engine.dialect.name

    def create() -> None:
        with engine.connect() as connection:
            if dialect == "sqlite":
                connection.execution_options(**{SQLITE_BEGIN_IMMEDIATE: True})
            with connection.begin():
                if dialect == "postgresql":
                    connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
                for table in (schema_version_table, *tables):
                    table.create(connection, checkfirst=True)
                if dialect == "postgresql":
                    _widen_text_columns(connection, tables)
                _check_version(connection, component, version)

    retrying(create, _lost_creation_race)


def _widen_text_columns(connection: Connection, tables: Sequence[sa.Table]) -> None:
    """Widen PostgreSQL ``varchar`` columns narrower than this code declares (e.g. ``partition``,
    10 characters before hourly keys such as ``2026-11-20T13`` needed 13). Widening keeps every
    row; SQLite does not enforce lengths, so only PostgreSQL needs it."""
    for table in tables:
        declared = {
            column.name: column.type.length
            for column in table.columns
            if isinstance(column.type, sa.String) and column.type.length
        }
        found = connection.execute(
            sa.text(
                "SELECT column_name, character_maximum_length FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = :table"
            ),
            {"table": table.name},
        ).all()
        for name, length in found:
            if name in declared and length is not None and length < declared[name]:
                connection.execute(
                    sa.text(f'ALTER TABLE {table.name} ALTER COLUMN "{name}" TYPE varchar({int(declared[name])})')
                )


def _check_version(connection: Connection, component: str, version: int) -> None:
    table = schema_version_table
    found = connection.execute(
        sa.select(table.c.version).where(table.c.component == component)
    ).scalar_one_or_none()
    if found is None:
        connection.execute(sa.insert(table).values(component=component, version=version, updated_at=_now()))
    elif found > version:
        raise SchemaVersionError(
            f"the state database holds {component.replace('_', ' ')} schema version {found}; this code "
            f"knows up to {version}: upgrade the liveramp-capi package"
        )
    elif found < version:
        # The component's own upgrade steps run after this (e.g. the envelope store re-evaluates
        # its expiries); the tables themselves only gain new tables, created above.
        connection.execute(
            sa.update(table).where(table.c.component == component).values(version=version, updated_at=_now())
        )
