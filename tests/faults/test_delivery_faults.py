"""Delivery under faults: real ``tiktok_conversions`` runs (``dag.test``) over real HTTP against the
seeded stand-in, checked on what the stand-in recorded, on ``summary.json`` and on the ledger.

Timeout-after-accept (a batch the server accepted, but whose answer never arrived): the sender
cannot tell it from a batch that never arrived, so it retries it. The stand-in then holds the
batch twice (or more); that is the documented at-least-once contract, made safe by TikTok's
deduplication of the same event name + ``event_id`` within 48 hours. The ledger keeps the batch
``in_flight`` or ``failed`` until some attempt is acknowledged, so it is never lost: if every
attempt times out, the batch lands in ``failed.jsonl`` and the next run sends it again. A rerun
more than 48 hours after the first attempt would be counted twice by TikTok (SECURITY.md,
"Delivery guarantees").
"""

from __future__ import annotations

from collections import Counter

import pytest

from capi_devtools.sample_partition import stage_sample_partition
from tests.support.conversions_run import configure_pipeline, output_json, output_jsonl, yesterday
from tests.support.fault_support import ledger_rows, write_partition
from tests.support.fault_support import run_dag_once as run_conversions

pytestmark = pytest.mark.airflow


def _ids(standin) -> Counter[str]:
    return Counter(standin.received_event_ids())


def test_chaos_every_valid_event_delivered_exactly_once(airflow_db, standin, tmp_path, monkeypatch):
    """20% 5xx, 10% 429 + Retry-After, 2% dropped connections, 1% stalls past the timeout."""
    partition = yesterday()
    generated = write_partition(tmp_path / "landing", partition, users=200, seed=11)
    configure_pipeline(
        monkeypatch, tmp_path, standin,
        # A 2 s timeout leaves a loaded CI machine room: only the injected stalls may time out.
        concurrency=32, timeout_seconds=2, connect_timeout_seconds=2, max_attempts=15,
        backoff_base_seconds=0.02, backoff_max_seconds=0.2, retry_after_max_seconds=0.1,
    )
    standin.config(
        seed=20240503, error_rate=0.20, throttle_rate=0.10, retry_after_seconds=1,
        drop_rate=0.02, stall_rate=0.01, stall_seconds=5,
    )

    assert run_conversions(partition) == "success"

    ids = _ids(standin)
    assert set(ids) == set(generated.event_ids), "an event was lost or invented"
    duplicates = {i: n for i, n in ids.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} events delivered more than once"
    stats = standin.stats()
    by_status = stats["requests_by_status"]
    # Every fault really fired (the seed makes this deterministic enough; all are in the hundreds or more).
    assert int(by_status.get("429", 0)) > 0 and stats["dropped"] > 0 and stats["stalled"] > 0
    assert sum(int(by_status.get(s, 0)) for s in ("500", "502", "503")) > 0

    summary = output_json(tmp_path, partition, "summary.json")
    assert summary["status"] == "complete" and all(summary["checks"].values())
    assert summary["read"] == summary["valid"] == summary["delivered_events"] == len(generated.event_ids)
    assert summary["rejected"] == summary["duplicates"] == summary["failed_events"] == 0
    assert summary["batches"] == stats["batches"] == len(standin.received())
    # The client counts every attempt; the server saw each of them (dropped ones included).
    assert summary["requests"] == summary["batches"] + summary["retries"]
    assert stats["requests"] <= summary["requests"]
    assert output_jsonl(tmp_path, partition, "failed.jsonl") == []
    rows = ledger_rows(tmp_path / "state.db", partition)
    assert len(rows) == summary["batches"] and {r["state"] for r in rows} == {"acknowledged"}
    assert sum(r["attempts"] for r in rows) == summary["requests"]
    print(
        f"\nchaos: {summary['batches']} batches, {summary['requests']} requests, {summary['retries']} retries, "
        f"stand-in statuses {by_status}, dropped {stats['dropped']}, stalled {stats['stalled']}"
    )


def test_accepted_then_timed_out_batches_are_retried_and_never_lost(airflow_db, standin, tmp_path, monkeypatch):
    """The stand-in records some batches, then stalls past the client timeout before answering."""
    partition = yesterday()
    generated = write_partition(tmp_path / "landing", partition, users=40, seed=12)
    configure_pipeline(monkeypatch, tmp_path, standin, concurrency=32, timeout_seconds=2, max_attempts=10,
                       backoff_base_seconds=0.02, backoff_max_seconds=0.1)
    standin.config(seed=7, accept_then_stall_rate=0.15, stall_seconds=5)

    assert run_conversions(partition) == "success"

    stats = standin.stats()
    batches = standin.received()
    ids = _ids(standin)
    assert set(ids) == set(generated.event_ids)
    assert stats["stalled"] > 0, "the seed must make some accepted batches stall"
    # Each accepted-then-stalled attempt is re-sent and recorded once more, nothing else is.
    distinct = {tuple(e["event_id"] for e in b["events"]) for b in batches}
    assert len(batches) == len(distinct) + stats["stalled"]
    summary = output_json(tmp_path, partition, "summary.json")
    assert summary["status"] == "complete" and summary["batches"] == len(distinct)
    assert summary["retries"] >= stats["stalled"]
    rows = ledger_rows(tmp_path / "state.db", partition)
    assert {r["state"] for r in rows} == {"acknowledged"}
    # The ledger's attempt counts show which batches were sent more than once.
    assert sum(r["attempts"] - 1 for r in rows) == summary["retries"]


