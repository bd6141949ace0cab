"""Property: generated events and mutations through validation and batching keep their invariants.

Domain level, no Airflow: source records -> ``RecordValidator`` -> ``ShardWriter`` (several
shards) -> ``read_shard`` -> ``sessionise`` -> ``cut_batches``. Whatever hypothesis generates:

* counts are conserved: read = valid + rejected + duplicates, and the batches hold exactly the
  valid events, each once (no event in two batches, none lost);
* a batch never spans two sessions (one grouping key, times within the session gap) and never
  exceeds ``max_events``;
* batches are cut deterministically (a rerun cuts the same ids).
"""

from __future__ import annotations

import io
import json
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from liveramp_capi.domain.batches import cut_batches
from liveramp_capi.domain.checks import DuplicateEventIds, EventTimeWindow
from liveramp_capi.domain.schema import EventSchemaValidator
from liveramp_capi.domain.sessions import ShardWriter, read_shard, session_grouping_key, sessionise
from liveramp_capi.domain.sources import iter_source_records
from liveramp_capi.domain.validation import Accepted, Duplicate, RecordValidator, Rejected, ValidationTally

NOW = 1_790_000_000
GAP = 1800
VALIDATOR = EventSchemaValidator()
ENVELOPES = [f"Ag{'ABCDEFGHIJ'[i]}" + "q" * 60 for i in range(5)]
WEB = ["ViewContent", "AddToCart", "Purchase", "CompletePayment"]

event_strategy = st.fixed_dictionaries(
    {
        "event_manager": st.just(["tiktok"]),
        "event_id": st.integers(0, 60).map(lambda n: f"e{n}"),  # collisions on purpose: duplicates
        "event_type": st.sampled_from(WEB),
        "event_time": st.integers(NOW - 3 * 86_400, NOW),
        "event_source_url": st.just("https://shop.example/p"),
        "user_data": st.fixed_dictionaries({"partner_id": st.sampled_from(ENVELOPES)}),
    },
    optional={"session_id": st.sampled_from(["s1", "s2", "s3"])},
)

mutation = st.sampled_from(
    [
        None, None, None,  # most records stay valid
        "drop_partner", "ms_time", "future", "string_time", "bad_type", "bad_json", "not_object",
        "nan", "dup_key", "big_number", "empty_id",
    ]
)


def _line(event: dict, how: str | None) -> bytes:
    event = json.loads(json.dumps(event))
    if how == "drop_partner":
        event["user_data"].pop("partner_id")
    elif how == "ms_time":
        event["event_time"] *= 1000
    elif how == "future":
        event["event_time"] = NOW + 86_400
    elif how == "string_time":
        event["event_time"] = str(event["event_time"])
    elif how == "bad_type":
        event["event_type"] = "purchase"
    elif how == "empty_id":
        event["event_id"] = ""
    text = json.dumps(event)
    if how == "bad_json":
        text = text[: len(text) // 2]
    elif how == "not_object":
        text = json.dumps([event])
    elif how == "nan":
        text = text.replace(f'"event_time": {event["event_time"]}', '"event_time": NaN')
    elif how == "dup_key":
        text = text.replace("{", '{"event_id": "x", ', 1)
    elif how == "big_number":
        text = text.replace(f'"event_time": {event["event_time"]}', '"event_time": 1e400')
    return text.encode() + b"\n"


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    records=st.lists(st.tuples(event_strategy, mutation), min_size=0, max_size=120),
    max_events=st.integers(1, 7),
    shard_count=st.integers(1, 4),
)
def test_validation_and_batching_invariants(records, max_events, shard_count):
    data = b"".join(_line(event, how) for event, how in records)
    validator = RecordValidator(VALIDATOR, EventTimeWindow(NOW), DuplicateEventIds())
    tally = ValidationTally()
    buffers = [io.BytesIO() for _ in range(shard_count)]
    for buffer in buffers:
        buffer.close = lambda: None  # the writer closes its streams; keep the bytes readable
    accepted: list[Accepted] = []
    with ShardWriter(shard_count, lambda i: buffers[i]) as writer:
        for record in iter_source_records("gen.jsonl", io.BytesIO(data)):
            outcome = validator.check(record)
            tally.add(outcome)
            assert isinstance(outcome, Accepted | Rejected | Duplicate)
            if isinstance(outcome, Rejected):
                assert outcome.violation.reason.strip() and outcome.violation.code
            if isinstance(outcome, Accepted):
                accepted.append(outcome)
                key = session_grouping_key(outcome.event, outcome.pipeline.get("session_id"))
                writer.write(key, outcome.event_time, outcome.event_id, None, outcome.event)

    assert tally.read == len(records)  # every generated line is one record, mutated or not
    assert tally.read == tally.valid + tally.rejected + tally.duplicates
    assert tally.valid == len(accepted) == writer.total

    batched: list[tuple[str, str]] = []
    for index, buffer in enumerate(buffers):
        entries = list(read_shard(io.BytesIO(buffer.getvalue())))
        assert all(entry.key_hash % shard_count == index for entry in entries)
        sessions = list(sessionise(entries, gap_seconds=GAP))
        assert sum(len(s.entries) for s in sessions) == len(entries)
        for session in sessions:
            times = [e.event_time for e in session.entries]
            assert times == sorted(times)
            if session.key.startswith("u:"):
                assert all(b - a <= GAP for a, b in zip(times, times[1:], strict=False))
            batches = cut_batches(session, partition="2026-01-01", max_events=max_events)
            again = cut_batches(session, partition="2026-01-01", max_events=max_events)
            assert [b.batch_id for b in batches] == [b.batch_id for b in again]
            for batch in batches:
                assert 1 <= batch.event_count <= max_events
                body = json.loads(batch.body)
                assert [e["event_id"] for e in body["events"]] == list(batch.event_ids)
                # One session: every event of the batch has the session's grouping key.
                keys = {session_grouping_key(e, None) for e in body["events"]}
                if session.key.startswith("u:"):
                    assert keys == {session.key}
                assert set(batch.event_ids) <= {e.event_id for e in session.entries}
                batched.extend((e["event_type"], e["event_id"]) for e in body["events"])
    # No event in two batches, none lost: the batches hold exactly the accepted events.
    assert Counter(batched) == Counter((a.event["event_type"], a.event_id) for a in accepted)
    assert max(Counter(batched).values(), default=1) == 1
