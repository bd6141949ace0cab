"""Envelope lifetimes: every consent shape at ages around both lifetimes, the override, an upgrade
in place, and refresh selection by the share of each envelope's own lifetime left."""

from __future__ import annotations

import time

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from liveramp_capi.domain.consent import (
    CALIFORNIA_LIFETIME_DAYS,
    DAY_SECONDS,
    LIFETIME_DAYS,
    Consent,
    LifetimeRule,
    lifetime_seconds,
)
from liveramp_capi.domain.envelopes import (
    ACTIVE,
    CONSENT_MISSING,
    EXPIRED,
    REFRESH_FAILED,
    EnvelopeRecord,
    RefreshResult,
    resolve_session,
)
from liveramp_capi.domain.sessions import Session, ShardEntry, key_hash
from liveramp_capi.state.envelope_rows import envelope_table
from liveramp_capi.state.envelope_store import EnvelopeStore
from liveramp_capi.state.migrations import schema_version_table

NOW = 1_790_000_000
CV = "CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA"
GPP = "DBABMA~CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA"
SHORT, LONG = CALIFORNIA_LIFETIME_DAYS * DAY_SECONDS, LIFETIME_DAYS * DAY_SECONDS
CONSERVATIVE, NO_CA = LifetimeRule.CONSERVATIVE, LifetimeRule.NO_CALIFORNIA_TRAFFIC

#: (name, consent as captured in a record, lifetime conservative, lifetime with no Californian traffic)
SHAPES = [
    ("tcf-v2 ct=4", {"ct": 4, "cv": CV}, LONG, LONG),
    ("usp ct=3", {"ct": 3, "cv": "1YNN"}, SHORT, LONG),
    ("legacy tcf ct=1", {"ct": 1, "cv": CV}, SHORT, LONG),
    ("gpp california 7,8", {"gpp": GPP, "gpp_sid": "7,8"}, SHORT, SHORT),
    ("gpp california alone", {"gpp": GPP, "gpp_sid": [8]}, SHORT, SHORT),
    ("gpp us-national 7 (no section 8)", {"gpp": GPP, "gpp_sid": "7"}, SHORT, LONG),
    ("gpp usp section 6", {"gpp": GPP, "gpp_sid": "6"}, SHORT, LONG),
    ("gpp virginia+colorado 9_10 (no section 8)", {"gpp": GPP, "gpp_sid": "9_10"}, LONG, LONG),
    ("gpp eu tcf 2 (no section 8)", {"gpp": GPP, "gpp_sid": [2]}, LONG, LONG),
    ("gpp eu + us-national 2,7", {"gpp": GPP, "gpp_sid": "2,7"}, SHORT, LONG),
    ("gpp unknown section 99", {"gpp": GPP, "gpp_sid": "99"}, SHORT, LONG),
    ("none", None, SHORT, LONG),
    ("incomplete (ct without cv)", {"ct": 4}, SHORT, LONG),
]
AGES = [
    ("just inside 15 days", SHORT - 60),
    ("just past 15 days", SHORT + 60),
    ("just inside 30 days", LONG - 60),
    ("just past 30 days", LONG + 60),
]


@pytest.mark.parametrize(("name", "captured", "conservative", "no_california"), SHAPES, ids=[s[0] for s in SHAPES])
def test_lifetime_of_every_consent_shape_under_both_rules(name, captured, conservative, no_california) -> None:
    consent = Consent.from_record(captured)
    assert lifetime_seconds(consent) == conservative
    assert lifetime_seconds(consent, CONSERVATIVE) == conservative
    assert lifetime_seconds(consent, NO_CA) == no_california


def test_lifetime_rule_names_parse_and_a_bad_one_is_refused_without_echo() -> None:
    assert LifetimeRule.parse(None) is CONSERVATIVE and LifetimeRule.parse("  ") is CONSERVATIVE
    assert LifetimeRule.parse(" No_California_Traffic ") is NO_CA
    with pytest.raises(ValueError, match="conservative, no_california_traffic") as caught:
        LifetimeRule.parse("thirty-days-please")
    assert "thirty" not in str(caught.value)


def _entry(user_key: str | None, envelope: str, issued: int, expires: int) -> ShardEntry:
    event = {"event_id": f"e-{user_key}", "event_type": "Purchase", "event_time": NOW - 60,
             "user_data": {"partner_id": envelope}}
    return ShardEntry("s", key_hash("s"), NOW - 60, event["event_id"], 0, user_key, orjson.dumps(event), issued, expires)


