"""The envelope store: the freshest ATS identity envelope of every user key, and its lifetime.

The store keeps, per advertiser user key, the newest envelope the pipeline has seen
(:mod:`liveramp_capi.domain.envelopes`), when it was issued, the consent captured with it (what
refreshing it needs) and the end user's IP (``X-Forwarded-For``). The daily
``ats_envelope_refresh`` DAG refreshes rows before they expire; the send step resolves a
fresher envelope from here. One lifetime rule applies to every row
(:mod:`liveramp_capi.state.envelope_rows`).

**Store rules.** Upserts only, and the newer ``issued_at`` wins (on a tie, the larger envelope
value, so the outcome does not depend on the order of writers): re-running a partition leaves
the store as one run would, and two writers converge. The consent and IP travel with the
envelope that wins: an envelope is never refreshed with consent captured for another one. A
failed refresh never overwrites the envelope it tried to refresh.

Envelope values, consent strings and IPs are secrets for logs: no ``repr``, log line or
exception message built here contains them. Plain SQLAlchemy Core on SQLite or PostgreSQL.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from liveramp_capi.domain.consent import (
    DAY_SECONDS,
    DEFAULT_REFRESH_REMAINING_SHARE,
    LIFETIME_DAYS,
    LifetimeRule,
    envelope_expiry,
)
from liveramp_capi.domain.envelopes import (
    ACTIVE,
    CONSENT_MISSING,
    EXPIRED,
    REFRESH_FAILED,
    STORED_ENVELOPE_COLUMNS,
    EnvelopeRecord,
    LiveEnvelope,
    RefreshResult,
    StoredEnvelope,
    newest_per_user_key,
)
from liveramp_capi.domain.redaction import sanitize_error
from liveramp_capi.state.database import (
    SQLITE_BEGIN_IMMEDIATE,
    chunked,
    delete_where_in,
    driver_placeholder,
    execute_write,
    retrying,
    upsert_insert,
    write_in_chunks,
)
from liveramp_capi.state.envelope_rows import (
    MAX_REASON_CHARS,
    REPLACED_ON_UPSERT,
    applied_lifetime_rule,
    apply_lifetime_rule,
    envelope_table,
    lifetime_rule_table,
    record_row,
)
from liveramp_capi.state.migrations import ensure_component_schema

#: Name and version of the store's tables in ``capi_schema_version``.
SCHEMA_COMPONENT = "envelope_store"
#: 2: the lifetime rule applied to the rows is recorded (``capi_envelope_lifetime_rule``).
SCHEMA_VERSION = 2
#: Share of an envelope's lifetime that may remain when the refresh selects it (a third: a
#: 15-day envelope is refreshed from day 10 on, a 30-day one from day 20 on).
#: Rows per statement for upserts and ``IN`` look-ups (bounded statement size on both backends).
WRITE_CHUNK = 500
#: The columns of :meth:`EnvelopeStore.live_envelopes`, in ``LiveEnvelope`` order after the key.
_LIVE_COLUMNS = ("user_key", "envelope", "issued_at", "expires_at")


def _now() -> int:
    return int(time.time())


class EnvelopeStore:
    """Read and write the envelope store in the state database.

    :param engine: a SQLite or PostgreSQL engine (see :func:`~liveramp_capi.state.database.make_engine`).
    :param lifetime_rule: how envelope lifetimes are decided (every task of one state database
        must use the same rule; :meth:`ensure_schema` re-evaluates the rows when it changes).
    """

    def __init__(self, engine: Engine, lifetime_rule: LifetimeRule = LifetimeRule.CONSERVATIVE) -> None:
        self.engine = engine
        self.lifetime_rule = LifetimeRule(lifetime_rule)
        self._insert = upsert_insert(engine)

    def ensure_schema(self) -> None:
        """Create the store's tables if missing, check the schema version, apply the lifetime rule.

        Idempotent and concurrent-safe. A store written under another rule (or before rules
        were recorded) gets every expiry recomputed here, before any caller reads one.
        """
        ensure_component_schema(
            self.engine, [envelope_table, lifetime_rule_table], SCHEMA_COMPONENT, SCHEMA_VERSION
        )
        self.apply_lifetime_rule()

    def applied_lifetime_rule(self) -> str | None:
        """The rule the stored expiries were computed with; None for a store never re-evaluated."""
        return applied_lifetime_rule(self.engine)

    def apply_lifetime_rule(self, *, now: int | None = None, page_size: int = 2000) -> int:
        """Recompute every row's expiry under :attr:`lifetime_rule` if the store records another rule.

        See :func:`~liveramp_capi.state.envelope_rows.apply_lifetime_rule`; returns rows changed.
        """
        return apply_lifetime_rule(self.engine, self.lifetime_rule, now=_now() if now is None else int(now),
                                   page_size=page_size)

    def _execute(self, statement: Any, rows: list[dict[str, Any]] | None = None) -> int:
        return execute_write(self.engine, statement, rows)

    def _update_held_envelopes(self, values: dict[str, Any], rows: list[dict[str, Any]]) -> int:
        # Only a row still holding the envelope that was refreshed changes: a newer one written
        # meanwhile by the pipeline, or a row deleted by ``forget``, is left alone.
        table = envelope_table
        statement = (
            sa.update(table)
            .where(table.c.user_key == sa.bindparam("k"), table.c.envelope == sa.bindparam("old"))
            .values(**values)
        )
        return write_in_chunks(self.engine, statement, rows, WRITE_CHUNK)

    # -- writes ---------------------------------------------------------------------------

    def upsert(self, records: Iterable[EnvelopeRecord], *, now: int | None = None) -> int:
        """Insert or refresh rows from records; a row changes only for a newer ``issued_at``.

        On a tie of ``issued_at`` the larger envelope value wins, so concurrent writers and any
        order of records converge on the same row; replaying the same records changes nothing.

        :param records: records of accepted events (several per key are fine).
        :param now: the current Unix time (tests pin it).
        :return: the number of distinct user keys offered.
        """
        now = _now() if now is None else int(now)
        newest = newest_per_user_key(records)
        if not newest:
            return 0
        table = envelope_table
        statement = self._insert(table)
        excluded = statement.excluded
        newer = sa.or_(
            excluded.issued_at > table.c.issued_at,
            sa.and_(excluded.issued_at == table.c.issued_at, excluded.envelope > table.c.envelope),
        )
        statement = statement.on_conflict_do_update(
            index_elements=[table.c.user_key],
            set_={name: getattr(excluded, name) for name in REPLACED_ON_UPSERT},
            where=newer,
        )
        for chunk in chunked(newest, WRITE_CHUNK):
            self._execute(statement, [record_row(record, now, self.lifetime_rule) for record in chunk])
        return len(newest)

    def mark_expired_by_state(self, *, now: int | None = None) -> dict[str, int]:
        """Mark expired rows, counted by the state they were found in.

        ``active``: nothing selected it in time (it arrived close to expiry, or no refresh ran);
        ``refresh_failed``: every refresh tried failed; ``consent_missing``: it could not be
        refreshed at all.

        :param now: the current Unix time.
        :return: ``{previous state: rows}``, states with no row left out.
        """
        now = _now() if now is None else int(now)
        table = envelope_table
        where = sa.and_(table.c.expires_at <= now, table.c.state != EXPIRED)

        def mark() -> dict[str, int]:
            # Read then write in one transaction: SQLite must take the write lock at BEGIN.
            with self.engine.connect() as connection, connection.execution_options(
                **{SQLITE_BEGIN_IMMEDIATE: True}
            ).begin():
                found = connection.execute(
                    sa.select(table.c.state, sa.func.count()).where(where).group_by(table.c.state)
                ).all()
                connection.execute(sa.update(table).where(where).values(state=EXPIRED, updated_at=now))
            return {state: int(count) for state, count in sorted(found)}

        return retrying(mark)

    def record_refreshed(self, results: Sequence[RefreshResult], *, now: int | None = None) -> int:
        """Store refreshed envelopes with a new ``issued_at`` (``now``) and expiry.

        A row is only updated if it still holds the envelope that was refreshed: a newer one
        written meanwhile by the pipeline, or a row deleted by ``forget``, is left alone.

        :param results: successes (``new_envelope`` set).
        :param now: the refresh time, the new ``issued_at``.
        :return: rows updated.
        """
        now = _now() if now is None else int(now)
        values = {
            "envelope": sa.bindparam("new"),
            "issued_at": now,
            "expires_at": sa.bindparam("exp"),
            "state": ACTIVE,
            "reason": None,
            "refresh_failures": 0,
            "updated_at": now,
            "last_refresh_attempt_at": now,
        }
        rows = [
            {
                "k": result.row.user_key,
                "old": result.row.envelope,
                "new": result.new_envelope,
                "exp": envelope_expiry(now, result.row.consent, self.lifetime_rule),
            }
            for result in sorted(results, key=lambda r: r.row.user_key)
            if result.new_envelope
        ]
        return self._update_held_envelopes(values, rows)

    def record_failed(self, results: Sequence[RefreshResult], *, now: int | None = None) -> int:
        """Mark rows whose refresh failed, with the reason; the envelope itself is kept.

        :param results: failures (``reason`` set; passed through :func:`sanitize_error`).
        :param now: the attempt time.
        :return: rows updated.
        """
        now = _now() if now is None else int(now)
        table = envelope_table
        values = {
            "state": sa.case((table.c.expires_at <= now, EXPIRED), else_=REFRESH_FAILED),
            "reason": sa.bindparam("why"),
            "refresh_failures": table.c.refresh_failures + 1,
            "updated_at": now,
            "last_refresh_attempt_at": now,
        }
        rows = [
            {
                "k": result.row.user_key,
                "old": result.row.envelope,
                "why": (sanitize_error(result.reason or "refresh failed") or "refresh failed")[:MAX_REASON_CHARS],
            }
            for result in sorted(results, key=lambda r: r.row.user_key)
        ]
        return self._update_held_envelopes(values, rows)

    def forget(self, user_keys: Iterable[str]) -> int:
        """Delete the identities of these user keys (data subject erasure); return rows deleted.

        :param user_keys: the advertiser's user keys.
        """
        return delete_where_in(self.engine, envelope_table.c.user_key, user_keys, WRITE_CHUNK)

    # -- reads ----------------------------------------------------------------------------

    def get(self, user_key: str) -> StoredEnvelope | None:
        """Return the row of ``user_key``, or None.

        :param user_key: the advertiser's user key.
        """
        with self.engine.connect() as connection:
            row = connection.execute(
                sa.select(envelope_table).where(envelope_table.c.user_key == user_key)
            ).first()
        return StoredEnvelope.from_row(row) if row is not None else None

    def resolve(
        self, user_keys: Iterable[str], *, now: int | None = None, include_expired: bool = False
    ) -> dict[str, StoredEnvelope]:
        """Return the unexpired row of each user key that has one (keys without one are absent).

        :param user_keys: the keys to look up (e.g. one send shard's; looked up in chunks).
        :param now: the current Unix time.
        :param include_expired: return expired rows too (a dry run replays the upsert over them).
        """
        now = _now() if now is None else int(now)
        build = StoredEnvelope.from_values
        return {row[0]: build(*row) for row in self._select(STORED_ENVELOPE_COLUMNS, user_keys, now, include_expired)}

    def live_envelopes(self, user_keys: Iterable[str], *, now: int) -> dict[str, LiveEnvelope]:
        """Return the unexpired envelope of each user key that has one: only what the send step uses.

        The same rows as :meth:`resolve`, three columns of them: a send task reads some 20,000
        before its first request, and building full rows (with their consent) was two thirds of it.

        :param user_keys: the keys to look up (looked up in chunks).
        :param now: the current Unix time.
        """
        return {
            key: LiveEnvelope(envelope, issued_at, expires_at)
            for key, envelope, issued_at, expires_at in self._select(_LIVE_COLUMNS, user_keys, int(now), False)
        }

    def _select(self, columns: Sequence[str], user_keys: Iterable[str], now: int, include_expired: bool) -> Iterator[Any]:
        """The rows of ``user_keys`` as driver tuples of ``columns`` (``user_key`` first), unexpired
        ones only unless ``include_expired``."""
        keys = sorted(set(user_keys))
        # Plain SQL through the driver, rows as tuples: SQLAlchemy's per-row work was three
        # quarters of a send task's look-up time.
        mark = driver_placeholder(self.engine)
        head = f"SELECT {', '.join(columns)} FROM {envelope_table.name} WHERE "
        tail = "" if include_expired else f" AND expires_at > {mark}"
        with self.engine.connect() as connection:
            for chunk in chunked(keys, WRITE_CHUNK):
                statement = f"{head}user_key IN ({', '.join([mark] * len(chunk))}){tail}"
                params = tuple(chunk) if include_expired else (*chunk, now)
                yield from connection.exec_driver_sql(statement, params)

    @staticmethod
    def _due_filter(now: int, remaining_share: float, slice_index: int, slices: int) -> sa.ColumnElement[bool]:
        if slices < 1 or not 0 <= slice_index < slices:
            raise ValueError("slice_index must be in 0..slices-1")
        if not 0 < remaining_share < 1:
            raise ValueError("remaining_share must lie strictly between 0 and 1")
        table = envelope_table
        share_ppm = round(remaining_share * 1_000_000)
        clauses = [
            table.c.expires_at > now,
            # The longest lifetime bounds the index range; the share test below is per row.
            table.c.expires_at <= now + math.ceil(LIFETIME_DAYS * DAY_SECONDS * remaining_share),
            (table.c.expires_at - now) * 1_000_000 <= (table.c.expires_at - table.c.issued_at) * share_ppm,
            table.c.state != EXPIRED,
        ]
        if slices > 1:
            clauses.append((table.c.user_key_hash % slices) == slice_index)
        return sa.and_(*clauses)

    def count_due(self, *, now: int, remaining_share: float = DEFAULT_REFRESH_REMAINING_SHARE) -> dict[str, int]:
        """Count live rows with at most ``remaining_share`` of their lifetime left, by consent.

        :param now: the selection time.
        :param remaining_share: a row is due when ``expires_at - now <= share * its lifetime``.
        :return: ``{"due": n, "consent_missing": m}`` (``m`` is part of ``n``).
        """
        table = envelope_table
        where = self._due_filter(now, remaining_share, 0, 1)
        query = sa.select(
            sa.func.count(),
            sa.func.coalesce(sa.func.sum(sa.case((table.c.state == CONSENT_MISSING, 1), else_=0)), 0),
        ).where(where)
        with self.engine.connect() as connection:
            due, missing = connection.execute(query).one()
        return {"due": int(due), "consent_missing": int(missing)}

    def iter_due(
        self,
        *,
        now: int,
        remaining_share: float = DEFAULT_REFRESH_REMAINING_SHARE,
        slice_index: int = 0,
        slices: int = 1,
        page_size: int = 1000,
    ) -> Iterator[list[StoredEnvelope]]:
        """Yield pages of due rows (see :meth:`count_due`), soonest expiry first, for one slice.

        Keyset paging on ``(expires_at, user_key)``: memory is one page whatever the store
        size, and rows refreshed while paging (their expiry moves past the cursor) or failed
        (their key is behind the cursor) are not seen twice. Each page is its own short read.

        :param now: the selection time (keep it fixed for a whole run).
        :param remaining_share: see :meth:`count_due`.
        :param slice_index: which slice, ``0..slices-1`` (``user_key_hash % slices``).
        :param slices: how many workers share the store.
        :param page_size: rows per page.
        """
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        table = envelope_table
        where = self._due_filter(now, remaining_share, slice_index, slices)
        cursor: tuple[int, str] | None = None
        while True:
            query = sa.select(envelope_table).where(where)
            if cursor is not None:
                query = query.where(
                    sa.or_(
                        table.c.expires_at > cursor[0],
                        sa.and_(table.c.expires_at == cursor[0], table.c.user_key > cursor[1]),
                    )
                )
            query = query.order_by(table.c.expires_at, table.c.user_key).limit(page_size)
            with self.engine.connect() as connection:
                page = [StoredEnvelope.from_row(row) for row in connection.execute(query)]
            if not page:
                return
            yield page
            if len(page) < page_size:
                return
            cursor = (page[-1].expires_at, page[-1].user_key)

    def attempts_since(self, since: int) -> dict[str, Any]:
        """Count the outcomes of refreshes attempted at or after ``since`` (for a run's summary).

        Read from the store rather than from task results, so a retried slice task is not
        counted twice nor lost.

        :param since: Unix time the run started selecting.
        :return: ``{"refreshed": n, "failed": m, "failed_by_reason": {...}}``.
        """
        table = envelope_table
        query = (
            sa.select(table.c.state, table.c.reason, sa.func.count())
            .where(table.c.last_refresh_attempt_at >= since)
            .group_by(table.c.state, table.c.reason)
        )
        refreshed = failed = 0
        by_reason: dict[str, int] = {}
        with self.engine.connect() as connection:
            for state, reason, count in connection.execute(query):
                if state == ACTIVE:
                    refreshed += int(count)
                else:
                    failed += int(count)
                    key = reason or state
                    by_reason[key] = by_reason.get(key, 0) + int(count)
        return {"refreshed": refreshed, "failed": failed, "failed_by_reason": dict(sorted(by_reason.items()))}

    def counts_by_state(self) -> dict[str, int]:
        """Rows per state (for reports and tests)."""
        table = envelope_table
        with self.engine.connect() as connection:
            rows = connection.execute(sa.select(table.c.state, sa.func.count()).group_by(table.c.state)).all()
        return {state: int(count) for state, count in sorted(rows)}
