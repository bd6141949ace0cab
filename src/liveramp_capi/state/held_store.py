"""The held conversions table (``capi_held_conversions``), next to the delivery ledger.

What a held conversion is, its states and why it is held: :mod:`liveramp_capi.domain.held`.
Rows hold the event as it would have been sent (identifiers included): like the envelope store,
the table is a secret for logs; only counts leave it. Plain SQLAlchemy Core, SQLite or PostgreSQL.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from liveramp_capi.domain.batches import batch_id_for
from liveramp_capi.domain.held import (
    DELIVERING,
    HELD,
    LOST,
    REASON_NO_USER_KEY,
    REASON_WINDOW_PASSED,
    RECOVERED,
    STATES,
    HeldConversion,
    HeldIndex,
    event_key,
    event_type_of,
)
from liveramp_capi.domain.redaction import sanitize_error
from liveramp_capi.domain.sessions import ShardEntry
from liveramp_capi.state.database import delete_where_in, execute_write, upsert_insert, write_in_chunks
from liveramp_capi.state.envelope_rows import envelope_table
from liveramp_capi.state.migrations import ensure_component_schema, metadata

MAX_REASON_CHARS = 200
WRITE_CHUNK = 500

held_table = sa.Table(
    "capi_held_conversions", metadata,
    sa.Column("partition", sa.String(32), primary_key=True),
    # TikTok's deduplication key (event_type + event_id), hashed to a fixed width.
    sa.Column("event_key", sa.String(32), primary_key=True),
    sa.Column("event_id", sa.Text, nullable=False),
    sa.Column("event_type", sa.String(128), nullable=False),
    sa.Column("session_key_hash", sa.BigInteger, nullable=False),
    sa.Column("user_key", sa.String(256), nullable=True),
    sa.Column("event_time", sa.BigInteger, nullable=False),
    sa.Column("envelope_expires_at", sa.BigInteger, nullable=True),
    sa.Column("event_json", sa.Text, nullable=False),
    sa.Column("batch_id", sa.String(32), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("reason", sa.String(MAX_REASON_CHARS), nullable=True),
    sa.Column("held_at", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.Column("claim_token", sa.String(64), nullable=True),
    sa.Column("claimed_at", sa.BigInteger, nullable=True),
    sa.Column("recovered_at", sa.BigInteger, nullable=True),
    sa.Column("recovered_by", sa.String(250), nullable=True),
    sa.CheckConstraint(
        "state IN (" + ", ".join(f"'{state}'" for state in STATES) + ")", name="ck_capi_held_state"
    ),
    sa.Index("ix_capi_held_conversions_state_user", "state", "user_key"),
    sa.Index("ix_capi_held_conversions_claim", "claim_token"),
)

SCHEMA_COMPONENT = "held_conversions"
SCHEMA_VERSION = 1


class HeldConversions:
    """The held conversions table in the state database.

    :param engine: a SQLite or PostgreSQL engine (see :func:`~liveramp_capi.state.database.make_engine`).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._insert = upsert_insert(engine)

    def ensure_schema(self) -> None:
        """Create the table if missing and check its schema version (idempotent, concurrent-safe)."""
        ensure_component_schema(self.engine, [held_table], SCHEMA_COMPONENT, SCHEMA_VERSION)

    def _execute(self, statement: Any, rows: list[dict[str, Any]] | None = None) -> int:
        return execute_write(self.engine, statement, rows)

    # -- the send step ----------------------------------------------------------------------

    def hold(self, partition: str, entries: Iterable[ShardEntry], *, now: int | None = None) -> int:
        """Record entries the send step did not send because their envelope expired.

        An entry without a user key is recorded ``lost`` at once (nothing can match a fresher
        envelope to it). An event held before keeps its row: the first hold wins.

        :param partition: the partition name.
        :param entries: the held shard entries.
        :param now: the current Unix time.
        :return: rows offered.
        """
        now = int(time.time()) if now is None else int(now)
        rows: dict[str, dict[str, Any]] = {}
        for entry in entries:
            kind = event_type_of(entry)
            key = event_key(kind, entry.event_id)
            rows[key] = {
                "partition": partition,
                "event_key": key,
                "event_id": entry.event_id,
                "event_type": kind[:128],
                "session_key_hash": entry.key_hash,
                "user_key": entry.user_key,
                "event_time": entry.event_time,
                "envelope_expires_at": entry.envelope_expires_at,
                # Nothing will ever send a lost event: keep no personal data for it.
                "event_json": entry.event_json.decode() if entry.user_key else "",
                "batch_id": batch_id_for(partition, "held:" + key, (entry.event_id,), entry.event_json),
                "state": HELD if entry.user_key else LOST,
                "reason": None if entry.user_key else REASON_NO_USER_KEY,
                "held_at": now,
                "updated_at": now,
            }
        if not rows:
            return 0
        statement = self._insert(held_table).on_conflict_do_nothing(
            index_elements=[held_table.c.partition, held_table.c.event_key]
        )
        ordered = [rows[key] for key in sorted(rows)]
        write_in_chunks(self.engine, statement, ordered, WRITE_CHUNK)
        return len(ordered)

    def shard_index(self, partition: str, shard: int, shard_count: int) -> HeldIndex:
        """The held rows of one send shard (any state), for :meth:`~liveramp_capi.domain.held.HeldIndex.state_of`.

        :param partition: the partition name.
        :param shard: shard index, ``0..shard_count-1``.
        :param shard_count: the partition's shard count.
        """
        table = held_table
        query = sa.select(table.c.event_key, table.c.event_id, table.c.state, table.c.reason).where(
            table.c.partition == partition, (table.c.session_key_hash % shard_count) == shard
        )
        with self.engine.connect() as connection:
            rows = connection.execute(query).all()
        return HeldIndex({key: (state, reason) for key, _, state, reason in rows}, {row.event_id for row in rows})

    # -- recovery ---------------------------------------------------------------------------

    def expire_past_window(self, *, now: int, window_seconds: int, lease_seconds: int = 600) -> int:
        """Mark held events older than the attribution window ``lost``; return how many.

        :param now: the current Unix time.
        :param window_seconds: the attribution window (TikTok: 28 days).
        :param lease_seconds: a claim older than this (its run died) no longer protects a row.
        """
        table = held_table
        return self._execute(
            sa.update(table)
            .where(
                sa.or_(table.c.state == HELD,
                       sa.and_(table.c.state == DELIVERING, table.c.claimed_at <= now - lease_seconds)),
                table.c.event_time <= now - window_seconds,
            )
            .values(state=LOST, reason=REASON_WINDOW_PASSED, updated_at=now, claim_token=None, claimed_at=None,
                    event_json="")
        )

    def claim_recoverable(
        self, *, token: str, now: int, window_seconds: int, limit: int = 2000, lease_seconds: int = 600
    ) -> list[HeldConversion]:
        """Claim up to ``limit`` held events whose user key has a live envelope; return them.

        A claim is a conditional update, so two recovery runs never claim one event; a claim
        older than ``lease_seconds`` (its run died) may be taken over.

        :param token: this run's unique claim token.
        :param now: the current Unix time.
        :param window_seconds: only events inside the attribution window are claimed.
        :param limit: most events per claim.
        :param lease_seconds: age after which another run's claim lapses.
        """
        table, store = held_table, envelope_table
        # A primary-key probe per waiting event, not a scan of every live envelope.
        has_live_envelope = (
            sa.select(store.c.user_key)
            .where(store.c.user_key == table.c.user_key, store.c.expires_at > now)
            .exists()
        )
        claimable = sa.and_(
            sa.or_(table.c.state == HELD,
                   sa.and_(table.c.state == DELIVERING, table.c.claimed_at <= now - lease_seconds)),
            table.c.event_time > now - window_seconds,
            has_live_envelope,
        )
        chosen = (
            sa.select(table.c.partition, table.c.event_key)
            .where(claimable)
            .order_by(table.c.partition, table.c.event_key)
            .limit(limit)
        )
        self._execute(
            sa.update(table)
            .where(sa.tuple_(table.c.partition, table.c.event_key).in_(chosen), claimable)
            .values(state=DELIVERING, claim_token=token, claimed_at=now, updated_at=now)
        )
        query = (
            sa.select(table.c.partition, table.c.event_key, table.c.event_id, table.c.session_key_hash,
                      table.c.batch_id, table.c.event_json, store.c.envelope)
            .join(store, store.c.user_key == table.c.user_key)
            .where(table.c.claim_token == token, table.c.state == DELIVERING, store.c.expires_at > now)
            .order_by(table.c.partition, table.c.event_key)
        )
        with self.engine.connect() as connection:
            claimed = [
                HeldConversion(p, k, i, int(h), b, j.encode(), e)
                for p, k, i, h, b, j, e in connection.execute(query)
            ]
        # A claimed row whose envelope lapsed between the two statements goes back to waiting.
        taken = {(item.partition, item.event_key) for item in claimed}
        with self.engine.connect() as connection:
            stray = [
                (p, k)
                for p, k in connection.execute(
                    sa.select(table.c.partition, table.c.event_key).where(
                        table.c.claim_token == token, table.c.state == DELIVERING
                    )
                )
                if (p, k) not in taken
            ]
        if stray:
            self._finish(token, stray, HELD, now=now, reason=None)
        return claimed

    def _finish(
        self,
        token: str,
        keys: Sequence[tuple[str, str]],
        state: str,
        *,
        now: int,
        reason: str | None,
        run_id: str | None = None,
    ) -> int:
        table = held_table
        values: dict[str, Any] = {"state": state, "reason": reason, "updated_at": now, "claim_token": None,
                                  "claimed_at": None}
        if state == RECOVERED:
            values.update(recovered_at=now, recovered_by=run_id)
        if state in (RECOVERED, LOST):
            values["event_json"] = ""  # delivered or never will be: no personal data kept
        statement = (
            sa.update(table)
            .where(table.c.partition == sa.bindparam("p"), table.c.event_key == sa.bindparam("k"),
                   table.c.claim_token == token)
            .values(**values)
        )
        rows = [{"p": p, "k": k} for p, k in sorted(set(keys))]
        return write_in_chunks(self.engine, statement, rows, WRITE_CHUNK)

    def mark_recovered(
        self, token: str, items: Iterable[HeldConversion], *, now: int, run_id: str | None
    ) -> int:
        """Record claimed events the adapter acknowledged (or the ledger shows acknowledged)."""
        return self._finish(token, [(i.partition, i.event_key) for i in items], RECOVERED, now=now, reason=None,
                            run_id=run_id)

    def release(self, token: str, items: Iterable[HeldConversion], *, now: int) -> int:
        """Give claimed events back (a transient failure): a later run tries them again."""
        return self._finish(token, [(i.partition, i.event_key) for i in items], HELD, now=now, reason=None)

    def mark_lost(self, token: str, items: Iterable[HeldConversion], reason: str, *, now: int) -> int:
        """Give up on claimed events (the adapter refused them for good), with the reason."""
        why = (sanitize_error(reason) or "lost")[:MAX_REASON_CHARS]
        return self._finish(token, [(i.partition, i.event_key) for i in items], LOST, now=now, reason=why)

    # -- reads and erasure -------------------------------------------------------------------

    def counts(self, partition: str | None = None) -> dict[str, Any]:
        """Events by state, and lost ones by reason: everywhere, or for one partition.

        :param partition: restrict to the events of this partition.
        """
        table = held_table
        query = sa.select(table.c.state, table.c.reason, sa.func.count()).group_by(table.c.state, table.c.reason)
        if partition is not None:
            query = query.where(table.c.partition == partition)
        result: dict[str, Any] = {state: 0 for state in STATES}
        lost_by_reason: dict[str, int] = {}
        with self.engine.connect() as connection:
            for state, reason, count in connection.execute(query):
                result[state] += int(count)
                if state == LOST:
                    lost_by_reason[reason or LOST] = lost_by_reason.get(reason or LOST, 0) + int(count)
        result["lost_by_reason"] = dict(sorted(lost_by_reason.items()))
        return result

    def forget(self, user_keys: Iterable[str]) -> int:
        """Delete the held events of these user keys (data subject erasure); return rows deleted."""
        return delete_where_in(self.engine, held_table.c.user_key, user_keys, WRITE_CHUNK)
