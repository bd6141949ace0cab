"""The envelope store: the freshest ATS identity envelope of every user key, and its lifetime.

ATS envelopes expire (LiveRamp: 30 days, 15 days in California). Offline conversions (renewals,
refunds, CRM events) arrive weeks after the visit that produced their envelope, so the pipeline
keeps, per advertiser user key, the newest envelope it has seen, when it was issued, the consent
captured with it (what refreshing it needs) and the end user's IP (``X-Forwarded-For``). The
daily ``ats_envelope_refresh`` DAG refreshes rows before they expire; the send step replaces an
event's envelope by a fresher one from here, or holds the event back when every envelope it
could use has expired.

**Lifetime rule.** An envelope lives :data:`LIFETIME_DAYS` (30) days from ``issued_at``, or
:data:`CALIFORNIA_LIFETIME_DAYS` (15) when its consent is a GPP string whose ``gpp_sid`` names
section 8 (US-California). The US Privacy string (``ct=3``) is used US-wide, so it does not
imply California on its own. ``issued_at`` is the record's ``envelope_issued_at``; a record
without one gets its ``event_time``: the envelope existed when the event happened, so it was
issued then or earlier, and an expiry computed from ``event_time`` is never too early (an
envelope judged expired by it really is).

**Store rules.** Upserts only, and the newer ``issued_at`` wins (on a tie, the larger envelope
value, so the outcome does not depend on the order of writers): re-running a partition leaves
the store as one run would, and two writers converge. The consent and IP travel with the
envelope that wins: an envelope is never refreshed with consent captured for another one. A
failed refresh never overwrites the envelope it tried to refresh.

Envelope values, consent strings and IPs are secrets for logs: no ``repr``, log line or
exception message built here contains them. Plain SQLAlchemy Core on SQLite or PostgreSQL.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from liveramp_capi.domain.ledger import ensure_component_schema, sanitize_error
from liveramp_capi.domain.sessions import Session, ShardEntry, key_hash
from liveramp_capi.domain.statedb import upsert_insert

__all__ = [
    "ACTIVE",
    "CALIFORNIA_LIFETIME_DAYS",
    "CONSENT_MISSING",
    "EXPIRED",
    "LIFETIME_DAYS",
    "REFRESH_FAILED",
    "Consent",
    "EnvelopeRecord",
    "EnvelopeStore",
    "ResolvedSession",
    "RefreshResult",
    "StoredEnvelope",
    "build_refresh_summary",
    "cut_resolved_batches",
    "envelope_expiry",
    "envelope_table",
    "lifetime_seconds",
    "resolve_session",
]

ACTIVE = "active"
EXPIRED = "expired"
REFRESH_FAILED = "refresh_failed"
CONSENT_MISSING = "consent_missing"
STATES: tuple[str, ...] = (ACTIVE, EXPIRED, REFRESH_FAILED, CONSENT_MISSING)

LIFETIME_DAYS = 30
CALIFORNIA_LIFETIME_DAYS = 15
#: GPP section id of the US-California section (7 US-National, 9 Virginia, ...).
CALIFORNIA_GPP_SECTION = 8
DAY_SECONDS = 86_400

#: Name and version of the store's tables in ``capi_schema_version``.
SCHEMA_COMPONENT = "envelope_store"
SCHEMA_VERSION = 1

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
    # The refresh selection walks rows in (expires_at, user_key) order within a horizon.
    sa.Index("ix_capi_envelope_store_expires", "expires_at", "user_key"),
    sa.Index("ix_capi_envelope_store_attempt", "last_refresh_attempt_at"),
)

# PostgreSQL: deadlock / serialization failure; rows are written in user_key order, a retry
# covers the rare abort left.
_RETRYABLE_PGCODES = frozenset({"40P01", "40001"})


def _now() -> int:
    return int(time.time())


# -- consent and lifetime -------------------------------------------------------------------


def gpp_sections(gpp_sid: str | Sequence[int] | None) -> frozenset[int]:
    """Return the section ids of a ``gpp_sid`` value (``"7,8"``, ``"7_8"`` or ``[7, 8]``).

    :param gpp_sid: the value as found in a record, or None.
    """
    if gpp_sid is None:
        return frozenset()
    if isinstance(gpp_sid, str):
        parts = gpp_sid.replace("_", ",").split(",")
    else:
        parts = [str(part) for part in gpp_sid]
    return frozenset(int(part) for part in parts if part.strip().isdigit())


@dataclass(frozen=True, slots=True)
class Consent:
    """The consent captured with an envelope: TCF/USP (``ct`` + ``cv``) or GPP (``gpp`` + ``gpp_sid``).

    :param ct: consent type (1 TCF v1.1, 3 US Privacy, 4 TCF v2), with ``cv``.
    :param cv: the consent string (secret for logs).
    :param gpp: the GPP string (secret for logs), with ``gpp_sid``.
    :param gpp_sid: GPP section ids, normalised to ``"7,8"``.
    """

    ct: int | None = None
    cv: str | None = field(default=None, repr=False)
    gpp: str | None = field(default=None, repr=False)
    gpp_sid: str | None = None

    @classmethod
    def from_record(cls, value: Any) -> Consent | None:
        """Read a record's pipeline-only ``consent`` field; ``None`` when absent or incomplete.

        :param value: ``{"ct": 4, "cv": "..."}`` or ``{"gpp": "...", "gpp_sid": "7,8" | [7, 8]}``.
        """
        if not isinstance(value, Mapping):
            return None
        gpp, sid = value.get("gpp"), value.get("gpp_sid")
        if isinstance(gpp, str) and gpp and sid not in (None, "", []):
            sections = sorted(gpp_sections(sid))
            if sections:
                return cls(gpp=gpp, gpp_sid=",".join(str(s) for s in sections))
        ct, cv = value.get("ct"), value.get("cv")
        if isinstance(ct, int) and not isinstance(ct, bool) and isinstance(cv, str) and cv:
            return cls(ct=ct, cv=cv)
        return None

    @property
    def is_california(self) -> bool:
        """Whether the GPP sections name US-California (section 8): the 15-day lifetime applies."""
        return CALIFORNIA_GPP_SECTION in gpp_sections(self.gpp_sid)

    def query(self) -> dict[str, str]:
        """The refresh API's consent parameters: ``gpp`` + ``gpp_sid`` when present, else ``ct`` + ``cv``."""
        if self.gpp and self.gpp_sid:
            return {"gpp": self.gpp, "gpp_sid": self.gpp_sid}
        if self.ct is not None and self.cv:
            return {"ct": str(self.ct), "cv": self.cv}
        return {}