@pytest.mark.parametrize("rule", [CONSERVATIVE, NO_CA])
def test_store_and_send_time_resolution_at_ages_around_both_lifetimes(state_engine: Engine, rule) -> None:
    store = EnvelopeStore(state_engine, rule)
    store.ensure_schema()
    records = []
    expected_live: dict[str, bool] = {}
    for s_index, (_, captured, conservative, no_california) in enumerate(SHAPES):
        life = conservative if rule is CONSERVATIVE else no_california
        for a_index, (_, age) in enumerate(AGES):
            key = f"u{s_index:02d}-{a_index}"
            records.append(EnvelopeRecord(key, f"E-{key}", NOW - age, Consent.from_record(captured),
                                          lifetime_rule=rule))
            expected_live[key] = age < life
    store.upsert(records, now=NOW)
    live = store.resolve(expected_live, now=NOW)
    assert {key for key, alive in expected_live.items() if alive} == set(live)
    # Rows that arrive expired are stored as expired: nothing selects them for a refresh.
    states = {key: store.get(key).state for key in expected_live}
    assert all((states[key] == EXPIRED) == (not alive) for key, alive in expected_live.items())

    # At send time an event whose own envelope is past its lifetime, and whose key has no live
    # row, is held back; one inside its lifetime goes out.
    entries = [_entry(None, f"E-{r.user_key}", r.issued_at, r.expires_at) for r in records]
    resolved = resolve_session(Session("s", key_hash("s"), entries), live, NOW)
    sent = {orjson_partner(e) for e in (resolved.resolved.entries if resolved.resolved else [])}
    held = {orjson_partner(e) for e in resolved.expired}
    assert sent == {f"E-{key}" for key, alive in expected_live.items() if alive}
    assert held == {f"E-{key}" for key, alive in expected_live.items() if not alive}


def orjson_partner(entry: ShardEntry) -> str:
    return orjson.loads(entry.event_json)["user_data"]["partner_id"]


def _create_version_1_store(engine: Engine, now: int) -> None:
    """The store as version 1 left it: same table, no lifetime rule recorded, 30-day USP expiries."""
    with engine.begin() as connection:
        schema_version_table.create(connection, checkfirst=True)
        envelope_table.create(connection)
        connection.execute(sa.insert(schema_version_table).values(
            component="envelope_store", version=1, updated_at=sa.func.now()))
        rows = [
            # A US Privacy user seen 20 days ago: version 1 gave it 30 days (still "active").
            ("usp-20d", now - 20 * DAY_SECONDS, 3, "1YNN", None, None, ACTIVE),
            # The same 5 days ago: 15 days apply now, 10 are left.
            ("usp-5d", now - 5 * DAY_SECONDS, 3, "1YNN", None, None, ACTIVE),
            # No consent, 16 days ago.
            ("none-16d", now - 16 * DAY_SECONDS, None, None, None, None, CONSENT_MISSING),
            # TCF v2, 20 days ago: 30 days stay.
            ("tcf-20d", now - 20 * DAY_SECONDS, 4, CV, None, None, ACTIVE),
            # GPP Virginia, refresh failed once, 20 days ago: 30 days stay, state kept.
            ("gpp-va-20d", now - 20 * DAY_SECONDS, None, None, GPP, "9", REFRESH_FAILED),
        ]
        connection.execute(sa.insert(envelope_table), [
            {"user_key": key, "user_key_hash": key_hash(key), "envelope": f"E-{key}", "issued_at": issued,
             "expires_at": issued + LONG, "consent_ct": ct, "consent_cv": cv, "consent_gpp": gpp,
             "consent_gpp_sid": sid, "client_ip": None, "state": state, "reason": None, "refresh_failures": 0,
             "updated_at": now - DAY_SECONDS, "last_refresh_attempt_at": None}
            for key, issued, ct, cv, gpp, sid, state in rows
        ])


def test_a_store_upgraded_in_place_does_not_keep_the_old_expiry(state_engine: Engine) -> None:
    # The migration runs at the real time, so the rows are dated from it.
    now = int(time.time())
    _create_version_1_store(state_engine, now)
    assert not sa.inspect(state_engine).has_table("capi_envelope_lifetime_rule")

    store = EnvelopeStore(state_engine)
    # ensure_schema is what every task runs first: the migration happens there, before any read.
    store.ensure_schema()
    rows = {key: store.get(key) for key in ("usp-20d", "usp-5d", "none-16d", "tcf-20d", "gpp-va-20d")}
    assert rows["usp-20d"].expires_at == now - 5 * DAY_SECONDS and rows["usp-20d"].state == EXPIRED
    assert rows["usp-5d"].expires_at == now + 10 * DAY_SECONDS and rows["usp-5d"].state == ACTIVE
    assert rows["none-16d"].state == EXPIRED
    assert rows["tcf-20d"].expires_at == now + 10 * DAY_SECONDS and rows["tcf-20d"].state == ACTIVE
    assert rows["gpp-va-20d"].state == REFRESH_FAILED and rows["gpp-va-20d"].expires_at == now + 10 * DAY_SECONDS
    assert store.applied_lifetime_rule() == "conservative"
    with state_engine.connect() as connection:
        version = connection.execute(sa.select(schema_version_table.c.version).where(
            schema_version_table.c.component == "envelope_store")).scalar_one()
    assert version == 2
    # Sending now uses none of the envelopes that died under the conservative rule.
    assert set(store.resolve(rows, now=now + 60)) == {"usp-5d", "tcf-20d", "gpp-va-20d"}

    # An advertiser declares no Californian traffic: the US Privacy row lives again (30 days) ...
    relaxed = EnvelopeStore(state_engine, NO_CA)
    relaxed.ensure_schema()
    assert relaxed.get("usp-20d").state == ACTIVE and relaxed.get("usp-20d").expires_at == now + 10 * DAY_SECONDS
    assert relaxed.get("none-16d").state == CONSENT_MISSING
    # ... and back to the default rule, the short lifetime applies again; a second open changes nothing.
    again = EnvelopeStore(state_engine)
    again.ensure_schema()
    assert again.get("usp-20d").state == EXPIRED
    assert again.apply_lifetime_rule(now=now) == 0


