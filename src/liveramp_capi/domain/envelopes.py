"""ATS identity envelopes: what a record tells about its user's envelope, a stored one, and which to send.

ATS envelopes expire (LiveRamp: 30 days, 15 days in California). Offline conversions (renewals,
refunds, CRM events) arrive weeks after the visit that produced their envelope, so the pipeline
keeps, per advertiser user key, the newest envelope it has seen (the envelope store,
:mod:`liveramp_capi.state.envelope_store`), and the send step replaces an event's envelope by a
fresher one from there, or holds the event back when every envelope it could use has expired.

``issued_at`` is the record's ``envelope_issued_at``; a record without one gets its
``event_time``: the envelope existed when the event happened, so it was issued then or earlier,
and an expiry computed from ``event_time`` is never too early (an envelope judged expired by it
really is). Lifetimes follow :mod:`liveramp_capi.domain.consent`.

Envelope values, consent strings and IPs are secrets for logs: no ``repr``, log line or
exception message built here contains them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from liveramp_capi.domain.consent import Consent, LifetimeRule, envelope_expiry
from liveramp_capi.domain.sessions import Session, ShardEntry

ACTIVE = "active"
EXPIRED = "expired"
REFRESH_FAILED = "refresh_failed"
CONSENT_MISSING = "consent_missing"
STATES: tuple[str, ...] = (ACTIVE, EXPIRED, REFRESH_FAILED, CONSENT_MISSING)

MAX_USER_KEY_CHARS = 256


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
        :param lifetime_rule: the configured lifetime rule (the envelope store's).
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
        """A store row (any object with the :data:`STORED_ENVELOPE_COLUMNS` as attributes)."""
        return cls.from_values(*(getattr(row, column) for column in STORED_ENVELOPE_COLUMNS))

    @classmethod
    def from_values(
        cls, user_key: str, envelope: str, issued_at: Any, expires_at: Any, consent_ct: Any, consent_cv: Any,
        consent_gpp: Any, consent_gpp_sid: Any, client_ip: str | None, state: str, reason: str | None,
        refresh_failures: Any,
    ) -> StoredEnvelope:
        """A store row as a tuple in :data:`STORED_ENVELOPE_COLUMNS` order (a send task reads ~20,000)."""
        consent = Consent.from_columns(consent_ct, consent_cv, consent_gpp, consent_gpp_sid)
        return cls(user_key, envelope, int(issued_at), int(expires_at), consent, client_ip, state, reason,
                   int(refresh_failures or 0))


@dataclass(frozen=True, slots=True)
class LiveEnvelope:
    """An unexpired envelope of the store, as the send step uses it: all it needs to choose an
    event's envelope. A send task reads ~20,000 before its first request; with full
    :class:`StoredEnvelope` rows (consent included) that look-up took about twice as long.

    :param envelope: the envelope (secret for logs).
    :param issued_at: Unix seconds of issue or last refresh.
    :param expires_at: Unix seconds of expiry.
    """

    envelope: str = field(repr=False)
    issued_at: int
    expires_at: int


class EnvelopeOnFile(Protocol):
    """What :func:`resolve_session` reads of a store row (:class:`StoredEnvelope` or :class:`LiveEnvelope`)."""

    @property
    def envelope(self) -> str: ...

    @property
    def issued_at(self) -> int: ...

    @property
    def expires_at(self) -> int: ...


#: The envelope store's columns a :class:`StoredEnvelope` is built from, in ``from_values`` order.
STORED_ENVELOPE_COLUMNS = (
    "user_key", "envelope", "issued_at", "expires_at", "consent_ct", "consent_cv", "consent_gpp",
    "consent_gpp_sid", "client_ip", "state", "reason", "refresh_failures",
)


def live_state(expires_at: int, consent: Consent | None, now: int) -> str:
    """A stored envelope's state from its expiry: expired, else refreshable only with consent."""
    return EXPIRED if expires_at <= now else (ACTIVE if consent else CONSENT_MISSING)


def newest_per_user_key(records: Iterable[EnvelopeRecord]) -> list[EnvelopeRecord]:
    """The winning record of each user key, in ``user_key`` order.

    One per key because PostgreSQL refuses to upsert a row twice in one statement; the winner
    rule is the store's (newer ``issued_at``, then the larger envelope); key order makes
    concurrent writers lock rows alike.
    """
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
    """The outcome of one refresh, to be recorded with the envelope store's ``record_refreshed`` or
    ``record_failed``.

    :param row: the row as selected (its envelope is the one that was refreshed).
    :param new_envelope: the refreshed type-19 envelope (success only; secret for logs).
    :param reason: short failure reason (failure only; no identifiers).
    """

    row: StoredEnvelope
    new_envelope: str | None = field(default=None, repr=False)
    reason: str | None = None


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


def resolve_session(session: Session, stored: Mapping[str, EnvelopeOnFile], now: int) -> ResolvedSession:
    """Choose each entry's envelope: the freshest unexpired one, the record's own or the store's.

    An entry without a user key keeps its own envelope unless that is known to be expired. An
    entry whose own envelope has expired and whose key has no unexpired row is held back. Only
    entries that take the store's envelope are re-serialised.

    :param session: one session of a shard.
    :param stored: unexpired rows of the shard's user keys
        (:meth:`~liveramp_capi.state.envelope_store.EnvelopeStore.live_envelopes`).
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
