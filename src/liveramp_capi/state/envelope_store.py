"""The envelope store: the freshest ATS identity envelope of every user key, and its lifetime.

ATS envelopes expire (LiveRamp: 30 days, 15 days in California). Offline conversions (renewals,
refunds, CRM events) arrive weeks after the visit that produced their envelope, so the pipeline
keeps, per advertiser user key, the newest envelope it has seen, when it was issued, the consent
captured with it (what refreshing it needs) and the end user's IP (``X-Forwarded-For``). The
daily ``ats_envelope_refresh`` DAG refreshes rows before they expire; the send step replaces an
event's envelope by a fresher one from here, or holds the event back when every envelope it
could use has expired.

**Lifetime rule** (:mod:`liveramp_capi.domain.consent`): 15 days unless the captured consent
proves a jurisdiction where LiveRamp's 30 days apply (a TCF v2 string, or a GPP string naming
only non-Californian sections); an advertiser without Californian traffic may configure
:attr:`~liveramp_capi.domain.consent.LifetimeRule.NO_CALIFORNIA_TRAFFIC`. The store applies
one rule to every row: when the configured rule differs from the one its rows were computed
with (or the store predates the rule, schema version 1), :meth:`EnvelopeStore.ensure_schema`
recomputes every expiry before anything reads it. ``issued_at`` is the record's
``envelope_issued_at``; a record without one gets its ``event_time``: the envelope existed when
the event happened, so it was issued then or earlier, and an expiry computed from
``event_time`` is never too early (an envelope judged expired by it really is).

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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from liveramp_capi.domain.consent import (
    CALIFORNIA_LIFETIME_DAYS,
    DAY_SECONDS,
    LIFETIME_DAYS,
    Consent,
    LifetimeRule,
    envelope_expiry,
    gpp_sections,
    lifetime_seconds,
)
from liveramp_capi.domain.ledger import ensure_component_schema, sanitize_error
from liveramp_capi.domain.sessions import Session, ShardEntry, key_hash
from liveramp_capi.domain.statedb import (
    RETRYABLE_PGCODES,
    SQLITE_BEGIN_IMMEDIATE,
    chunked,
    execute_write,
    upsert_insert,
)

__all__ = [
    "ACTIVE",
    "CALIFORNIA_LIFETIME_DAYS",
    "CONSENT_MISSING",
    "DAY_SECONDS",
    "EXPIRED",
    "LIFETIME_DAYS",
    "REFRESH_FAILED",
    "Consent",
    "EnvelopeRecord",
    "LifetimeRule",
    "EnvelopeStore",
    "ResolvedSession",
    "RefreshResult",
    "StoredEnvelope",
    "build_refresh_summary",
    "envelope_expiry",
    "envelope_table",
    "gpp_sections",
    "lifetime_seconds",
    "resolve_session",
]

ACTIVE = "active"
EXPIRED = "expired"
REFRESH_FAILED = "refresh_failed"
CONSENT_MISSING = "consent_missing"
STATES: tuple[str, ...] = (ACTIVE, EXPIRED, REFRESH_FAILED, CONSENT_MISSING)


#: Name and version of the store's tables in ``capi_schema_version``.
SCHEMA_COMPONENT = "envelope_store"
#: 2: the lifetime rule applied to the rows is recorded (``capi_envelope_lifetime_rule``).
SCHEMA_VERSION = 2
#: Share of an envelope's lifetime that may remain when the refresh selects it (a third: a
#: 15-day envelope is refreshed from day 10 on, a 30-day one from day 20 on).
DEFAULT_REFRESH_REMAINING_SHARE = 1 / 3

MAX_USER_KEY_CHARS = 256
MAX_REASON_CHARS = 200
#: Rows per statement for upserts and ``IN`` look-ups (bounded statement size on both backends).
WRITE_CHUNK = 500

metadata = sa.MetaData()

envelope_table = sa.Table(
    "capi_envelope_store",
    metadata,
    sa.Column("user_key", sa.String(MAX_USER_KEY_CHARS), primary_key=True),
    # Stable 63-bit hash of user_key: refresh work is split by ``user_key_hash % slices``.
    sa.Column("user_key_hash", sa.BigInteger, nullable=False),
    sa.Column("envelope", sa.Text, nullable=False),
    # Unix seconds (UTC), like the input's envelope_issued_at and event_time.
    sa.Column("issued_at", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=False),
    sa.Column("consent_ct", sa.SmallInteger, nullable=True),
    sa.Column("consent_cv", sa.Text, nullable=True),
    sa.Column("consent_gpp", sa.Text, nullable=True),
    sa.Column("consent_gpp_sid", sa.String(320), nullable=True),
    sa.Column("client_ip", sa.String(64), nullable=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("reason", sa.String(MAX_REASON_CHARS), nullable=True),
    sa.Column("refresh_failures", sa.Integer, nullable=False, default=0),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.Column("last_refresh_attempt_at", sa.BigInteger, nullable=True),
    sa.CheckConstraint(
        "state IN (" + ", ".join(f"'{state}'" for state in STATES) + ")", name="ck_capi_envelope_state"
    ),
    # The refresh selection walks rows in (expires_at, user_key) order up to the longest horizon.
    sa.Index("ix_capi_envelope_store_expires", "expires_at", "user_key"),
    sa.Index("ix_capi_envelope_store_attempt", "last_refresh_attempt_at"),
)

#: Which lifetime rule the store's expiries were computed with (one row).
lifetime_rule_table = sa.Table(
    "capi_envelope_lifetime_rule",
    metadata,
    sa.Column("id", sa.SmallInteger, primary_key=True),
    sa.Column("rule", sa.String(64), nullable=False),
    sa.Column("applied_at", sa.BigInteger, nullable=False),
    sa.Column("rows_changed", sa.BigInteger, nullable=False),
)


def _now() -> int:
    return int(time.time())


# -- records and rows -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EnvelopeRecord:
    """What one conversion record tells the store about its user's envelope.

    :param user_key: the advertiser's stable user key.
    :param envelope: the ATS envelope (``user_data.partner_id``; secret for logs).
    :param issued_at: ``envelope_issued_at``, or the event time when the record has none.
    :param consent: the consent captured with the envelope, if any.
    :param client_ip: the end user's IP, if any (secret for logs).
    :param lifetime_rule: the configured lifetime rule (the store applies its own on upsert).
    """

    user_key: str
    envelope: str = field(repr=False)
    issued_at: int
    consent: Consent | None = None
    client_ip: str | None = field(default=None, repr=False)
    lifetime_rule: LifetimeRule = LifetimeRule.CONSERVATIVE

    @property
    def expires_at(self) -> int:
        """Expiry under the lifetime rule."""
        return envelope_expiry(self.issued_at, self.consent, self.lifetime_rule)

    @staticmethod
    def issued_at_of(pipeline: Mapping[str, Any], event_time: int, now: int) -> int:
        """The record's envelope issue time: ``envelope_issued_at``, else ``event_time``; never after ``now``.

        A timestamp in the future would win every later upsert, hence the clamp.

        :param pipeline: the record's pipeline-only fields.
        :param event_time: the event's Unix time.
        :param now: the current Unix time.
        """
        issued = pipeline.get("envelope_issued_at")
        if not isinstance(issued, int) or isinstance(issued, bool):
            issued = event_time
        return min(int(issued), int(now))

    @classmethod
    def from_accepted(
        cls,
        event: Mapping[str, Any],
        pipeline: Mapping[str, Any],
        event_time: int,
        now: int,
        lifetime_rule: LifetimeRule = LifetimeRule.CONSERVATIVE,
    ) -> EnvelopeRecord | None:
        """Build the record of an accepted event, or ``None`` without both a user key and an envelope.

        :param event: the validated event (``user_data.partner_id`` is the envelope).
        :param pipeline: its pipeline-only fields (``user_key``, ``envelope_issued_at``, ``consent``, ``client_ip``).
        :param event_time: the event's Unix time.
        :param now: the current Unix time.
        :param lifetime_rule: the configured lifetime rule (``EnvelopeStore.lifetime_rule``).
        """
        user_key = pipeline.get("user_key")
        envelope = (event.get("user_data") or {}).get("partner_id")
        if not isinstance(user_key, str) or not user_key or not isinstance(envelope, str) or not envelope:
            return None
        ip = pipeline.get("client_ip")
        return cls(
            user_key=user_key,
            envelope=envelope,
            issued_at=cls.issued_at_of(pipeline, event_time, now),
            consent=Consent.from_record(pipeline.get("consent")),
            client_ip=ip if isinstance(ip, str) and ip else None,
            lifetime_rule=lifetime_rule,
        )


@dataclass(frozen=True, slots=True)
class StoredEnvelope:
    """One row of the store.

    :param user_key: the advertiser's user key.
    :param envelope: the current envelope (secret for logs).
    :param issued_at: Unix seconds of issue or last refresh.
    :param expires_at: Unix seconds of expiry.
    :param consent: the consent captured with the envelope, if any.
    :param client_ip: the end user's IP, if any (secret for logs).
    :param state: one of :data:`STATES`.
    :param reason: why the last refresh failed (``refresh_failed``), else None.
    :param refresh_failures: consecutive failed refreshes.
    """

    user_key: str
    envelope: str = field(repr=False)
    issued_at: int
    expires_at: int
    consent: Consent | None
    client_ip: str | None = field(repr=False)
    state: str
    reason: str | None = None
    refresh_failures: int = 0

    @property
    def lifetime_seconds(self) -> int:
        """The lifetime this row was given (expiry minus issue or last refresh)."""
        return self.expires_at - self.issued_at

    @classmethod
    def from_row(cls, row: Any) -> StoredEnvelope:
        consent = Consent.from_columns(row.consent_ct, row.consent_cv, row.consent_gpp, row.consent_gpp_sid)
        return cls(
            user_key=row.user_key,
            envelope=row.envelope,
            issued_at=int(row.issued_at),
            expires_at=int(row.expires_at),
            consent=consent,
            client_ip=row.client_ip,
            state=row.state,
            reason=row.reason,
            refresh_failures=int(row.refresh_failures or 0),
        )


def _record_row(record: EnvelopeRecord, now: int, rule: LifetimeRule) -> dict[str, Any]:
    consent = record.consent
    expires_at = envelope_expiry(record.issued_at, consent, rule)
    return {
        "user_key": record.user_key,
        "user_key_hash": key_hash(record.user_key),
        "envelope": record.envelope,
        "issued_at": record.issued_at,
        "expires_at": expires_at,
        "consent_ct": consent.ct if consent else None,
        "consent_cv": consent.cv if consent else None,
        "consent_gpp": consent.gpp if consent else None,
        "consent_gpp_sid": consent.gpp_sid if consent else None,
        "client_ip": record.client_ip,
        # An envelope that arrives already expired is stored as such (it may still be replaced).
        "state": _live_state(expires_at, consent, now),
        "reason": None,
        "refresh_failures": 0,
        "updated_at": now,
        "last_refresh_attempt_at": None,
    }


def _live_state(expires_at: int, consent: Consent | None, now: int) -> str:
    return EXPIRED if expires_at <= now else (ACTIVE if consent else CONSENT_MISSING)


def _newest(records: Iterable[EnvelopeRecord]) -> list[EnvelopeRecord]:
    # One row per key (PostgreSQL refuses to upsert a row twice in one statement); the same
    # winner rule as the SQL guard; user_key order so concurrent writers lock rows alike.
    best: dict[str, EnvelopeRecord] = {}
    for record in records:
        if len(record.user_key) > MAX_USER_KEY_CHARS:
            raise ValueError(f"user_key longer than {MAX_USER_KEY_CHARS} characters")
        current = best.get(record.user_key)
        if current is None or (record.issued_at, record.envelope) > (current.issued_at, current.envelope):
            best[record.user_key] = record
    return [best[key] for key in sorted(best)]


@dataclass(frozen=True, slots=True)
class RefreshResult:
    """The outcome of one refresh, to be recorded with :meth:`EnvelopeStore.record_refreshed` or
    :meth:`EnvelopeStore.record_failed`.

    :param row: the row as selected (its envelope is the one that was refreshed).
    :param new_envelope: the refreshed type-19 envelope (success only; secret for logs).
    :param reason: short failure reason (failure only; no identifiers).
    """

    row: StoredEnvelope
    new_envelope: str | None = field(default=None, repr=False)
    reason: str | None = None


class EnvelopeStore:
    """Read and write the envelope store in the state database.

    :param engine: a SQLite or PostgreSQL engine (see :func:`~liveramp_capi.domain.statedb.make_engine`).
    :param lifetime_rule: how envelope lifetimes are decided (every task of one state database
        must use the same rule; :meth:`ensure_schema` re-evaluates the rows when it changes).
    """

    def __init__(self, engine: Engine, lifetime_rule: LifetimeRule = LifetimeRule.CONSERVATIVE) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
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
        with self.engine.connect() as connection:
            return connection.execute(
                sa.select(lifetime_rule_table.c.rule).where(lifetime_rule_table.c.id == 1)
            ).scalar_one_or_none()

    def apply_lifetime_rule(self, *, now: int | None = None, page_size: int = 2000) -> int:
        """Recompute every row's expiry (and expired state) under :attr:`lifetime_rule` if needed.

        Nothing happens when the store records this rule already. Otherwise the rows are walked
        in ``user_key`` pages; a row whose expiry changes gets the new one, and its state follows
        (``expired`` when the new expiry has passed, live again when a longer rule revives it).

        :param now: the current Unix time.
        :param page_size: rows read per page.
        :return: rows changed.
        """
        rule = self.lifetime_rule
        if self.applied_lifetime_rule() == rule.value:
            return 0
        now = _now() if now is None else int(now)
        table = envelope_table
        update = (
            sa.update(table)
            .where(table.c.user_key == sa.bindparam("k"), table.c.issued_at == sa.bindparam("issued"))
            .values(expires_at=sa.bindparam("exp"), state=sa.bindparam("st"), updated_at=now)
        )
        columns = (table.c.user_key, table.c.issued_at, table.c.expires_at, table.c.state, table.c.consent_ct,
                   table.c.consent_cv, table.c.consent_gpp, table.c.consent_gpp_sid)
        changed = 0
        cursor: str | None = None
        while True:
            query = sa.select(*columns).order_by(table.c.user_key).limit(page_size)
            if cursor is not None:
                query = query.where(table.c.user_key > cursor)
            with self.engine.connect() as connection:
                page = connection.execute(query).all()
            if not page:
                break
            cursor = page[-1].user_key
            updates = []
            for row in page:
                consent = Consent.from_columns(row.consent_ct, row.consent_cv, row.consent_gpp, row.consent_gpp_sid)
                expires_at = envelope_expiry(row.issued_at, consent, rule)
                if expires_at == row.expires_at:
                    continue
                state = row.state
                if expires_at <= now:
                    state = EXPIRED
                elif state == EXPIRED:
                    state = _live_state(expires_at, consent, now)
                updates.append({"k": row.user_key, "issued": row.issued_at, "exp": expires_at, "st": state})
            if updates:
                changed += self._execute(update, updates)
        statement = self._insert(lifetime_rule_table)
        values = {"id": 1, "rule": rule.value, "applied_at": now, "rows_changed": changed}
        statement = statement.values(**values).on_conflict_do_update(
            index_elements=[lifetime_rule_table.c.id],
            set_={name: getattr(statement.excluded, name) for name in ("rule", "applied_at", "rows_changed")},
        )
        self._execute(statement)
        return changed

    def _execute(self, statement: Any, rows: list[dict[str, Any]] | None = None) -> int:
        return execute_write(self.engine, statement, rows)

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
        newest = _newest(records)
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
            set_={
                name: getattr(excluded, name)
                for name in (
                    "envelope",
                    "issued_at",
                    "expires_at",
                    "consent_ct",
                    "consent_cv",
                    "consent_gpp",
                    "consent_gpp_sid",
                    "client_ip",
                    "state",
                    "reason",
                    "refresh_failures",
                    "updated_at",
                    "last_refresh_attempt_at",
                )
            },
            where=newer,
        )
        for chunk in chunked(newest, WRITE_CHUNK):
            self._execute(statement, [_record_row(record, now, self.lifetime_rule) for record in chunk])
        return len(newest)

    def mark_expired(self, *, now: int | None = None) -> int:
        """Set ``state='expired'`` on rows whose envelope has expired; return how many changed.

        :param now: the current Unix time.
        """
        return sum(self.mark_expired_by_state(now=now).values())

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
        for attempt in range(3):
            try:
                # Read then write in one transaction: SQLite must take the write lock at BEGIN.
                with self.engine.connect() as connection, connection.execution_options(
                    **{SQLITE_BEGIN_IMMEDIATE: True}
                ).begin():
                    found = connection.execute(
                        sa.select(table.c.state, sa.func.count()).where(where).group_by(table.c.state)
                    ).all()
                    connection.execute(sa.update(table).where(where).values(state=EXPIRED, updated_at=now))
                return {state: int(count) for state, count in sorted(found)}
            except DBAPIError as exc:
                code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
                if attempt == 2 or code not in RETRYABLE_PGCODES:
                    raise
                time.sleep(0.05 * (attempt + 1))
        return {}  # pragma: no cover - the loop returns or raises

    def record_refreshed(self, results: Sequence[RefreshResult], *, now: int | None = None) -> int:
        """Store refreshed envelopes with a new ``issued_at`` (``now``) and expiry.

        A row is only updated if it still holds the envelope that was refreshed: a newer one
        written meanwhile by the pipeline, or a row deleted by ``forget``, is left alone.

        :param results: successes (``new_envelope`` set).
        :param now: the refresh time, the new ``issued_at``.
        :return: rows updated.
        """
        now = _now() if now is None else int(now)
        table = envelope_table
        statement = (
            sa.update(table)
            .where(table.c.user_key == sa.bindparam("k"), table.c.envelope == sa.bindparam("old"))
            .values(
                envelope=sa.bindparam("new"),
                issued_at=now,
                expires_at=sa.bindparam("exp"),
                state=ACTIVE,
                reason=None,
                refresh_failures=0,
                updated_at=now,
                last_refresh_attempt_at=now,
            )
        )
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
        return sum(self._execute(statement, list(chunk)) for chunk in chunked(rows, WRITE_CHUNK)) if rows else 0

    def record_failed(self, results: Sequence[RefreshResult], *, now: int | None = None) -> int:
        """Mark rows whose refresh failed, with the reason; the envelope itself is kept.

        :param results: failures (``reason`` set; passed through :func:`sanitize_error`).
        :param now: the attempt time.
        :return: rows updated.
        """
        now = _now() if now is None else int(now)
        table = envelope_table
        statement = (
            sa.update(table)
            .where(table.c.user_key == sa.bindparam("k"), table.c.envelope == sa.bindparam("old"))
            .values(
                state=sa.case((table.c.expires_at <= now, EXPIRED), else_=REFRESH_FAILED),
                reason=sa.bindparam("why"),
                refresh_failures=table.c.refresh_failures + 1,
                updated_at=now,
                last_refresh_attempt_at=now,
            )
        )
        rows = [
            {
                "k": result.row.user_key,
                "old": result.row.envelope,
                "why": (sanitize_error(result.reason or "refresh failed") or "refresh failed")[:MAX_REASON_CHARS],
            }
            for result in sorted(results, key=lambda r: r.row.user_key)
        ]
        return sum(self._execute(statement, list(chunk)) for chunk in chunked(rows, WRITE_CHUNK)) if rows else 0

    def forget(self, user_keys: Iterable[str]) -> int:
        """Delete the identities of these user keys (data subject erasure); return rows deleted.

        :param user_keys: the advertiser's user keys.
        """
        keys = sorted(set(user_keys))
        table = envelope_table
        deleted = 0
        for chunk in chunked(keys, WRITE_CHUNK):
            deleted += self._execute(sa.delete(table).where(table.c.user_key.in_(list(chunk))))
        return deleted

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
        keys = sorted(set(user_keys))
        table = envelope_table
        found: dict[str, StoredEnvelope] = {}
        with self.engine.connect() as connection:
            for chunk in chunked(keys, WRITE_CHUNK):
                query = sa.select(envelope_table).where(table.c.user_key.in_(list(chunk)))
                if not include_expired:
                    query = query.where(table.c.expires_at > now)
                for row in connection.execute(query):
                    found[row.user_key] = StoredEnvelope.from_row(row)
        return found

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


# -- resolution at send time ------------------------------------------------------------------


@dataclass(slots=True)
class ResolvedSession:
    """A session after envelope resolution.

    :param original: the sendable entries as spilled (batch ids are cut from these, so a
        refreshed store between two runs does not change them), or None if nothing is sendable.
    :param resolved: the same entries with the chosen envelope in their JSON (``original``
        itself when nothing was replaced).
    :param expired: entries whose every usable envelope has expired: not sent.
    :param replaced: how many entries got the store's envelope.
    """

    original: Session | None
    resolved: Session | None
    expired: list[ShardEntry]
    replaced: int


def _with_envelope(entry: ShardEntry, envelope: str) -> ShardEntry | None:
    event = orjson.loads(entry.event_json)
    user_data = event.get("user_data")
    if not isinstance(user_data, dict) or user_data.get("partner_id") == envelope:
        return None
    user_data["partner_id"] = envelope
    return entry._replace(event_json=orjson.dumps(event))


def resolve_session(session: Session, stored: Mapping[str, StoredEnvelope], now: int) -> ResolvedSession:
    """Choose each entry's envelope: the freshest unexpired one, the record's own or the store's.

    An entry without a user key keeps its own envelope unless that is known to be expired. An
    entry whose own envelope has expired and whose key has no unexpired row is held back. Only
    entries that take the store's envelope are re-serialised.

    :param session: one session of a shard.
    :param stored: unexpired rows of the shard's user keys (:meth:`EnvelopeStore.resolve`).
    :param now: the send time.
    """
    kept: list[ShardEntry] = []
    resolved: list[ShardEntry] = []
    expired: list[ShardEntry] = []
    replaced = 0
    for entry in session.entries:
        own_expires = entry.envelope_expires_at
        own_valid = own_expires is None or own_expires > now
        row = stored.get(entry.user_key) if entry.user_key else None
        if row is not None and row.expires_at <= now:
            row = None
        if row is not None and (not own_valid or row.issued_at > (entry.envelope_issued_at or 0)):
            swapped = _with_envelope(entry, row.envelope)
            kept.append(entry)
            if swapped is not None:
                replaced += 1
                resolved.append(swapped)
            else:
                resolved.append(entry)
        elif own_valid:
            kept.append(entry)
            resolved.append(entry)
        else:
            expired.append(entry)
    if not kept:
        return ResolvedSession(None, None, expired, 0)
    original = session if not expired else Session(session.key, session.key_hash, kept)
    result = original if not replaced else Session(session.key, session.key_hash, resolved)
    return ResolvedSession(original, result, expired, replaced)


# -- the refresh run's summary ------------------------------------------------------------------


def build_refresh_summary(
    plan: Mapping[str, Any],
    slice_results: Iterable[Mapping[str, Any]],
    attempts: Mapping[str, Any],
    *,
    max_failure_ratio: float,
) -> dict[str, Any]:
    """Add up a refresh run: counts only, no identifiers.

    :param plan: the plan step's document (``as_of``, ``slices``, ``due``, ...).
    :param slice_results: one document per slice task that finished.
    :param attempts: :meth:`EnvelopeStore.attempts_since` for the plan's ``as_of``.
    :param max_failure_ratio: the largest share of failed refreshes among attempted ones.
    """
    results = list(slice_results)
    reported = sorted(int(result["slice"]) for result in results)
    missing = sorted(set(range(int(plan["slices"]))) - set(reported))
    refreshed = int(attempts.get("refreshed", 0))
    failed = int(attempts.get("failed", 0))
    attempted = refreshed + failed
    ratio = failed / attempted if attempted else 0.0
    if ratio > max_failure_ratio:
        status = "failure_ratio_exceeded"
    elif missing:
        status = "incomplete"
    else:
        status = "complete"
    return {
        "run_date": plan.get("run_date"),
        "status": status,
        "as_of": plan.get("as_of"),
        "remaining_share": plan.get("remaining_share"),
        # Rows due when the run started; slices may see a few more written meanwhile.
        "selected": int(plan.get("due", 0)),
        "selected_by_slices": sum(int(result.get("selected", 0)) for result in results),
        "refreshed": refreshed,
        "failed": failed,
        "failed_by_reason": dict(attempts.get("failed_by_reason", {})),
        "skipped_consent": sum(int(result.get("skipped_consent", 0)) for result in results),
        "attempted": attempted,
        "failure_ratio": round(ratio, 4),
        "max_failure_ratio": max_failure_ratio,
        # Envelopes found already expired by this run: conversions of these users are held until
        # a fresher envelope arrives. By the state they were in: active (nothing refreshed them in
        # time), refresh_failed, consent_missing (never refreshable).
        "expired_when_found": int(plan.get("newly_expired", 0)),
        "expired_when_found_by_state": dict(plan.get("newly_expired_by_state", {})),
        "requests": sum(int(result.get("requests", 0)) for result in results),
        "retries": sum(int(result.get("retries", 0)) for result in results),
        "slices": {"planned": int(plan["slices"]), "reported": len(reported), "missing": missing},
    }
