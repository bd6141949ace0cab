"""Batch ids are the ledger's keys for exactly-once: the same input must cut byte-identical ids.

The digests below were computed from this fixed input by the code as it was before the send
path was made cheaper (planning, body building, envelope resolution); a change that moves a
single byte of an id, a body or an event list fails here.
"""

from __future__ import annotations

import hashlib
import io
import random

import orjson

from liveramp_capi.domain.batches import cut_batches
from liveramp_capi.domain.envelopes import ACTIVE, StoredEnvelope
from liveramp_capi.domain.held import HELD, LOST, HeldIndex, event_key
from liveramp_capi.domain.send_plan import plan_session
from liveramp_capi.domain.sessions import Session, ShardEntry, ShardWriter, key_hash, read_shard, sessionise

PARTITION = "2026-11-20"
NOW = 1_800_000_000


def _sessions() -> list[Session]:
    sessions = []
    for number in range(40):
        key = f"u:envelope-{number}\x1fidfa-\u00e9{number % 3}" if number % 4 else f"s:session {number}"
        entries = []
        for index in range(number % 13 + 1):
            user_key = f"user-{number}" if number % 5 else None
            event = {
                "event_type": ("Purchase", "ViewContent", "InstallApp")[index % 3],
                # Ids repeat across sessions and types on purpose (the seed's app examples do).
                "event_id": str(index % 4),
                "event_time": NOW - 86_400 + number * 100 + index,
                "user_data": {"partner_id": f"own-{number}-{index % 2}", "email": "\u00fc\u4e2d\"\\"},
                "properties": {"value": number + index / 10, "currency": "EUR"},
            }
            issued = NOW - 40 * 86_400 if (number + index) % 7 == 0 else NOW - 3_600 - index
            expires = issued + 30 * 86_400
            entries.append(
                ShardEntry(
                    key, key_hash(key), event["event_time"], event["event_id"], number * 100 + index,
                    user_key, orjson.dumps(event), issued if index % 6 else None, expires if index % 6 else None,
                )
            )
        sessions.append(Session(key, key_hash(key), entries))
    return sessions


def _stored() -> dict[str, StoredEnvelope]:
    stored = {}
    for number in range(40):
        if number % 3 == 0:
            continue
        issued = NOW - 60 if number % 2 else NOW - 90 * 86_400
        envelope = f"own-{number}-0" if number % 6 == 1 else f"store-{number}"
        stored[f"user-{number}"] = StoredEnvelope(
            f"user-{number}", envelope, issued, issued + 30 * 86_400, None, None, ACTIVE
        )
    return stored


def _digest(lines: list[bytes]) -> str:
    return hashlib.sha256(b"\n".join(lines)).hexdigest()


def _cut_lines() -> list[bytes]:
    lines = []
    for max_events in (1, 3, 50):
        for session in _sessions():
            for batch in cut_batches(session, partition=PARTITION, max_events=max_events):
                lines.append(orjson.dumps([batch.batch_id, batch.session_key_hash, batch.event_ids]) + batch.body)
    return lines


def test_cut_batches_ids_and_bodies_are_unchanged() -> None:
    lines = _cut_lines()
    assert len(lines) == 420
    assert lines[0].startswith(b'["afe429024106197fa5764a8ad5b79931",')
    assert _digest(lines) == "ff2a6b6ddf255b0039314112751f027a2ccefd635e6eeb6165eb9881021f23e8"


def _plan_lines() -> list[bytes]:
    sessions = _sessions()
    first_ids = {batch.batch_id for session in sessions[::5] for batch in cut_batches(session, partition=PARTITION, max_events=3)}
    acknowledged = {batch_id: ("run-a#1" if i % 2 else "run-b#1") for i, batch_id in enumerate(sorted(first_ids))}
    held_entries = [session.entries[0] for session in sessions[1::6]]
    held = HeldIndex(
        {event_key(orjson.loads(e.event_json)["event_type"], e.event_id): (HELD if i % 2 else LOST, None)
         for i, e in enumerate(held_entries)},
        {e.event_id for e in held_entries},
    )
    lines = []
    for max_events in (1, 3, 50):
        for session in sessions:
            plan = plan_session(session, _stored(), NOW, partition=PARTITION, max_events=max_events,
                                acknowledged=acknowledged, held=held, this_run="run-a#")
            for batch in plan.batches:
                lines.append(orjson.dumps([batch.batch_id, batch.session_key_hash, batch.event_ids]) + batch.body)
            lines.append(orjson.dumps([
                [e.ordinal for e in plan.hold], [(e.ordinal, s) for e, s in plan.held_earlier],
                plan.previously_delivered, plan.delivered_earlier_tries, plan.replaced,
            ]))
            lines.extend(plan.expired_lines(PARTITION, 7))
    return lines


def test_planned_batches_holds_and_counts_are_unchanged() -> None:
    lines = _plan_lines()
    assert len(lines) == 629
    assert _digest(lines) == "6cad15817d138b155c7cf8c43947e1c89436bd8656eaa16cc489e599e522116c"


def _spilled_lines() -> list[bytes]:
    """The golden sessions spilled in a shuffled order, read back and sessionised (gap 300 s)."""
    entries = [entry for session in _sessions() for entry in session.entries]
    random.Random(5).shuffle(entries)
    stream = io.BytesIO()
    stream.close = lambda: None  # type: ignore[method-assign]  # read back below
    with ShardWriter(1, lambda _: stream) as writer:
        for entry in entries:
            writer.write(entry.key, entry.event_time, entry.event_id, entry.user_key,
                         orjson.loads(entry.event_json), entry.envelope_issued_at, entry.envelope_expires_at)
    stream.seek(0)
    lines = []
    for session in sessionise(read_shard(stream), gap_seconds=300):
        for batch in cut_batches(session, partition=PARTITION, max_events=4):
            lines.append(orjson.dumps([batch.batch_id, [e.ordinal for e in session.entries]]) + batch.body)
    return lines


def test_spilled_read_and_sessionised_batches_are_unchanged() -> None:
    lines = _spilled_lines()
    assert len(lines) == 85
    assert _digest(lines) == "1a2b83c69c149c22b15b9490d41d709ed522f2a4bb54abc855ea98559f784dac"
