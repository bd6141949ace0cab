"""The delivery ledger: what was sent for a partition, and with which outcome.

One row per batch, keyed by ``(partition, batch_id)``. Batch ids are deterministic, so a
re-run (after a crash, a retry, a manual clear) finds what an earlier run already delivered
and sends only the rest. A row is ``in_flight`` from just before its request until its outcome
is recorded: a row left ``in_flight`` by a dead run means "outcome unknown".

An ``acknowledged`` row is never downgraded: two runs racing on one partition (an overlapping
retry, a zombie worker) may both send a batch, but once either saw it accepted it stays so.

Plain SQLAlchemy Core on SQLite or PostgreSQL; upserts are ``INSERT ... ON CONFLICT DO UPDATE``
sent executemany-style, one transaction per call.
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
from liveramp_capi.state.database import execute_write, upsert_insert
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


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


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
        self._insert = upsert_insert(engine)

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

    def _row(
        self, partition: str, batch: Batch, state: str, now: dt.datetime, **values: Any
    ) -> dict[str, Any]:
        row = {
            "partition": partition,
            "batch_id": batch.batch_id,
            "session_key_hash": batch.session_key_hash,
            "event_count": batch.event_count,
            "event_ids": orjson.dumps(batch.event_ids).decode(),
            "state": state,
            "attempts": 0,
            "http_status": None,
            "error": None,
            "first_sent_at": now,
            "updated_at": now,
            "acknowledged_at": None,
        }
        row.update(values)
        return row

    def _upsert(self, rows: list[dict[str, Any]], set_: Callable[[Any], dict[str, Any]], guard: bool) -> None:
        if not rows:
            return
        table = ledger_table
        statement = self._insert(table)
        statement = statement.on_conflict_do_update(
            index_elements=[table.c.partition, table.c.batch_id],
            set_=set_(statement.excluded),
            where=(table.c.state != ACKNOWLEDGED) if guard else None,
        )
        # Rows go in batch_id order, so two writers lock them alike; a rare abort is retried.
        execute_write(self.engine, statement, rows)

    def mark_in_flight(self, partition: str, batches: Sequence[Batch], run_id: str | None) -> None:
        """Record that these batches are about to be sent (never downgrades ``acknowledged``).

        :param partition: partition name.
        :param batches: the batches about to be sent.
        :param run_id: the Airflow run / try doing it, for the audit trail.
        """
        now = _now()
        rows = [
            self._row(partition, batch, IN_FLIGHT, now, run_id=run_id)
            for batch in _unique_sorted(batches, lambda b: b)
        ]
        table = ledger_table
        self._upsert(
            rows,
            lambda excluded: {
                "state": excluded.state,
                "run_id": excluded.run_id,
                "updated_at": excluded.updated_at,
                "first_sent_at": sa.func.coalesce(table.c.first_sent_at, excluded.first_sent_at),
            },
            guard=True,
        )

    def record_acknowledged(
        self, partition: str, batches_with_attempts: Sequence[tuple[Batch, int]], run_id: str | None
    ) -> None:
        """Record batches the adapter accepted; ``attempts`` adds to the row's total.

        :param partition: partition name.
        :param batches_with_attempts: ``(batch, requests made for it in this run)`` pairs.
        :param run_id: the Airflow run / try that got the acknowledgement.
        """
        now = _now()
        rows = [
            self._row(
                partition, batch, ACKNOWLEDGED, now, attempts=attempts, run_id=run_id, acknowledged_at=now
            )
            for batch, attempts in _unique_sorted(batches_with_attempts, lambda item: item[0])
        ]
        table = ledger_table
        self._upsert(
            rows,
            lambda excluded: {
                "state": excluded.state,
                "attempts": table.c.attempts + excluded.attempts,
                "http_status": None,
                "error": None,
                "run_id": excluded.run_id,
                "updated_at": excluded.updated_at,
                "acknowledged_at": sa.func.coalesce(table.c.acknowledged_at, excluded.acknowledged_at),
            },
            guard=False,
        )

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
        now = _now()
        rows = [
            self._row(
                partition,
                batch,
                FAILED,
                now,
                attempts=attempts,
                http_status=http_status,
                error=sanitize_error(error),
                run_id=run_id,
            )
            for batch, attempts, http_status, error in _unique_sorted(failures, lambda item: item[0])
        ]
        table = ledger_table
        acknowledged = table.c.state == ACKNOWLEDGED

        def keep_if_acknowledged(column: sa.Column[Any], new: Any) -> sa.ColumnElement[Any]:
            return sa.case((acknowledged, column), else_=new)

        # Not a WHERE guard: the requests a late failure made still count in ``attempts``.
        self._upsert(
            rows,
            lambda excluded: {
                "state": keep_if_acknowledged(table.c.state, excluded.state),
                "attempts": table.c.attempts + excluded.attempts,
                "http_status": keep_if_acknowledged(table.c.http_status, excluded.http_status),
                "error": keep_if_acknowledged(table.c.error, excluded.error),
                "run_id": keep_if_acknowledged(table.c.run_id, excluded.run_id),
                "updated_at": excluded.updated_at,
            },
            guard=False,
        )
