"""The delivery ledger: what was sent for a partition, and with which outcome.

One row per batch, keyed by ``(partition, batch_id)``. Batch ids are deterministic, so a
re-run (after a crash, a retry, a manual clear) finds what an earlier run already delivered
and sends only the rest. A row is ``in_flight`` from just before its request until its outcome
is recorded: a row left ``in_flight`` by a dead run means "outcome unknown".

An ``acknowledged`` row is never downgraded: two runs racing on one partition (an overlapping
retry, a zombie worker) may both send a batch, but once either saw it accepted it stays so.

SQLAlchemy Core on SQLite or PostgreSQL for reads and the schema; each write is ONE
``INSERT ... SELECT ... ON CONFLICT DO UPDATE`` over a JSON array of the rows, sent through the
driver, one transaction per call (see :meth:`DeliveryLedger._upsert`).
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
from liveramp_capi.state.database import driver_placeholder, retrying, upsert_insert
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
    """``now`` as the driver would store it, adapted once per write.

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
        self._statements: dict[str, str] = {}
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
        # Sorted here, not by ORDER BY: with it SQLite walks the primary key (partition, batch_id)
        # over the whole partition instead of the (partition, state) index. A send task of a
        # 1M-event partition spent 0.23 s before its first request on 270,000 acknowledged rows
        # of other shards, none of them in flight.
        query = sa.select(ledger_table.c.batch_id).where(where)
        with self.engine.connect() as connection:
            return sorted(connection.execute(query).scalars())

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

    def _stamp(self, now: dt.datetime) -> Any:
        # The timestamp goes through the column type once per call (SQLite keeps it as text).
        process = ledger_table.c.updated_at.type.bind_processor(self.engine.dialect)
        return process(now) if process is not None else _driver_adapted(self.engine, now)

    def _upsert(
        self,
        partition: str,
        state: str,
        run_id: str | None,
        items: Iterable[tuple[Batch, int, int | None, str | None]],
        on_conflict: str,
        *,
        acknowledged: bool = False,
    ) -> None:
        """Write ``items`` (``batch, attempts, http_status, error``) as ONE statement, in one transaction.

        The ledger's hot path: a send task marks and acknowledges every batch from a writer
        thread while its event loop sends. An ``executemany`` steps the statement once per row
        and the driver gives up and takes back the GIL around every step; with the loop thread
        busy, each take-back waits for it, which cost a 1M-event send task about 5 s of 21 (the
        writes themselves about 2 s). So the rows travel as one JSON array that the database
        unpacks itself (SQLite ``json_each``, PostgreSQL ``json_array_elements``): one step, one
        hand-off per call. Rows go in batch_id order, so two writers lock them alike; a rare
        abort is retried.
        """
        dumps = orjson.dumps
        payload = dumps(
            [
                [batch.batch_id, batch.session_key_hash, batch.event_count, dumps(batch.event_ids).decode(),
                 attempts, http_status, error]
                for batch, attempts, http_status, error in items
            ]
        ).decode()
        if payload == "[]":
            return
        stamp = self._stamp(_now())
        params = (partition, state, run_id, stamp, stamp, stamp if acknowledged else None, payload)
        statement = self._statements.get(on_conflict)
        if statement is None:
            statement = self._statements[on_conflict] = self._statement(on_conflict)

        def write() -> None:
            with self.engine.begin() as connection:
                connection.exec_driver_sql(statement, params)

        retrying(write)

    def _statement(self, on_conflict: str) -> str:
        """The upsert of a JSON array of ``[batch_id, session_key_hash, event_count, event_ids,
        attempts, http_status, error]`` rows: plain SQL for the driver, in array order."""
        mark = driver_placeholder(self.engine)
        if self.dialect == "sqlite":
            fields = [f"json_extract(j.value, '$[{i}]')" for i in range(7)]
            # "WHERE true": without it SQLite reads ON CONFLICT as part of the SELECT.
            source = "json_each(?) AS j WHERE true ORDER BY j.key"
        else:
            casts = ("text", "bigint", "integer", "text", "integer", "integer", "text")
            fields = [f"(j.value->>{i})::{cast}" for i, cast in enumerate(casts)]
            source = f"json_array_elements({mark}::json) WITH ORDINALITY AS j(value, n) ORDER BY j.n"
        batch_id, key_hash, event_count, event_ids, attempts, http_status, error = fields
        values = {  # _COLUMNS order, checked below
            "partition": mark, "batch_id": batch_id, "session_key_hash": key_hash, "event_count": event_count,
            "event_ids": event_ids, "state": mark, "attempts": attempts, "http_status": http_status,
            "error": error, "run_id": mark, "first_sent_at": mark, "updated_at": mark, "acknowledged_at": mark,
        }
        assert tuple(values) == _COLUMNS
        return (
            f"INSERT INTO {_TABLE} ({', '.join(_quoted(c) for c in values)}) SELECT {', '.join(values.values())} "
            f"FROM {source} ON CONFLICT ({_quoted('partition')}, {_quoted('batch_id')}) DO UPDATE SET {on_conflict}"
        )

    def mark_in_flight(self, partition: str, batches: Sequence[Batch], run_id: str | None) -> None:
        """Record that these batches are about to be sent (never downgrades ``acknowledged``).

        :param partition: partition name.
        :param batches: the batches about to be sent.
        :param run_id: the Airflow run / try doing it, for the audit trail.
        """
        items = ((batch, 0, None, None) for batch in _unique_sorted(batches, lambda b: b))
        self._upsert(partition, IN_FLIGHT, run_id, items, _SET_IN_FLIGHT)

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
        self._upsert(partition, ACKNOWLEDGED, run_id, items, _SET_ACKNOWLEDGED, acknowledged=True)

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
        self._upsert(partition, FAILED, run_id, items, _SET_FAILED)