def lifetime_seconds(consent: Consent | None) -> int:
    """How long an envelope lives: 15 days for California (GPP section 8), otherwise 30 days.

    :param consent: the consent captured with the envelope, if any.
    """
    days = CALIFORNIA_LIFETIME_DAYS if consent is not None and consent.is_california else LIFETIME_DAYS
    return days * DAY_SECONDS


def envelope_expiry(issued_at: int, consent: Consent | None) -> int:
    """Unix time at which an envelope issued at ``issued_at`` expires.

    :param issued_at: Unix seconds of issue or last refresh.
    :param consent: the consent captured with it (decides the California lifetime).
    """
    return int(issued_at) + lifetime_seconds(consent)


# -- records and rows -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EnvelopeRecord:
    """What one conversion record tells the store about its user's envelope.

    :param user_key: the advertiser's stable user key.
    :param envelope: the ATS envelope (``user_data.partner_id``; secret for logs).
    :param issued_at: ``envelope_issued_at``, or the event time when the record has none.
    :param consent: the consent captured with the envelope, if any.
    :param client_ip: the end user's IP, if any (secret for logs).
    """

    user_key: str
    envelope: str = field(repr=False)
    issued_at: int
    consent: Consent | None = None
    client_ip: str | None = field(default=None, repr=False)

    @property
    def expires_at(self) -> int:
        """Expiry under the lifetime rule."""
        return envelope_expiry(self.issued_at, self.consent)

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
        cls, event: Mapping[str, Any], pipeline: Mapping[str, Any], event_time: int, now: int
    ) -> EnvelopeRecord | None:
        """Build the record of an accepted event, or ``None`` without both a user key and an envelope.

        :param event: the validated event (``user_data.partner_id`` is the envelope).
        :param pipeline: its pipeline-only fields (``user_key``, ``envelope_issued_at``, ``consent``, ``client_ip``).
        :param event_time: the event's Unix time.
        :param now: the current Unix time.
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

    @classmethod
    def from_row(cls, row: Any) -> StoredEnvelope:
        consent = None
        if row.consent_gpp and row.consent_gpp_sid:
            consent = Consent(gpp=row.consent_gpp, gpp_sid=row.consent_gpp_sid)
        elif row.consent_ct is not None and row.consent_cv:
            consent = Consent(ct=int(row.consent_ct), cv=row.consent_cv)
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


def _record_row(record: EnvelopeRecord, now: int) -> dict[str, Any]:
    consent = record.consent
    return {
        "user_key": record.user_key,
        "user_key_hash": key_hash(record.user_key),
        "envelope": record.envelope,
        "issued_at": record.issued_at,
        "expires_at": record.expires_at,
        "consent_ct": consent.ct if consent else None,
        "consent_cv": consent.cv if consent else None,
        "consent_gpp": consent.gpp if consent else None,
        "consent_gpp_sid": consent.gpp_sid if consent else None,
        "client_ip": record.client_ip,
        # An envelope that arrives already expired is stored as such (it may still be replaced).
        "state": EXPIRED if record.expires_at <= now else (ACTIVE if consent else CONSENT_MISSING),
        "reason": None,
        "refresh_failures": 0,
        "updated_at": now,
        "last_refresh_attempt_at": None,
    }


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


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


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
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._insert = upsert_insert(engine)

    def ensure_schema(self) -> None:
        """Create the store's table if missing and check its schema version (idempotent, concurrent-safe)."""
        ensure_component_schema(self.engine, [envelope_table], SCHEMA_COMPONENT, SCHEMA_VERSION)

    def _execute(self, statement: Any, rows: list[dict[str, Any]] | None = None) -> int:
        for attempt in range(3):
            try:
                with self.engine.begin() as connection:
                    result = connection.execute(statement, rows) if rows is not None else connection.execute(statement)
                    return int(result.rowcount or 0)
            except DBAPIError as exc:
                code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
                if attempt == 2 or code not in _RETRYABLE_PGCODES:
                    raise
                time.sleep(0.05 * (attempt + 1))
        return 0  # pragma: no cover - the loop returns or raises

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
        for chunk in _chunks(newest, WRITE_CHUNK):
            self._execute(statement, [_record_row(record, now) for record in chunk])
        return len(newest)

    def mark_expired(self, *, now: int | None = None) -> int:
        """Set ``state='expired'`` on rows whose envelope has expired; return how many changed.

        :param now: the current Unix time.
        """
        now = _now() if now is None else int(now)
        table = envelope_table
        return self._execute(
            sa.update(table)
            .where(table.c.expires_at <= now, table.c.state != EXPIRED)
            .values(state=EXPIRED, updated_at=now)
        )

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
                "exp": envelope_expiry(now, result.row.consent),
            }
            for result in sorted(results, key=lambda r: r.row.user_key)
            if result.new_envelope
        ]
        return sum(self._execute(statement, list(chunk)) for chunk in _chunks(rows, WRITE_CHUNK)) if rows else 0

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
        return sum(self._execute(statement, list(chunk)) for chunk in _chunks(rows, WRITE_CHUNK)) if rows else 0

    def forget(self, user_keys: Iterable[str]) -> int:
        """Delete the identities of these user keys (data subject erasure); return rows deleted.

        :param user_keys: the advertiser's user keys.
        """
        keys = sorted(set(user_keys))
        table = envelope_table
        deleted = 0
        for chunk in _chunks(keys, WRITE_CHUNK):
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

    def resolve(self, user_keys: Iterable[str], *, now: int | None = None) -> dict[str, StoredEnvelope]:
        """Return the unexpired row of each user key that has one (keys without one are absent).

        :param user_keys: the keys to look up (e.g. one send shard's; looked up in chunks).
        :param now: the current Unix time.
        """
        now = _now() if now is None else int(now)
        keys = sorted(set(user_keys))
        table = envelope_table
        found: dict[str, StoredEnvelope] = {}
        with self.engine.connect() as connection:
            for chunk in _chunks(keys, WRITE_CHUNK):
                query = sa.select(envelope_table).where(
                    table.c.user_key.in_(list(chunk)), table.c.expires_at > now
                )
                for row in connection.execute(query):
                    found[row.user_key] = StoredEnvelope.from_row(row)
        return found

    @staticmethod
    def _due_filter(now: int, horizon_seconds: int, slice_index: int, slices: int) -> sa.ColumnElement[bool]:
        if slices < 1 or not 0 <= slice_index < slices:
            raise ValueError("slice_index must be in 0..slices-1")
        if horizon_seconds < 0:
            raise ValueError("horizon_seconds must be >= 0")
        table = envelope_table
        clauses = [
            table.c.expires_at > now,
            table.c.expires_at <= now + horizon_seconds,
            table.c.state != EXPIRED,
        ]
        if slices > 1:
            clauses.append((table.c.user_key_hash % slices) == slice_index)
        return sa.and_(*clauses)

    def count_due(self, *, now: int, horizon_seconds: int) -> dict[str, int]:
        """Count rows expiring within the horizon (and not expired), by whether they hold consent.

        :param now: the selection time.
        :param horizon_seconds: how far ahead to look.
        :return: ``{"due": n, "consent_missing": m}`` (``m`` is part of ``n``).
        """
        table = envelope_table
        where = self._due_filter(now, horizon_seconds, 0, 1)
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
        horizon_seconds: int,
        slice_index: int = 0,
        slices: int = 1,
        page_size: int = 1000,
    ) -> Iterator[list[StoredEnvelope]]:
        """Yield pages of rows expiring within the horizon, soonest first, for one slice.

        Keyset paging on ``(expires_at, user_key)``: memory is one page whatever the store
        size, and rows refreshed while paging (their expiry moves past the horizon) or failed
        (their key is behind the cursor) are not seen twice. Each page is its own short read.

        :param now: the selection time (keep it fixed for a whole run).
        :param horizon_seconds: how far ahead to look.
        :param slice_index: which slice, ``0..slices-1`` (``user_key_hash % slices``).
        :param slices: how many workers share the store.
        :param page_size: rows per page.
        """
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        table = envelope_table
        where = self._due_filter(now, horizon_seconds, slice_index, slices)
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


def cut_resolved_batches(resolved: ResolvedSession, *, partition: str, max_events: int) -> list[Any]:
    """Cut a resolved session into batches: ids from the spilled events, bodies with the chosen envelopes.

    :param resolved: from :func:`resolve_session`.
    :param partition: the partition name.
    :param max_events: events per batch.
    :return: :class:`~liveramp_capi.domain.batches.Batch` objects.
    """
    import dataclasses

    from liveramp_capi.domain.batches import cut_batches

    if resolved.original is None or resolved.resolved is None:
        return []
    batches = cut_batches(resolved.original, partition=partition, max_events=max_events)
    if resolved.resolved is resolved.original:
        return batches
    bodies = cut_batches(resolved.resolved, partition=partition, max_events=max_events)
    return [dataclasses.replace(batch, body=other.body) for batch, other in zip(batches, bodies, strict=True)]


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
        "horizon_days": plan.get("horizon_days"),
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
        "newly_expired": int(plan.get("newly_expired", 0)),
        "requests": sum(int(result.get("requests", 0)) for result in results),
        "retries": sum(int(result.get("retries", 0)) for result in results),
        "slices": {"planned": int(plan["slices"]), "reported": len(reported), "missing": missing},
    }
