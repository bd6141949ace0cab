"""The envelope store's tables, the row of a record, and the re-evaluation of stored expiries.

The store applies one lifetime rule to every row: when the configured rule differs from the
one its rows were computed with (or the store predates the rule, schema version 1), every expiry
is recomputed (:func:`apply_lifetime_rule`) before anything reads one.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from liveramp_capi.domain.consent import Consent, LifetimeRule, envelope_expiry
from liveramp_capi.domain.envelopes import EXPIRED, MAX_USER_KEY_CHARS, STATES, EnvelopeRecord, live_state
from liveramp_capi.domain.sessions import key_hash
from liveramp_capi.state.database import execute_write, upsert_insert
from liveramp_capi.state.migrations import metadata

MAX_REASON_CHARS = 200

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

#: What a newer record replaces in its user key's row: everything but the key.
REPLACED_ON_UPSERT = tuple(column.name for column in envelope_table.columns if column.name not in ("user_key", "user_key_hash"))

#: Which lifetime rule the store's expiries were computed with (one row).
lifetime_rule_table = sa.Table(
    "capi_envelope_lifetime_rule",
    metadata,
    sa.Column("id", sa.SmallInteger, primary_key=True),
    sa.Column("rule", sa.String(64), nullable=False),
    sa.Column("applied_at", sa.BigInteger, nullable=False),
    sa.Column("rows_changed", sa.BigInteger, nullable=False),
)


def record_row(record: EnvelopeRecord, now: int, rule: LifetimeRule) -> dict[str, Any]:
    """The store row of a record, its expiry under ``rule``, as of ``now``."""
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
        "state": live_state(expires_at, consent, now),
        "reason": None,
        "refresh_failures": 0,
        "updated_at": now,
        "last_refresh_attempt_at": None,
    }


def applied_lifetime_rule(engine: Engine) -> str | None:
    """The rule the stored expiries were computed with; None for a store never re-evaluated."""
    with engine.connect() as connection:
        rule: str | None = connection.execute(
            sa.select(lifetime_rule_table.c.rule).where(lifetime_rule_table.c.id == 1)
        ).scalar_one_or_none()
    return rule


def apply_lifetime_rule(engine: Engine, rule: LifetimeRule, *, now: int, page_size: int = 2000) -> int:
    """Recompute every row's expiry (and expired state) under ``rule`` if needed.

    Nothing happens when the store records this rule already. Otherwise the rows are walked
    in ``user_key`` pages; a row whose expiry changes gets the new one, and its state follows
    (``expired`` when the new expiry has passed, live again when a longer rule revives it).

    :param engine: the state database engine.
    :param rule: the configured lifetime rule.
    :param now: the current Unix time.
    :param page_size: rows read per page.
    :return: rows changed.
    """
    if applied_lifetime_rule(engine) == rule.value:
        return 0
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
        with engine.connect() as connection:
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
                state = live_state(expires_at, consent, now)
            updates.append({"k": row.user_key, "issued": row.issued_at, "exp": expires_at, "st": state})
        if updates:
            changed += execute_write(engine, update, updates)
    statement = upsert_insert(engine)(lifetime_rule_table)
    values = {"id": 1, "rule": rule.value, "applied_at": now, "rows_changed": changed}
    statement = statement.values(**values).on_conflict_do_update(
        index_elements=[lifetime_rule_table.c.id],
        set_={name: getattr(statement.excluded, name) for name in ("rule", "applied_at", "rows_changed")},
    )
    execute_write(engine, statement)
    return changed
