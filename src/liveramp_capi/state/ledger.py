"""The delivery ledger: what was sent for a partition, and with which outcome.

One row per batch, keyed by ``(partition, batch_id)``. Batch ids are deterministic, so a
re-run (after a crash, a retry, a manual clear) finds what an earlier run already delivered
and sends only the rest. A row is ``in_flight`` from just before its request until its outcome
is recorded: a row left ``in_flight`` by a dead run means "outcome unknown".

An ``acknowledged`` row is never downgraded: two runs racing on one partition (an overlapping
retry, a zombie worker) may both send a batch, but once either saw it accepted it stays so.

SQLAlchemy Core on SQLite or PostgreSQL for reads and the schema; the writes are one
``INSERT ... ON CONFLICT DO UPDATE`` in SQL both databases read, sent as one executemany of
plain tuples through the driver, one transaction per call.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from liveramp_capi.domain.batches import Batch
from liveramp_capi.domain.redaction import MAX_ERROR_CHARS, sanitize_error
from liveramp_capi.state.database import retrying, upsert_insert
from liveramp_capi.state.migrations import ensure_component_schema, metadata

IN_FLIGHT = "in_flight"
ACKNOWLEDGED = "acknowledged"
FAILED = "failed"
STATES: tuple[str, ...] = (IN_FLIGHT, ACKNOWLEDGED, FAILED)

ledger_table = sa.Table(
    "capi_delivery_ledger", metadata,
    # A day (YYYY-MM-DD) or an hour (YYYY-MM-DDTHH), with room to spare.
    sa.Column("partition", sa.String(32), primary_key=True),
    sa.Column("batch_id", sa.String(32), primary_key=True),
    sa.Column("session_key_hash", sa.BigInteger, nullable=False),
    sa.Column("event_count", sa.Integer, nullable=False),
    sa.Column("event_ids", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("http_status", sa.Integer, nullable=True),
    sa.Column("error", sa.String(MAX_ERROR_CHARS), nullable=True),
    sa.Column("run_id", sa.String(250), nullable=True),
    sa.Column("first_sent_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint(
        f"state IN ('{IN_FLIGHT}', '{ACKNOWLEDGED}', '{FAILED}')", name="ck_capi_ledger_state"
    ),
    sa.Index("ix_capi_delivery_ledger_partition_state", "partition", "state"),
)

#: Name and version of this component's tables in ``capi_schema_version``.
SCHEMA_COMPONENT = "delivery_ledger"
SCHEMA_VERSION = 1

_T = TypeVar("_T")


_TABLE = ledger_table.name
_COLUMNS: tuple[str, ...] = (
    "partition",
    "batch_id",
    "session_key_hash",
    "event_count",
    "event_ids",
    "state",
    "attempts",
    "http_status",
    "error",
    "run_id",
    "first_sent_at",
    "updated_at",
    "acknowledged_at",
)
assert set(_COLUMNS) == set(ledger_table.c.keys())


def _quoted(column: str) -> str:
    return f'"{column}"'


def _keep_if_acknowledged(column: str) -> str:
    return f"CASE WHEN {_TABLE}.state = '{ACKNOWLEDGED}' THEN {_TABLE}.{_quoted(column)} ELSE excluded.{_quoted(column)} END"


# The ON CONFLICT updates of the three writes. In flight never downgrades ``acknowledged``;
# acknowledged adds this run's attempts; failed keeps an acknowledged row's verdict, but the
# requests a late failure made still count in ``attempts`` (so not a WHERE guard).
_SET_IN_FLIGHT = (
    "state = excluded.state, run_id = excluded.run_id, updated_at = excluded.updated_at, "
    f"first_sent_at = COALESCE({_TABLE}.first_sent_at, excluded.first_sent_at) "
    f"WHERE {_TABLE}.state <> '{ACKNOWLEDGED}'"
)
_SET_ACKNOWLEDGED = (
    f"state = excluded.state, attempts = {_TABLE}.attempts + excluded.attempts, http_status = NULL, "
    "error = NULL, run_id = excluded.run_id, updated_at = excluded.updated_at, "
    f"acknowledged_at = COALESCE({_TABLE}.acknowledged_at, excluded.acknowledged_at)"
)
_SET_FAILED = (
    f"state = {_keep_if_acknowledged('state')}, attempts = {_TABLE}.attempts + excluded.attempts, "
    f"http_status = {_keep_if_acknowledged('http_status')}, error = {_keep_if_acknowledged('error')}, "
    f"run_id = {_keep_if_acknowledged('run_id')}, updated_at = excluded.updated_at"
)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _driver_adapted(engine: Engine, now: dt.datetime) -> Any:
    """``now`` as the driver would store it, adapted once for the whole executemany.

    SQLAlchemy has no bind processor for SQLite's DateTime here, so ``sqlite3`` would call its
    registered datetime adapter for every timestamp of every row (three a row); calling that
    same adapter once gives the same text. Other drivers get the datetime itself.
    """
    dbapi = engine.dialect.dbapi
    if engine.dialect.name != "sqlite" or dbapi is None:
        return now
    adapters = getattr(dbapi, "adapters", None)
    adapt = adapters.get((type(now), dbapi.PrepareProtocol)) if isinstance(adapters, dict) else None
    return adapt(now) if adapt is not None else now


def _unique_sorted(items: Iterable[_T], batch_of: Callable[[_T], Batch]) -> list[_T]:
    # One row per batch id (PostgreSQL refuses to upsert a row twice in one statement), in
    # batch_id order so concurrent writers take row locks in the same order.
    by_id: dict[str, _T] = {}
    for item in items:
        by_id[batch_of(item).batch_id] = item
    return [by_id[batch_id] for batch_id in sorted(by_id)]


class DeliveryLedger:
    """Read and record batch outcomes in the state database.

    :param engine: a SQLite or PostgreSQL engine (see :func:`~liveramp_capi.state.database.make_engine`).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        upsert_insert(engine)  # refuses any dialect but SQLite and PostgreSQL

    # -- schema ---------------------------------------------------------------------------

    def ensure_schema(self) -> None:
        """Create the ledger tables if missing and check the schema version (idempotent).

        Safe when several processes call it at once: see :func:`ensure_component_schema`.
        """
        ensure_component_schema(self.engine, [ledger_table], SCHEMA_COMPONENT, SCHEMA_VERSION)

    # -- reads ----------------------------------------------------------------------------

    def _shard_filter(
        self, partition: str, shard: int, shard_count: int, state: str
    ) -> sa.ColumnElement[bool]:
        if shard_count < 1 or not 0 <= shard < shard_count:
            raise ValueError("shard must be in 0..shard_count-1")
        table = ledger_table
        return sa.and_(
            table.c.partition == partition,
            table.c.state == state,
            (table.c.session_key_hash % shard_count) == shard,
        )

    def acknowledged_batch_runs(self, partition: str, shard: int, shard_count: int) -> dict[str, str | None]:
        """Return ``{batch_id: run_id}`` for the shard's acknowledged batches (who got the acknowledgement).

        The run id is the one recorded with the acknowledgement (``<run>#<try>``), so a caller can
        tell its own run's earlier tries from earlier runs.

        :param partition: partition name.
        :param shard: shard index, ``0..shard_count-1``.
        :param shard_count: the partition's shard count.
        """
        where = self._shard_filter(partition, shard, shard_count, ACKNOWLEDGED)
        query = sa.select(ledger_table.c.batch_id, ledger_table.c.run_id).where(where)
        with self.engine.connect() as connection:
            return {batch_id: run_id for batch_id, run_id in connection.execute(query)}

    def acknowledged_among(self, partition: str, batch_ids: Iterable[str]) -> set[str]:
        """Return which of these batch ids the partition's ledger holds as acknowledged.

        :param partition: partition name.
        :param batch_ids: the ids to look up (looked up 500 at a time).
        """
        table = ledger_table
        ids = sorted(set(batch_ids))
        found: set[str] = set()
        with self.engine.connect() as connection:
            for start in range(0, len(ids), 500):
                query = sa.select(table.c.batch_id).where(
                    table.c.partition == partition,
                    table.c.state == ACKNOWLEDGED,
                    table.c.batch_id.in_(ids[start : start + 500]),
                )
                found.update(connection.execute(query).scalars())
        return found

    def unresolved_batches(self, partition: str, shard: int, shard_count: int) -> list[str]:
        """Return ids of the shard's batches left ``in_flight`` (their outcome is unknown).

        :param partition: partition name.
        :param shard: shard index, ``0..shard_count-1``.
        :param shard_count: the partition's shard count.
        """
        return self._batch_ids(partition, shard, shard_count, IN_FLIGHT)

    def _batch_ids(self, partition: str, shard: int, shard_count: int, state: str) -> list[str]:
        where = self._shard_filter(partition, shard, shard_count, state)
        query = sa.select(ledger_table.c.batch_id).where(where).order_by(ledger_table.c.batch_id)
        with self.engine.connect() as connection:
            return list(connection.execute(query).scalars())

    def partition_counts(self, partition: str) -> dict[str, dict[str, int]]:
        """Return ``{state: {"batches": n, "events": m}}`` for every state of a partition.

        :param partition: partition name.
        """
        table = ledger_table
        query = (
            sa.select(table.c.state, sa.func.count(), sa.func.coalesce(sa.func.sum(table.c.event_count), 0))
            .where(table.c.partition == partition)
            .group_by(table.c.state)
        )
        counts = {state: {"batches": 0, "events": 0} for state in STATES}
        with self.engine.connect() as connection:
            for state, batches, events in connection.execute(query):
                counts[state] = {"batches": int(batches), "events": int(events)}
        return counts

    # -- writes ---------------------------------------------------------------------------

    def _rows(
        self,
        partition: str,
        state: str,
        now: dt.datetime,
        run_id: str | None,
        items: Iterable[tuple[Batch, int, int | None, str | None]],
        acknowledged: bool = False,
    ) -> list[tuple[Any, ...]]:
        # Plain tuples in _COLUMNS order; the timestamp goes through the column type once per
        # call (SQLite keeps it as text), not once per row as SQLAlchemy's executemany does.
        process = ledger_table.c.updated_at.type.bind_processor(self.engine.dialect)
        stamp = process(now) if process is not None else _driver_adapted(self.engine, now)
        acknowledged_at = stamp if acknowledged else None
        dumps = orjson.dumps
        return [
            (
                partition,
                batch.batch_id,
                batch.session_key_hash,
                batch.event_count,
                dumps(batch.event_ids).decode(),
                state,
                attempts,
                http_status,
                error,
                run_id,
                stamp,
                stamp,
                acknowledged_at,
            )
            for batch, attempts, http_status, error in items
        ]

    def _upsert(self, rows: list[tuple[Any, ...]], on_conflict: str) -> None:
        """Send ``rows`` as one executemany through the driver, in one transaction.

        The ledger's hot path (a send task marks and acknowledges every batch): SQLAlchemy's
        per-row parameter handling cost more than the database's work, so the statement is
        plain SQL that SQLite and PostgreSQL both read, and each row a tuple.
        """
        if not rows:
            return
        mark = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
        statement = (
            f"INSERT INTO {_TABLE} ({', '.join(_quoted(c) for c in _COLUMNS)}) "
            f"VALUES ({', '.join([mark] * len(_COLUMNS))}) "
            f"ON CONFLICT ({_quoted('partition')}, {_quoted('batch_id')}) DO UPDATE SET {on_conflict}"
        )
        # Rows go in batch_id order, so two writers lock them alike; a rare abort is retried.
        def write() -> None:
            with self.engine.begin() as connection:
                connection.exec_driver_sql(statement, rows)

        retrying(write)

    def mark_in_flight(self, partition: str, batches: Sequence[Batch], run_id: str | None) -> None:
        """Record that these batches are about to be sent (never downgrades ``acknowledged``).

        :param partition: partition name.
        :param batches: the batches about to be sent.
        :param run_id: the Airflow run / try doing it, for the audit trail.
        """
        items = ((batch, 0, None, None) for batch in _unique_sorted(batches, lambda b: b))
        self._upsert(self._rows(partition, IN_FLIGHT, _now(), run_id, items), _SET_IN_FLIGHT)

    def record_acknowledged(
        self, partition: str, batches_with_attempts: Sequence[tuple[Batch, int]], run_id: str | None
    ) -> None:
        """Record batches the adapter accepted; ``attempts`` adds to the row's total.

        :param partition: partition name.
        :param batches_with_attempts: ``(batch, requests made for it in this run)`` pairs.
        :param run_id: the Airflow run / try that got the acknowledgement.
        """
        items = (
            (batch, attempts, None, None)
            for batch, attempts in _unique_sorted(batches_with_attempts, lambda item: item[0])
        )
        rows = self._rows(partition, ACKNOWLEDGED, _now(), run_id, items, acknowledged=True)
        self._upsert(rows, _SET_ACKNOWLEDGED)

    def record_failed(
        self,
        partition: str,
        failures: Sequence[tuple[Batch, int, int | None, str]],
        run_id: str | None,
    ) -> None:
        """Record batches that failed for good in this run (never downgrades ``acknowledged``).

        :param partition: partition name.
        :param failures: ``(batch, attempts, http_status or None, error text)``; the error is
            passed through :func:`sanitize_error`.
        :param run_id: the Airflow run / try that gave up on them.
        """
        items = (
            (batch, attempts, http_status, sanitize_error(error))
            for batch, attempts, http_status, error in _unique_sorted(failures, lambda item: item[0])
        )
        self._upsert(self._rows(partition, FAILED, _now(), run_id, items), _SET_FAILED)
