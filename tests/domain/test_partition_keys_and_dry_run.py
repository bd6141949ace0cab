"""Partition keys of both granularities, and the dry run's envelope overlay and summary."""

from __future__ import annotations

import pytest

from liveramp_capi.domain.dry_run import (
    build_dry_run_summary,
    newest_envelopes,
    overlay_envelopes,
    overlay_line,
)
from liveramp_capi.domain.envelopes import EnvelopeRecord, StoredEnvelope
from liveramp_capi.domain.partition import (
    DAILY,
    HOURLY,
    InvalidPartition,
    parse_partition,
    partition_granularity,
)
from liveramp_capi.domain.summary import RunResults
from liveramp_capi.storage.layout import PartitionLayout


@pytest.mark.parametrize(
    ("key", "granularity"),
    [("2026-11-20", DAILY), ("2026-11-20T00", HOURLY), ("2026-11-20T23", HOURLY), (" 2026-02-28T13 ", HOURLY)],
)
def test_daily_and_hourly_keys_parse_to_their_own_folder(key, granularity):
    name = parse_partition(key)
    assert name == key.strip()
    assert partition_granularity(name) == granularity
    assert PartitionLayout(name).folder == f"dt={name}"


@pytest.mark.parametrize("key", ["2026-11-20T24", "2026-11-20T7", "2026-02-29T01", "2026-11-20T13:00", "2026-11-20 13"])
def test_hours_that_are_not_hours_are_refused(key):
    with pytest.raises(InvalidPartition, match="YYYY-MM-DDTHH|not a calendar date|between 00 and 23"):
        parse_partition(key)


def _record(key: str, envelope: str, issued_at: int) -> EnvelopeRecord:
    return EnvelopeRecord(user_key=key, envelope=envelope, issued_at=issued_at)


def _stored(key: str, envelope: str, issued_at: int, expires_at: int) -> StoredEnvelope:
    return StoredEnvelope(key, envelope, issued_at, expires_at, None, None, "active")


def test_overlay_replays_the_store_upsert_rule():
    now = 10_000_000
    records = [_record("a", "env-a-old", now - 100), _record("a", "env-a-new", now - 50), _record("b", "env-b", now - 10),
               _record("c", "env-c-old", now - 500_000_000), _record("d", "env-d", now - 10)]
    best = newest_envelopes(records[:2])
    newest_envelopes(records[2:], best)
    assert {k: r.envelope for k, r in best.items()} == {"a": "env-a-new", "b": "env-b", "c": "env-c-old", "d": "env-d"}
    lines = [overlay_line(r) for r in best.values()]
    stored = {
        # Newer in the store: the store row stays (as the upsert would keep it).
        "b": _stored("b", "env-b-store", now - 5, now + 1000),
        # Older in the store: the partition's envelope replaces it.
        "d": _stored("d", "env-d-store", now - 20, now + 1000),
        # A newer but expired store row wins the upsert and then resolves to nothing.
        "a": _stored("a", "env-a-store", now - 10, now - 1),
    }
    merged = overlay_envelopes(stored, lines, {"a", "b", "c", "d"}, now)
    assert {k: v.envelope for k, v in merged.items()} == {"b": "env-b-store", "d": "env-d"}
    # Keys outside the shard are left out.
    assert set(overlay_envelopes({}, lines, {"b"}, now)) == {"b"}


def test_dry_run_summary_adds_up_per_shard_and_says_it_is_a_dry_run():
    validation = {"read": 12, "valid": 10, "rejected": 1, "duplicates": 1, "shards": [0, 2]}
    results = [
        {"shard": 2, "events": 4, "planned_batches": 1, "planned_events": 3, "envelope_expired_events": 1},
        {"shard": 0, "events": 6, "planned_batches": 2, "planned_events": 4, "previously_delivered_events": 2},
    ]
    summary = build_dry_run_summary(RunResults("2026-11-20T13", validation, results, run_id="r"))
    assert summary["dry_run"] is True and summary["status"] == "planned"
    assert summary["planned_events"] == 7 and summary["planned_batches"] == 3
    assert summary["by_shard"] == {"0": {"batches": 2, "events": 4}, "2": {"batches": 1, "events": 3}}
    assert all(summary["checks"].values())
    short = build_dry_run_summary(
        RunResults("2026-11-20T13", validation, results[:1], unfinished_tasks={"send[1]": "failed"})
    )
    assert short["status"] == "incomplete" and short["shards"]["missing"] == [0]
    assert not short["checks"]["valid_equals_planned_delivered_expired"]
    assert build_dry_run_summary(RunResults("2026-11-20", None, []))["status"] == "not_processed"