def test_a_batch_that_always_times_out_after_acceptance_stays_in_the_ledger(airflow_db, standin, tmp_path, monkeypatch):
    """Every attempt accepted, no answer ever: failed (retryable), kept, and re-sent by the rerun."""
    partition = yesterday()
    stage_sample_partition(tmp_path / "landing", partition)
    configure_pipeline(monkeypatch, tmp_path, standin, concurrency=32, timeout_seconds=1, max_attempts=2,
                       backoff_base_seconds=0.01, backoff_max_seconds=0.02)
    standin.config(accept_then_stall_rate=1.0, stall_seconds=3)

    assert run_conversions(partition) == "failed"

    first = _ids(standin)
    failed = output_jsonl(tmp_path, partition, "failed.jsonl")
    summary = output_json(tmp_path, partition, "summary.json")
    assert summary["status"] == "incomplete" and summary["delivered_events"] == 0
    assert summary["failed_events"] == summary["valid"] == len(first)
    assert len(failed) == summary["batches"]
    for entry in failed:
        assert entry["permanent"] is False and entry["attempts"] == 2
        assert entry["error"].startswith("retries exhausted: timeout")
    # The server holds every event twice, yet the ledger does not count any as delivered.
    assert set(first.values()) == {2}
    rows = ledger_rows(tmp_path / "state.db", partition)
    assert {r["state"] for r in rows} == {"failed"} and len(rows) == summary["batches"]

    standin.config(accept_then_stall_rate=0.0)
    assert run_conversions(partition) == "success"
    after = _ids(standin)
    assert set(after) == set(first) and set(after.values()) == {3}, "the rerun sends each failed batch once more"
    summary = output_json(tmp_path, partition, "summary.json")
    assert summary["status"] == "complete" and summary["delivered_this_run"] == summary["valid"]
    assert {r["state"] for r in ledger_rows(tmp_path / "state.db", partition)} == {"acknowledged"}


def test_rate_ceiling_is_never_exceeded_and_429_backs_off_without_a_storm(airflow_db, standin, tmp_path, monkeypatch):
    """``max_requests_per_second`` N: the stand-in's busiest 1-second window holds at most N + 1 requests."""
    partition = yesterday()
    generated = write_partition(tmp_path / "landing", partition, users=12, seed=13)
    # A low ceiling: the client spaces requests 250 ms apart, so a scheduling hiccup of up to
    # 250 ms on a loaded machine cannot squeeze a second extra request into one second.
    ceiling = 4
    configure_pipeline(monkeypatch, tmp_path, standin, concurrency=64, max_requests_per_second=ceiling,
                       max_attempts=10, backoff_base_seconds=0.05, backoff_max_seconds=0.5)
    # Throttle a tenth of the requests with Retry-After 1: each pauses every worker.
    standin.config(seed=5, throttle_rate=0.1, retry_after_seconds=1)

    assert run_conversions(partition) == "success"

    stats = standin.stats()
    summary = output_json(tmp_path, partition, "summary.json")
    assert set(_ids(standin)) == set(generated.event_ids)
    assert stats["max_rps"] <= ceiling + 1, stats
    throttled = int(stats["requests_by_status"].get("429", 0))
    assert throttled > 0
    # No retry storm: every request beyond the batches' first attempts answers one 429.
    assert stats["requests"] == summary["batches"] + throttled == summary["requests"]
    print(f"\nrate: ceiling {ceiling}/s, observed max {stats['max_rps']}/s, {stats['requests']} requests, "
          f"{throttled} throttled, {summary['batches']} batches")


def test_server_side_rate_limit_is_honoured_without_a_storm(airflow_db, standin, tmp_path, monkeypatch):
    """The stand-in allows 5 requests/s and answers the rest 429 + Retry-After 1; the client has no ceiling."""
    partition = yesterday()
    generated = write_partition(tmp_path / "landing", partition, users=8, seed=14)
    configure_pipeline(monkeypatch, tmp_path, standin, concurrency=16, max_attempts=20,
                       backoff_base_seconds=0.05, backoff_max_seconds=0.5)
    standin.config(rate_limit_rps=5)

    assert run_conversions(partition) == "success"

    stats = standin.stats()
    summary = output_json(tmp_path, partition, "summary.json")
    assert set(_ids(standin)) == set(generated.event_ids)
    rate_limited = stats["rate_limited"]
    assert rate_limited > 0, "the limit must bite for this test to mean anything"
    # Each 429 pauses every worker for Retry-After: throttled requests stay a small multiple of
    # the concurrency per pause, not a flood (a storm would be thousands here).
    assert rate_limited <= 4 * summary["batches"], stats
    print(f"\nserver limit 5/s: {summary['batches']} batches, {stats['requests']} requests, {rate_limited} answered 429")