def test_refresh_selects_by_the_share_of_each_envelopes_own_lifetime(state_engine: Engine) -> None:
    store = EnvelopeStore(state_engine)
    store.ensure_schema()
    usp, tcf = Consent(ct=3, cv="1YNN"), Consent(ct=4, cv=CV)
    store.upsert([
        EnvelopeRecord("short-6d-left", "A", NOW - 9 * DAY_SECONDS, usp),  # 15-day life, 6 days left
        EnvelopeRecord("short-4d-left", "B", NOW - 11 * DAY_SECONDS, usp),  # 4 days left: due
        EnvelopeRecord("long-11d-left", "C", NOW - 19 * DAY_SECONDS, tcf),  # 30-day life, 11 days left
        EnvelopeRecord("long-9d-left", "D", NOW - 21 * DAY_SECONDS, tcf),  # 9 days left: due
        EnvelopeRecord("gone", "E", NOW - 16 * DAY_SECONDS, usp),
    ], now=NOW)
    due = {row.user_key for page in store.iter_due(now=NOW) for row in page}
    assert due == {"short-4d-left", "long-9d-left"}
    assert store.count_due(now=NOW) == {"due": 2, "consent_missing": 0}
    # A larger share selects earlier, relative to each lifetime again.
    wider = {row.user_key for page in store.iter_due(now=NOW, remaining_share=0.5) for row in page}
    assert wider == {"short-6d-left", "short-4d-left", "long-11d-left", "long-9d-left"}
    with pytest.raises(ValueError, match="remaining_share"):
        store.count_due(now=NOW, remaining_share=1.5)

    # A refreshed envelope gets the lifetime its consent gives, from the refresh time.
    [row] = [r for page in store.iter_due(now=NOW) for r in page if r.user_key == "short-4d-left"]
    store.record_refreshed([RefreshResult(row, new_envelope="B2")], now=NOW)
    assert store.get("short-4d-left").expires_at == NOW + SHORT


def test_expired_rows_are_counted_by_the_state_they_were_found_in(state_engine: Engine) -> None:
    store = EnvelopeStore(state_engine)
    store.ensure_schema()
    usp = Consent(ct=3, cv="1YNN")
    store.upsert([
        EnvelopeRecord("never-refreshed", "A", NOW - 10 * DAY_SECONDS, usp),
        EnvelopeRecord("failed", "B", NOW - 11 * DAY_SECONDS, usp),
        EnvelopeRecord("no-consent", "C", NOW - 10 * DAY_SECONDS, None),
        EnvelopeRecord("alive", "D", NOW - 1 * DAY_SECONDS, usp),
    ], now=NOW)
    [failed] = [r for page in store.iter_due(now=NOW) for r in page if r.user_key == "failed"]
    store.record_failed([RefreshResult(failed, reason="HTTP 400")], now=NOW)
    later = NOW + 6 * DAY_SECONDS
    assert store.mark_expired_by_state(now=later) == {ACTIVE: 1, CONSENT_MISSING: 1, REFRESH_FAILED: 1}
    assert store.mark_expired_by_state(now=later) == {}
    assert store.counts_by_state() == {ACTIVE: 1, EXPIRED: 3}


def test_refresh_summary_reports_what_was_found_expired() -> None:
    from liveramp_capi.domain.refresh_summary import build_refresh_summary

    plan = {"run_date": "2026-11-20", "as_of": NOW, "remaining_share": 1 / 3, "slices": 1, "due": 3,
            "newly_expired": 5, "newly_expired_by_state": {ACTIVE: 2, CONSENT_MISSING: 3}}
    summary = build_refresh_summary(plan, [{"slice": 0, "selected": 3, "skipped_consent": 0}],
                                    {"refreshed": 3, "failed": 0}, max_failure_ratio=0.1)
    assert summary["expired_when_found"] == 5
    assert summary["expired_when_found_by_state"] == {ACTIVE: 2, CONSENT_MISSING: 3}
    assert summary["remaining_share"] == pytest.approx(1 / 3) and summary["status"] == "complete"
