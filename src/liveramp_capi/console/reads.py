"""Aggregates of the state database for the console: per-partition ledger counts, failed
batches, envelope health. Counts only: no query here selects an event id, an envelope, a user
key, an IP or a consent string.

Every query is bounded: ledger reads name their partitions (the ``(partition, state)`` index),
failed batches are paged and read through that index, the envelope histogram is one grouped scan.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from liveramp_capi.domain.consent import DAY_SECONDS
from liveramp_capi.domain.envelopes import CONSENT_MISSING, EXPIRED
from liveramp_capi.domain.redaction import sanitize_error
from liveramp_capi.state.envelope_rows import envelope_table
from liveramp_capi.state.ledger import STATES, ledger_table

#: Width of one bar of the envelope age histogram, in days.
AGE_BUCKET_DAYS = 5


def _has_table(engine: Engine, table: sa.Table) -> bool:
    return sa.inspect(engine).has_table(table.name)


def ledger_counts(engine: Engine, partitions: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Batches, events and requests per ledger state for each of ``partitions``.

    :param engine: the state database.
    :param partitions: the partitions to count (a page of them).
    :return: ``{partition: {state: {"batches", "events", "attempts"}, "retries": n}}``; a
        partition with no row is absent.
    """
    wanted = sorted(set(partitions))
    if not wanted or not _has_table(engine, ledger_table):
        return {}
    table = ledger_table
    query = (
        sa.select(
            table.c.partition,
            table.c.state,
            sa.func.count(),
            sa.func.coalesce(sa.func.sum(table.c.event_count), 0),
            sa.func.coalesce(sa.func.sum(table.c.attempts), 0),
            # Requests beyond each batch's first: the retries the ledger saw over every try.
            sa.func.coalesce(sa.func.sum(sa.case((table.c.attempts > 1, table.c.attempts - 1), else_=0)), 0),
        )
        .where(table.c.partition.in_(wanted))
        .group_by(table.c.partition, table.c.state)
    )
    found: dict[str, dict[str, Any]] = {}
    with engine.connect() as connection:
        for partition, state, batches, events, attempts, retries in connection.execute(query):
            entry = found.setdefault(
                partition, {"retries": 0, **{s: {"batches": 0, "events": 0, "attempts": 0} for s in STATES}}
            )
            entry[state] = {"batches": int(batches), "events": int(events), "attempts": int(attempts)}
            entry["retries"] += int(retries)
    return found


def failed_batches(
    engine: Engine,
    partition: str,
    *,
    limit: int = 50,
    offset: int = 0,
    shard: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The partition's batches that failed for good: batch id, size, status, error; never event ids.

    :param engine: the state database.
    :param partition: the partition.
    :param limit: rows per page.
    :param offset: rows to skip.
    :param shard: ``(shard, shard_count)`` to keep one send task's batches only.
    """
    if not _has_table(engine, ledger_table):
        return {"total": 0, "batches": []}
    table = ledger_table
    where = sa.and_(table.c.partition == partition, table.c.state == "failed")
    if shard is not None:
        where = sa.and_(where, (table.c.session_key_hash % shard[1]) == shard[0])
    query = (
        sa.select(
            table.c.batch_id, table.c.event_count, table.c.http_status, table.c.error,
            table.c.attempts, table.c.updated_at,
        )
        .where(where)
        # Ordered by an expression, not the column: with ``ORDER BY batch_id ... LIMIT`` SQLite
        # walks the primary key (partition, batch_id) over every row of the partition to skip
        # a sort, instead of reading the few failed rows through the (partition, state) index.
        # On a 1M-event partition (298,000 rows, 50 failed): 0.55-0.62 s a page before, 0.002-0.007 s now.
        .order_by(table.c.batch_id.concat(""))
        .limit(limit)
        .offset(offset)
    )
    with engine.connect() as connection:
        total = int(connection.execute(sa.select(sa.func.count()).where(where)).scalar_one())
        rows = connection.execute(query).all()
    return {
        "total": total,
        "batches": [
            {
                "batch_id": row.batch_id,
                "events": int(row.event_count),
                "http_status": row.http_status,
                # Sanitised when written; again here in case a row predates that.
                "error": sanitize_error(row.error),
                "attempts": int(row.attempts),
                "updated_at": row.updated_at.isoformat() if row.updated_at else None,
            }
            for row in rows
        ],
    }


def envelope_health(engine: Engine, *, now: int, remaining_share: float) -> dict[str, Any]:
    """The envelope store at a glance: size, states, ages against each row's own lifetime.

    The lifetime of a row is read from its columns (``expires_at - issued_at``), never
    recomputed here, so a change of the lifetime rules shows as written.

    :param engine: the state database.
    :param now: the current Unix time.
    :param remaining_share: the refresh rule: a row is due when at most this share of its own
        lifetime is left (the refresh DAG's ``capi_envelope_refresh_remaining_share``).
    """
    empty: dict[str, Any] = {
        "total": 0, "by_state": {}, "expired": 0, "due_for_refresh": 0, "due_without_consent": 0,
        "consent_missing": 0, "histogram": [], "lifetimes_days": [], "remaining_share": remaining_share,
    }
    if not _has_table(engine, envelope_table):
        return empty
    table = envelope_table
    lifetime_days = ((table.c.expires_at - table.c.issued_at) // DAY_SECONDS).label("lifetime_days")
    age_bucket = ((sa.literal(now) - table.c.issued_at) // (AGE_BUCKET_DAYS * DAY_SECONDS)).label("age_bucket")
    is_expired = sa.or_(table.c.state == EXPIRED, table.c.expires_at <= now)
    # The same rule as the refresh selection (EnvelopeStore.count_due), per row's own lifetime.
    is_due = sa.and_(
        table.c.state != EXPIRED,
        table.c.expires_at > now,
        (table.c.expires_at - now) * 1_000_000
        <= (table.c.expires_at - table.c.issued_at) * round(remaining_share * 1_000_000),
    )
    histogram_query = (
        sa.select(
            lifetime_days,
            age_bucket,
            table.c.state,
            sa.func.count(),
            sa.func.sum(sa.case((is_expired, 1), else_=0)),
            sa.func.sum(sa.case((is_due, 1), else_=0)),
        )
        .group_by(lifetime_days, age_bucket, table.c.state)
    )
    result = dict(empty)
    by_state: dict[str, int] = {}
    cells: dict[tuple[int, int], int] = {}
    expired = due = due_without_consent = 0
    with engine.connect() as connection:
        for lifetime, bucket, state, count, n_expired, n_due in connection.execute(histogram_query):
            count = int(count)
            by_state[state] = by_state.get(state, 0) + count
            key = (int(lifetime), max(0, int(bucket)))
            cells[key] = cells.get(key, 0) + count
            expired += int(n_expired or 0)
            due += int(n_due or 0)
            if state == CONSENT_MISSING:
                due_without_consent += int(n_due or 0)
    result.update(
        total=sum(by_state.values()),
        by_state=dict(sorted(by_state.items())),
        expired=expired,
        due_for_refresh=due,
        due_without_consent=due_without_consent,
        consent_missing=by_state.get(CONSENT_MISSING, 0),
        lifetimes_days=sorted({lifetime for lifetime, _ in cells}),
        histogram=[
            {
                "lifetime_days": lifetime,
                "age_from_days": bucket * AGE_BUCKET_DAYS,
                "age_to_days": (bucket + 1) * AGE_BUCKET_DAYS,
                "envelopes": count,
            }
            for (lifetime, bucket), count in sorted(cells.items())
        ],
    )
    return result
