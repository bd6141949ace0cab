"""The envelope store on SQLite and PostgreSQL: upsert rules, refresh selection, outcomes, resolution."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from liveramp_capi.domain.consent import DAY_SECONDS, Consent, envelope_expiry
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
from liveramp_capi.state.envelope_store import EnvelopeStore

NOW = 1_790_000_000
TCF = Consent(ct=4, cv="CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA")
CALIFORNIA = Consent(gpp="DBABMA~CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA", gpp_sid="7,8")


@pytest.fixture
def store(state_engine: Engine) -> Iterator[EnvelopeStore]:
    result = EnvelopeStore(state_engine)
    result.ensure_schema()
    result.ensure_schema()  # idempotent
    yield result


def rec(key: str, envelope: str, issued_at: int, consent: Consent | None = TCF, ip: str | None = None) -> EnvelopeRecord:
    return EnvelopeRecord(key, envelope, issued_at, consent, ip)


def test_consent_records_parse_and_never_show_secrets() -> None:
    assert envelope_expiry(NOW, TCF) == NOW + 30 * DAY_SECONDS
    assert envelope_expiry(NOW, CALIFORNIA) == NOW + 15 * DAY_SECONDS
    assert Consent.from_record({"gpp": "x", "gpp_sid": [8]}).is_california
    assert Consent.from_record({"gpp": "x", "gpp_sid": "7_9"}).gpp_sid == "7,9"
    assert Consent.from_record({"ct": 4}) is None and Consent.from_record(None) is None
    assert "CPXx" not in repr(TCF) and "CPXx" not in repr(rec("u", "ENV-SECRET", NOW))
    assert "ENV-SECRET" not in repr(rec("u", "ENV-SECRET", NOW))


def test_record_from_accepted_event_uses_issued_at_or_event_time_and_clamps_the_future() -> None:
    event = {"user_data": {"partner_id": "Env1"}}
    made = EnvelopeRecord.from_accepted(event, {"user_key": "u1", "envelope_issued_at": NOW - 50}, NOW - 10, NOW)
    assert made is not None and made.issued_at == NOW - 50
    assert EnvelopeRecord.from_accepted(event, {"user_key": "u1"}, NOW - 10, NOW).issued_at == NOW - 10
    assert EnvelopeRecord.from_accepted(event, {"user_key": "u1", "envelope_issued_at": NOW + 999}, NOW, NOW).issued_at == NOW
    assert EnvelopeRecord.from_accepted(event, {}, NOW, NOW) is None
    assert EnvelopeRecord.from_accepted({"user_data": {}}, {"user_key": "u1"}, NOW, NOW) is None


def test_newer_issued_at_wins_and_a_replay_changes_nothing(store: EnvelopeStore) -> None:
    assert store.upsert([rec("u1", "E-old", NOW - 100), rec("u1", "E-new", NOW - 50), rec("u2", "E2", NOW - 10, None)], now=NOW) == 2
    row = store.get("u1")
    assert row.envelope == "E-new" and row.issued_at == NOW - 50 and row.state == ACTIVE
    assert row.expires_at == NOW - 50 + 30 * DAY_SECONDS and row.consent == TCF
    assert store.get("u2").state == CONSENT_MISSING

    # An older record never replaces a newer envelope; a newer one replaces consent and IP too.
    store.upsert([rec("u1", "E-older", NOW - 500, CALIFORNIA, "203.0.113.7")], now=NOW)
    assert store.get("u1").envelope == "E-new"
    store.upsert([rec("u1", "E-newest", NOW - 1, CALIFORNIA, "203.0.113.7")], now=NOW)
    row = store.get("u1")
    assert (row.envelope, row.consent, row.client_ip) == ("E-newest", CALIFORNIA, "203.0.113.7")
    assert row.expires_at == NOW - 1 + 15 * DAY_SECONDS

    with store.engine.connect() as connection:
        before = connection.execute(sa.text("SELECT * FROM capi_envelope_store ORDER BY user_key")).all()
    store.upsert([rec("u1", "E-newest", NOW - 1, CALIFORNIA, "203.0.113.7"), rec("u2", "E2", NOW - 10, None)], now=NOW + 5)
    with store.engine.connect() as connection:
        after = connection.execute(sa.text("SELECT * FROM capi_envelope_store ORDER BY user_key")).all()
    assert before == after, "re-running a partition must leave the store as one run did"


def test_two_concurrent_upserters_converge_on_the_newest(store: EnvelopeStore) -> None:
    keys = [f"user-{i:04d}" for i in range(600)]
    first = [rec(k, f"A-{k}", NOW - 100 - (i % 2)) for i, k in enumerate(keys)]
    second = [rec(k, f"B-{k}", NOW - 100 - ((i + 1) % 2)) for i, k in enumerate(keys)]
    errors: list[BaseException] = []

    def write(records: list[EnvelopeRecord]) -> None:
        try:
            for start in range(0, len(records), 50):
                store.upsert(records[start : start + 50], now=NOW)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(r,)) for r in (first, list(reversed(second)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    with store.engine.connect() as connection:
        rows = dict(connection.execute(sa.text("SELECT user_key, envelope FROM capi_envelope_store")).all())
    assert len(rows) == len(keys)
    for i, key in enumerate(keys):
        assert rows[key] == (f"A-{key}" if i % 2 == 0 else f"B-{key}")


def test_due_rows_are_paged_by_slice_without_overlap_and_without_expired_or_later_rows(store: EnvelopeStore) -> None:
    life = 30 * DAY_SECONDS
    due = [rec(f"due-{i:03d}", f"E{i}", NOW - life + DAY_SECONDS + i * 60) for i in range(230)]
    later = [rec(f"later-{i}", "L", NOW - DAY_SECONDS) for i in range(5)]
    gone = [rec(f"gone-{i}", "G", NOW - life - 10) for i in range(5)]
    store.upsert(due + later + gone, now=NOW)
    assert store.mark_expired_by_state(now=NOW) == {}  # stored as expired on arrival already
    assert store.counts_by_state() == {ACTIVE: 235, EXPIRED: 5}
    assert store.count_due(now=NOW) == {"due": 230, "consent_missing": 0}

    seen: list[str] = []
    for index in range(3):
        pages = list(store.iter_due(now=NOW, slice_index=index, slices=3, page_size=17))
        assert all(len(page) <= 17 for page in pages)
        keys = [row.user_key for page in pages for row in page]
        assert all(key_hash(k) % 3 == index for k in keys)
        expiries = [row.expires_at for page in pages for row in page]
        assert expiries == sorted(expiries)
        seen += keys
    assert sorted(seen) == sorted(r.user_key for r in due)


def test_refresh_outcomes_update_or_keep_the_envelope(store: EnvelopeStore) -> None:
    store.upsert([rec("ok", "E-ok", NOW - 25 * DAY_SECONDS), rec("bad", "E-bad", NOW - 25 * DAY_SECONDS),
                  rec("moved", "E-moved", NOW - 25 * DAY_SECONDS)], now=NOW)
    rows = {row.user_key: row for page in store.iter_due(now=NOW) for row in page}
    # The pipeline writes a newer envelope for "moved" while its refresh is in flight.
    store.upsert([rec("moved", "E-moved-2", NOW - 5)], now=NOW)

    assert store.record_refreshed([RefreshResult(rows["ok"], new_envelope="R-ok"),
                                   RefreshResult(rows["moved"], new_envelope="R-moved")], now=NOW + 1) == 1
    assert store.record_failed([RefreshResult(rows["bad"], reason="err entry")], now=NOW + 1) == 1
    ok, bad, moved = store.get("ok"), store.get("bad"), store.get("moved")
    assert (ok.envelope, ok.issued_at, ok.expires_at, ok.state) == ("R-ok", NOW + 1, NOW + 1 + 30 * DAY_SECONDS, ACTIVE)
    assert (bad.envelope, bad.state, bad.reason, bad.refresh_failures) == ("E-bad", REFRESH_FAILED, "err entry", 1)
    assert bad.expires_at == rows["bad"].expires_at
    assert moved.envelope == "E-moved-2"
    assert store.attempts_since(NOW) == {"refreshed": 1, "failed": 1, "failed_by_reason": {"err entry": 1}}

    # A failed row can still be refreshed by a newer record or a later refresh.
    store.upsert([rec("bad", "E-bad-2", NOW)], now=NOW + 2)
    assert store.get("bad").state == ACTIVE and store.get("bad").reason is None


def test_resolve_returns_unexpired_rows_only_and_forget_deletes(store: EnvelopeStore) -> None:
    store.upsert([rec("live", "E-live", NOW - DAY_SECONDS), rec("dead", "E-dead", NOW - 31 * DAY_SECONDS)], now=NOW)
    found = store.resolve(["live", "dead", "unknown"], now=NOW)
    assert set(found) == {"live"} and found["live"].envelope == "E-live"
    assert store.forget(["live", "unknown"]) == 1
    assert store.get("live") is None and store.resolve(["live"], now=NOW) == {}


def test_live_envelopes_are_resolves_rows_reduced_to_what_the_send_step_uses(store: EnvelopeStore) -> None:
    store.upsert([rec("live", "E-live", NOW - DAY_SECONDS), rec("dead", "E-dead", NOW - 31 * DAY_SECONDS),
                  rec("other", "E-other", NOW - 2 * DAY_SECONDS)], now=NOW)
    keys = ["live", "dead", "other", "unknown"]
    full = store.resolve(keys, now=NOW)
    live = store.live_envelopes(keys, now=NOW)
    assert set(live) == set(full) == {"live", "other"}
    for key, row in full.items():
        assert (live[key].envelope, live[key].issued_at, live[key].expires_at) == (row.envelope, row.issued_at,
                                                                                  row.expires_at)
    assert "E-live" not in repr(live)  # an envelope is a secret for logs
    # Resolution at send time chooses the same with either.
    entries = [_entry(0, "E-own", "live", None, None), _entry(1, "E-own", "other", None, None)]
    session = Session("s:x", key_hash("s:x"), entries)
    assert resolve_session(session, live, NOW) == resolve_session(session, full, NOW)


def _entry(ordinal: int, envelope: str, user_key: str | None, issued: int | None, expires: int | None) -> ShardEntry:
    event = {"event_id": f"e{ordinal}", "event_type": "Purchase", "event_time": NOW - 3600 + ordinal,
             "user_data": {"partner_id": envelope}}
    return ShardEntry("s:x", key_hash("s:x"), event["event_time"], event["event_id"], ordinal, user_key,
                      orjson.dumps(event), issued, expires)


def test_send_time_resolution_prefers_the_freshest_unexpired_envelope(store: EnvelopeStore) -> None:
    store.upsert([rec("fresh", "E-store", NOW - DAY_SECONDS)], now=NOW)
    stored = store.resolve(["fresh", "stale"], now=NOW)
    old_issue = NOW - 31 * DAY_SECONDS
    entries = [
        _entry(0, "E-own-expired", "fresh", old_issue, old_issue + 30 * DAY_SECONDS),  # store's replaces it
        _entry(1, "E-own-expired", "stale", old_issue, old_issue + 30 * DAY_SECONDS),  # held back
        _entry(2, "E-own-live", "fresh", NOW - 10, NOW - 10 + 30 * DAY_SECONDS),  # own is fresher
        _entry(3, "E-no-key", None, None, None),  # untouched
    ]
    resolved = resolve_session(Session("s:x", key_hash("s:x"), entries), stored, NOW)
    assert [e.event_id for e in resolved.expired] == ["e1"] and resolved.replaced == 1
    # What the send step sends: the same choice, in a batch whose id is the one of the events as
    # spilled (a later refresh does not change it).
    from liveramp_capi.domain.batches import cut_batches
    from liveramp_capi.domain.held import HeldIndex
    from liveramp_capi.domain.send_plan import plan_session

    session = Session("s:x", key_hash("s:x"), entries)
    plan = plan_session(session, stored, NOW, partition="2026-11-20", max_events=50, acknowledged=set(),
                        held=HeldIndex({}))
    [batch] = plan.batches
    sent = orjson.loads(batch.body)["events"]
    assert [e["user_data"]["partner_id"] for e in sent] == ["E-store", "E-own-live", "E-no-key"]
    assert batch.batch_id == cut_batches(session, partition="2026-11-20", max_events=50)[0].batch_id
    assert [e.event_id for e in plan.hold] == ["e1"] and plan.replaced == 1


@pytest.mark.parametrize("rows", [20_000])
def test_upsert_throughput(store: EnvelopeStore, rows: int) -> None:
    records = [rec(f"user-{i:07d}", f"Env{i:07d}" * 8, NOW - (i % 1000), TCF, "203.0.113.9") for i in range(rows)]
    started = time.perf_counter()
    store.upsert(records, now=NOW)
    first = time.perf_counter() - started
    started = time.perf_counter()
    store.upsert(records, now=NOW)  # a rerun: every row conflicts, none changes
    second = time.perf_counter() - started
    print(f"\n[envelope store {store.engine.dialect.name}] upsert {rows} rows: {rows / first:,.0f} rows/s new, "
          f"{rows / second:,.0f} rows/s replayed")
    assert store.counts_by_state() == {ACTIVE: rows}


def test_a_newer_schema_version_is_refused(store: EnvelopeStore) -> None:
    from liveramp_capi.state.migrations import SchemaVersionError

    with store.engine.begin() as connection:
        connection.execute(sa.text("UPDATE capi_schema_version SET version = 99 WHERE component = 'envelope_store'"))
    with pytest.raises(SchemaVersionError, match="upgrade"):
        store.ensure_schema()


