"""Held conversions on SQLite and PostgreSQL: the send plan holds them, the recovery pass delivers them
exactly once (real HTTP to the stand-in, the real ledger), and the ones past the window are lost."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import orjson
import pytest
from sqlalchemy.engine import Engine

from liveramp_capi.delivery.sender import BatchSender
from liveramp_capi.delivery.settings import CapiSettings
from liveramp_capi.domain.consent import DAY_SECONDS, Consent
from liveramp_capi.domain.envelopes import EnvelopeRecord
from liveramp_capi.domain.held import (
    DELIVERING,
    HELD,
    LOST,
    REASON_NO_USER_KEY,
    REASON_WINDOW_PASSED,
    RECOVERED,
)
from liveramp_capi.domain.recovery import recover_held_conversions
from liveramp_capi.domain.send_plan import expired_line, plan_session
from liveramp_capi.domain.sessions import Session, ShardEntry, key_hash
from liveramp_capi.state.envelope_store import EnvelopeStore
from liveramp_capi.state.held_store import HeldConversions, held_table
from liveramp_capi.state.ledger import ACKNOWLEDGED, DeliveryLedger

PARTITION = "2026-11-20"
WINDOW = 28 * DAY_SECONDS
TCF = Consent(ct=4, cv="CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA")


@pytest.fixture
def state(state_engine: Engine) -> tuple[EnvelopeStore, HeldConversions, DeliveryLedger]:
    store = EnvelopeStore(state_engine)
    store.ensure_schema()
    held = HeldConversions(state_engine)
    held.ensure_schema()
    held.ensure_schema()
    ledger = DeliveryLedger(state_engine)
    ledger.ensure_schema()
    return store, held, ledger


def entry(event_id: str, user_key: str | None, envelope: str, event_time: int, expires: int,
          event_type: str = "Purchase", session: str = "s:1") -> ShardEntry:
    event = {"event_id": event_id, "event_type": event_type, "event_time": event_time,
             "user_data": {"partner_id": envelope}}
    return ShardEntry(session, key_hash(session), event_time, event_id, 0, user_key, orjson.dumps(event),
                      expires - 15 * DAY_SECONDS, expires)


def send_with(standin):
    sender = BatchSender(standin.url, standin.config_id,
                         CapiSettings(concurrency=4, max_attempts=2, backoff_base_seconds=0.01,
                                      backoff_max_seconds=0.02, timeout_seconds=3),
                         rng=random.Random(3))
    return sender.deliver_sync


def partners(standin) -> Counter[tuple[str, str]]:
    return Counter((e["event_id"], e["user_data"]["partner_id"])
                   for batch in standin.received() for e in batch["events"])


def test_send_plan_holds_expired_events_and_a_rerun_never_sends_them(state) -> None:
    store, held, _ = state
    now = int(time.time())
    live, dead = now + DAY_SECONDS, now - DAY_SECONDS
    entries = [
        entry("a", "u-a", "E-a", now - 3600, live),
        entry("e", "u-e", "E-e-old", now - 3600, dead),
        entry("n", None, "E-n-old", now - 3600, dead),
        # Same event_id, another event type: a different event (TikTok's key is name + id).
        entry("e", "u-e", "E-e-old", now - 3500, live, event_type="AddToCart"),
    ]
    session = Session("s:1", key_hash("s:1"), entries)
    first = plan_session(session, {}, now, partition=PARTITION, max_events=50, acknowledged=set(),
                         held=held.shard_index(PARTITION, 0, 1))
    [batch] = first.batches
    assert [e["event_id"] + e["event_type"] for e in orjson.loads(batch.body)["events"]] == ["aPurchase", "eAddToCart"]
    assert [(e.event_id, e.user_key) for e in first.hold] == [("e", "u-e"), ("n", None)]
    held.hold(PARTITION, first.hold, now=now)
    assert held.counts(PARTITION) | {"lost_by_reason": None} == {
        HELD: 1, DELIVERING: 0, RECOVERED: 0, LOST: 1, "lost_by_reason": None}
    assert held.counts()["lost_by_reason"] == {REASON_NO_USER_KEY: 1}

    # Rerun after the batch was acknowledged: nothing is sent, the held ones stay the held table's.
    rerun = plan_session(session, {}, now, partition=PARTITION, max_events=50, acknowledged={batch.batch_id},
                         held=held.shard_index(PARTITION, 0, 1))
    assert rerun.batches == [] and rerun.hold == [] and rerun.previously_delivered == 2
    assert sorted((e.event_id, fate[0]) for e, fate in rerun.held_earlier) == [("e", HELD), ("n", LOST)]
    # Rerun after a failed send, even once the user has a live envelope again: the same batch id,
    # the held event still left out (recovery owns it).
    store.upsert([EnvelopeRecord("u-e", "E-e-new", now - 60, TCF)], now=now)
    retry = plan_session(session, store.resolve(["u-a", "u-e"], now=now), now, partition=PARTITION,
                         max_events=50, acknowledged=set(), held=held.shard_index(PARTITION, 0, 1))
    [again] = retry.batches
    assert again.batch_id == batch.batch_id and again.event_ids == ("a", "e")
    line = orjson.loads(expired_line(PARTITION, 0, entries[2], LOST, REASON_NO_USER_KEY))
    assert line["held"] == LOST and line["lost_reason"] == REASON_NO_USER_KEY and line["record"]["event_id"] == "n"


def test_recovery_delivers_once_with_the_fresh_envelope_and_marks_old_ones_lost(state, standin) -> None:
    store, held, ledger = state
    now = int(time.time())
    dead = now - DAY_SECONDS
    held.hold(PARTITION, [
        entry("e1", "u-1", "E-1-old", now - 3 * DAY_SECONDS, dead),
        entry("e2", "u-1", "E-1-old", now - 2 * DAY_SECONDS, dead, event_type="AddToCart"),
        entry("e3", "u-2", "E-2-old", now - 3 * DAY_SECONDS, dead),
        entry("old", "u-1", "E-1-old", now - 29 * DAY_SECONDS, dead),
    ], now=now)
    send = send_with(standin)

    # No live envelope for anyone yet: nothing to send; the event past the window is lost.
    result = recover_held_conversions(held, ledger, send, now=now, window_seconds=WINDOW, run_id="r1")
    assert result["claimed"] == 0 and result["lost_window_passed"] == 1
    assert result["lost_by_reason"] == {REASON_WINDOW_PASSED: 1}
    assert standin.received() == []

    # u-1 comes back with a fresh envelope (a later partition upserted it).
    store.upsert([EnvelopeRecord("u-1", "E-1-fresh", now - 60, TCF)], now=now)
    result = recover_held_conversions(held, ledger, send, now=now, window_seconds=WINDOW, run_id="r2")
    assert (result["claimed"], result["recovered"]) == (2, 2)
    assert partners(standin) == Counter({("e1", "E-1-fresh"): 1, ("e2", "E-1-fresh"): 1})
    counts = held.counts(PARTITION)
    assert (counts[HELD], counts[RECOVERED], counts[LOST]) == (1, 2, 1)
    assert ledger.partition_counts(PARTITION)[ACKNOWLEDGED]["events"] == 2

    # Further passes send nothing again.
    again = recover_held_conversions(held, ledger, send, now=now + 60, window_seconds=WINDOW, run_id="r3")
    assert again["claimed"] == 0 and sum(partners(standin).values()) == 2


def test_a_pass_that_died_after_the_answer_does_not_send_again(state, standin) -> None:
    store, held, ledger = state
    now = int(time.time())
    held.hold(PARTITION, [entry("e1", "u-1", "E-1-old", now - DAY_SECONDS, now - 60)], now=now)
    store.upsert([EnvelopeRecord("u-1", "E-1-fresh", now - 30, TCF)], now=now)
    # A pass claims, sends, the ledger records the acknowledgement, and the worker dies.
    [claimed] = held.claim_recoverable(token="dead-run", now=now, window_seconds=WINDOW)
    ledger.mark_in_flight(PARTITION, [claimed.batch()], "dead")
    ledger.record_acknowledged(PARTITION, [(claimed.batch(), 1)], "dead")
    # Within the lease nobody takes it over; after it, the next pass finds it acknowledged.
    send = send_with(standin)
    early = recover_held_conversions(held, ledger, send, now=now + 60, window_seconds=WINDOW, run_id="r2")
    assert early["claimed"] == 0
    late = recover_held_conversions(held, ledger, send, now=now + 601, window_seconds=WINDOW, run_id="r3")
    assert (late["claimed"], late["recovered_already_acknowledged"], late["recovered"]) == (1, 1, 0)
    assert standin.received() == [] and held.counts()[RECOVERED] == 1


def test_refused_events_are_lost_with_the_refusal_and_transient_failures_wait(state, standin) -> None:
    store, held, ledger = state
    now = int(time.time())
    held.hold(PARTITION, [entry("bad", "u-1", "E-old", now - DAY_SECONDS, now - 60),
                          entry("flaky", "u-2", "E-old", now - DAY_SECONDS, now - 60)], now=now)
    store.upsert([EnvelopeRecord("u-1", "E-1", now - 30, TCF), EnvelopeRecord("u-2", "E-2", now - 30, TCF)], now=now)
    standin.config(reject_event_ids=["bad"], error_rate=0.0)
    first = recover_held_conversions(held, ledger, send_with(standin), now=now, window_seconds=WINDOW, run_id="r1")
    assert first["lost_refused"] == 1 and first["recovered"] == 1
    [reason] = first["lost_by_reason"]
    assert reason.startswith("refused by the adapter") and "400" in reason
    assert "E-1" not in reason

    held.hold("2026-11-21", [entry("later", "u-2", "E-old", now - DAY_SECONDS, now - 60)], now=now)
    standin.config(reject_event_ids=[], error_rate=1.0)
    second = recover_held_conversions(held, ledger, send_with(standin), now=now, window_seconds=WINDOW, run_id="r2")
    assert second["released"] == 1 and held.counts("2026-11-21")[HELD] == 1
    standin.config(error_rate=0.0)
    third = recover_held_conversions(held, ledger, send_with(standin), now=now, window_seconds=WINDOW, run_id="r3")
    assert third["recovered"] == 1 and held.counts("2026-11-21")[RECOVERED] == 1


def test_two_concurrent_passes_deliver_each_event_once(state, standin) -> None:
    store, held, ledger = state
    now = int(time.time())
    held.hold(PARTITION, [entry(f"e{i:03d}", f"u-{i % 40}", "E-old", now - DAY_SECONDS, now - 60,
                                session=f"s:{i}") for i in range(300)], now=now)
    store.upsert([EnvelopeRecord(f"u-{i}", f"E-{i}", now - 30, TCF) for i in range(40)], now=now)
    standin.config(latency_ms=5)
    results: list[dict] = []
    errors: list[BaseException] = []

    def one_pass(name: str) -> None:
        try:
            results.append(recover_held_conversions(held, ledger, send_with(standin), now=now,
                                                    window_seconds=WINDOW, run_id=name, page_size=37))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one_pass, args=(f"pass-{n}",)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    ids = Counter(e["event_id"] for batch in standin.received() for e in batch["events"])
    assert len(ids) == 300 and max(ids.values()) == 1
    assert sum(r["recovered"] for r in results) == 300
    assert held.counts()[RECOVERED] == 300


def test_forget_deletes_held_events_of_the_user(state) -> None:
    _, held, _ = state
    now = int(time.time())
    held.hold(PARTITION, [entry("e1", "u-1", "E", now, now - 1), entry("e2", "u-2", "E", now, now - 1)], now=now)
    assert held.forget(["u-1", "nobody"]) == 1
    with held.engine.connect() as connection:
        assert connection.execute(held_table.select()).all().__len__() == 1


def test_no_personal_data_is_kept_once_an_event_is_recovered_or_lost(state, standin) -> None:
    store, held, ledger = state
    now = int(time.time())
    held.hold(PARTITION, [entry("back", "u-1", "E-old", now - DAY_SECONDS, now - 60),
                          entry("nokey", None, "E-old", now - DAY_SECONDS, now - 60),
                          entry("stale", "u-2", "E-old", now - 29 * DAY_SECONDS, now - 60),
                          entry("waiting", "u-3", "E-old", now - DAY_SECONDS, now - 60)], now=now)
    store.upsert([EnvelopeRecord("u-1", "E-1", now - 30, TCF)], now=now)
    recover_held_conversions(held, ledger, send_with(standin), now=now, window_seconds=WINDOW, run_id="r1")
    with held.engine.connect() as connection:
        rows = {r.event_id: (r.state, r.event_json) for r in connection.execute(held_table.select())}
    assert rows["back"] == (RECOVERED, "") and rows["nokey"] == (LOST, "") and rows["stale"] == (LOST, "")
    assert rows["waiting"][0] == HELD and "E-old" in rows["waiting"][1]
