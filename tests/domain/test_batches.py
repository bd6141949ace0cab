from __future__ import annotations

import dataclasses
import re

import orjson
import pytest

from liveramp_capi.domain.batches import (
    DEFAULT_MAX_BATCH_EVENTS,
    MAX_BATCH_EVENTS_LIMIT,
    Batch,
    batch_id_for,
    cut_batches,
)
from liveramp_capi.domain.sessions import Session, ShardEntry, key_hash

PARTITION = "2026-11-20"


def make_session(key: str, event_ids: list[str], events: list[dict] | None = None) -> Session:
    events = events or [{"event_id": event_id, "event_time": 100 + i} for i, event_id in enumerate(event_ids)]
    entries = [
        ShardEntry(key, key_hash(key), event["event_time"], event_id, i, None, orjson.dumps(event))
        for i, (event_id, event) in enumerate(zip(event_ids, events, strict=True))
    ]
    return Session(key, key_hash(key), entries)


def test_constants() -> None:
    assert MAX_BATCH_EVENTS_LIMIT == 1000
    assert DEFAULT_MAX_BATCH_EVENTS == 50


def test_cut_into_consecutive_chunks() -> None:
    ids = [str(i) for i in range(7)]
    batches = cut_batches(make_session("s:a", ids), partition=PARTITION, max_events=3)
    assert [b.event_ids for b in batches] == [("0", "1", "2"), ("3", "4", "5"), ("6",)]
    assert [b.event_count for b in batches] == [3, 3, 1]
    assert all(b.session_key_hash == key_hash("s:a") for b in batches)


def test_body_is_exact_concatenation_of_event_json() -> None:
    events = [{"event_id": "1", "event_time": 5, "x": "\u00e9"}, {"event_id": "2", "event_time": 6}]
    session = make_session("s:a", ["1", "2"], events)
    [batch] = cut_batches(session, partition=PARTITION, max_events=50)
    assert batch.body == b'{"events":[' + orjson.dumps(events[0]) + b"," + orjson.dumps(events[1]) + b"]}"
    assert orjson.loads(batch.body) == {"events": events}


def test_empty_session_gives_no_batches() -> None:
    assert cut_batches(Session("s:a", key_hash("s:a"), []), partition=PARTITION) == []


@pytest.mark.parametrize("bad", [0, -1, MAX_BATCH_EVENTS_LIMIT + 1])
def test_max_events_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError, match="max_events"):
        cut_batches(make_session("s:a", ["1"]), partition=PARTITION, max_events=bad)


def test_limit_is_allowed() -> None:
    ids = [str(i) for i in range(MAX_BATCH_EVENTS_LIMIT + 1)]
    batches = cut_batches(make_session("s:a", ids), partition=PARTITION, max_events=MAX_BATCH_EVENTS_LIMIT)
    assert [b.event_count for b in batches] == [MAX_BATCH_EVENTS_LIMIT, 1]


def test_batch_ids_are_deterministic_hex() -> None:
    first = cut_batches(make_session("s:a", ["1", "2", "3"]), partition=PARTITION, max_events=2)
    again = cut_batches(make_session("s:a", ["1", "2", "3"]), partition=PARTITION, max_events=2)
    assert [b.batch_id for b in first] == [b.batch_id for b in again]
    assert all(re.fullmatch(r"[0-9a-f]{32}", b.batch_id) for b in first)
    assert first[0].batch_id != first[1].batch_id


def test_batch_id_depends_on_partition_key_and_events() -> None:
    base = cut_batches(make_session("s:a", ["1"]), partition=PARTITION)[0].batch_id
    assert cut_batches(make_session("s:a", ["1"]), partition="2026-11-21")[0].batch_id != base
    assert cut_batches(make_session("s:b", ["1"]), partition=PARTITION)[0].batch_id != base
    assert cut_batches(make_session("s:a", ["2"]), partition=PARTITION)[0].batch_id != base


def test_batch_id_distinguishes_events_sharing_an_id() -> None:
    # The seed's mobile examples send InstallApp and LaunchAPP of one user as event_id "1".
    key = "u:env\x1fidfa\x1f\x1f"
    install = make_session(key, ["1"], [{"event_id": "1", "event_type": "InstallApp", "event_time": 1}])
    launch = make_session(key, ["1"], [{"event_id": "1", "event_type": "LaunchAPP", "event_time": 9000}])
    [a] = cut_batches(install, partition=PARTITION)
    [b] = cut_batches(launch, partition=PARTITION)
    assert a.batch_id != b.batch_id


def test_batch_id_is_unambiguous_about_separators() -> None:
    body = b"{}"
    assert batch_id_for(PARTITION, "s:a", ("x\x1fy",), body) != batch_id_for(
        PARTITION, "s:a", ("x", "y"), body
    )
    assert batch_id_for(PARTITION, "s:a\x1fx", ("y",), body) != batch_id_for(
        PARTITION, "s:a", ("x\x1fy",), body
    )


def test_batch_is_frozen() -> None:
    batch = Batch("0" * 32, 1, ("1",), b"{}")
    with pytest.raises(dataclasses.FrozenInstanceError):
        batch.batch_id = "x"  # type: ignore[misc]
