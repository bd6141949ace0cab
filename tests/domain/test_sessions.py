from __future__ import annotations

import io
import random
import time
from collections import Counter, defaultdict
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from liveramp_capi.domain.batches import MAX_BATCH_EVENTS_LIMIT, cut_batches
from liveramp_capi.domain.sessions import (
    ShardEntry,
    ShardFormatError,
    ShardWriter,
    key_hash,
    plan_shard_count,
    read_shard,
    session_grouping_key,
    sessionise,
)

PARTITION = "2026-11-20"
ENVELOPE = "AgNTagi_Y2T6eSlK9l3X7uJ11ib8QP2RXvpd2id5wnpjZBOvMGlVDhKsr2MrYrG6iDQHE7Gzlfx"


class KeptBytesIO(io.BytesIO):
    """A BytesIO whose content survives close() (ShardWriter closes its streams)."""

    kept: bytes = b""

    def close(self) -> None:
        self.kept = self.getvalue()
        super().close()


def spill(
    records: list[tuple[str, int, str, dict]], shard_count: int
) -> tuple[list[KeptBytesIO], ShardWriter]:
    streams = [KeptBytesIO() for _ in range(shard_count)]
    with ShardWriter(shard_count, lambda i: streams[i]) as writer:
        for key, event_time, event_id, event in records:
            writer.write(key, event_time, event_id, None, event)
    return streams, writer


def web_event(event_id: str, event_time: int, envelope: str = ENVELOPE, **extra: object) -> dict:
    return {
        "event_manager": ["tiktok"],
        "event_id": event_id,
        "event_type": "AddToCart",
        "event_time": event_time,
        "event_source_url": "https://shop.example/p",
        "user_data": {"partner_id": envelope},
        **extra,
    }


# -- keys, hashes, shard planning ---------------------------------------------------------


def test_grouping_key_prefers_session_id() -> None:
    assert session_grouping_key(web_event("1", 0), "abc") == "s:abc"


def test_grouping_key_web_and_mobile_identity() -> None:
    assert session_grouping_key(web_event("1", 0), None) == "u:" + ENVELOPE + "\x1f\x1f\x1f"
    mobile = web_event("1", 0)
    mobile["user_data"] = {"partner_id": "env", "idfa": "A", "gaid": "G"}
    assert session_grouping_key(mobile, "") == "u:env\x1fA\x1f\x1fG"
    # A device id distinguishes two users of one envelope.
    other = {**mobile, "user_data": {"partner_id": "env", "idfa": "B", "gaid": "G"}}
    assert session_grouping_key(other, None) != session_grouping_key(mobile, None)


def test_key_hash_is_stable_63_bit() -> None:
    # A fixed value: the hash must not change between processes, machines or versions.
    assert key_hash("s:abc") == key_hash("s:abc")
    values = [key_hash(f"u:{i}") for i in range(2000)]
    assert all(0 <= v < 2**63 for v in values)
    assert len(set(values)) == len(values)
    assert max(values) > 2**62  # the top usable bit is used


def test_key_hash_known_value() -> None:
    import hashlib

    expected = int.from_bytes(hashlib.blake2b(b"s:abc", digest_size=8).digest(), "big") >> 1
    assert key_hash("s:abc") == expected


@pytest.mark.parametrize(
    ("estimated", "expected"),
    [(0, 1), (-5, 1), (1, 1), (100_000, 1), (100_001, 2), (2_500_000, 25), (10**9, 256)],
)
def test_plan_shard_count(estimated: int, expected: int) -> None:
    assert plan_shard_count(estimated) == expected


def test_plan_shard_count_options() -> None:
    assert plan_shard_count(1000, events_per_shard=100, max_shards=4) == 4
    with pytest.raises(ValueError):
        plan_shard_count(10, events_per_shard=0)


# -- shard files --------------------------------------------------------------------------


def test_shard_round_trip_with_control_characters() -> None:
    tricky_key = "s:tab\there\nnewline\x1funit \u00e9\u4e2d"
    tricky_id = "id\twith\ttabs\r\n"
    event = web_event(tricky_id, 1_714_692_283, note="a\tb\nc")
    streams, writer = spill([(tricky_key, 1_714_692_283, tricky_id, event)], shard_count=3)
    shard = key_hash(tricky_key) % 3
    assert writer.counts[shard] == 1 and sum(writer.counts) == 1 and writer.total == 1
    data = streams[shard].kept
    assert data.count(b"\n") == 1 and data.endswith(b"\n")
    [entry] = list(read_shard(io.BytesIO(data)))
    assert entry == ShardEntry(
        tricky_key, key_hash(tricky_key), 1_714_692_283, tricky_id, 0, None, orjson.dumps(event)
    )
    assert orjson.loads(entry.event_json) == event
    assert all(stream.kept == b"" for i, stream in enumerate(streams) if i != shard)


def test_writer_routes_by_key_hash_and_numbers_ordinals(tmp_path: Path) -> None:
    paths = [tmp_path / f"shard-{i}.jsonl" for i in range(4)]
    records = [(f"s:{i % 10}", i, str(i), web_event(str(i), i)) for i in range(1000)]
    with ShardWriter(4, lambda i: paths[i].open("wb")) as writer:
        returned = [writer.write(k, t, e, f"user-{k}", ev) for k, t, e, ev in records]
    entries = []
    for index, path in enumerate(paths):
        with path.open("rb") as stream:
            shard_entries = list(read_shard(stream))
        assert len(shard_entries) == writer.counts[index]
        assert all(e.key_hash % 4 == index for e in shard_entries)
        entries += shard_entries
    assert returned == [key_hash(k) % 4 for k, *_ in records]
    assert sorted(e.ordinal for e in entries) == list(range(1000))
    assert all(e.user_key == f"user-{e.key}" for e in entries)


def test_writer_flushes_large_volumes_in_order() -> None:
    big = "x" * 5000
    records = [("s:one", i, str(i), web_event(str(i), i, pad=big)) for i in range(100)]
    streams, _ = spill(records, shard_count=1)
    assert [e.event_id for e in read_shard(io.BytesIO(streams[0].kept))] == [str(i) for i in range(100)]


def test_writer_rejects_writes_after_close() -> None:
    writer = ShardWriter(1, lambda i: KeptBytesIO())
    writer.close()
    writer.close()  # idempotent
    with pytest.raises(ValueError):
        writer.write("s:a", 0, "1", None, {})


def test_writer_closes_opened_streams_when_opening_fails() -> None:
    opened: list[KeptBytesIO] = []

    def open_shard(index: int) -> KeptBytesIO:
        if index == 2:
            raise OSError("disk full")
        opened.append(KeptBytesIO())
        return opened[-1]

    with pytest.raises(OSError):
        ShardWriter(4, open_shard)
    assert len(opened) == 2 and all(s.closed for s in opened)


def _good_line(event_id: str = "1") -> bytes:
    streams, _ = spill([("s:secret-key", 5, event_id, web_event(event_id, 5))], shard_count=1)
    return streams[0].kept


@pytest.mark.parametrize(
    "bad",
    [
        b"not json\t{}\n",
        b'{"k":"s:secret-key","h":1,"t":5,"i":"1","n":0}\t{}\n',  # missing field
        b'{"k":"s:secret-key","h":"1","t":5,"i":"1","n":0,"u":null}\t{}\n',  # wrong type
        b'{"k":"s:secret-key","h":1,"t":5,"i":"1","n":0,"u":null}\n',  # no separator
        b'{"k":"s:secret-key","h":1,"t":5,"i":"1","n":0,"u":null}\t{"event_id":"1"',  # truncated
        b'{"k":"s:secret-key","h":1,"t":5,"i":"1","n":0,"u":null}\t[1]\n',  # not an object
    ],
)
def test_read_shard_reports_line_number_without_content(bad: bytes) -> None:
    data = _good_line() + _good_line("2") + bad
    with pytest.raises(ShardFormatError) as caught:
        list(read_shard(io.BytesIO(data)))
    message = str(caught.value)
    assert "line 3" in message
    assert "secret-key" not in message and "event_id" not in message


# -- sessionisation -----------------------------------------------------------------------


def entry(key: str, event_time: int, ordinal: int, event_id: str | None = None) -> ShardEntry:
    return ShardEntry(key, key_hash(key), event_time, event_id or str(ordinal), ordinal, None, b"{}")


def test_sessionise_orders_by_time_then_ordinal() -> None:
    entries = [entry("s:a", 10, 0), entry("s:a", 5, 1), entry("s:a", 10, 2), entry("s:a", 5, 3)]
    [session] = list(sessionise(entries))
    assert [e.ordinal for e in session.entries] == [1, 3, 0, 2]
    assert session.entries[0].event_time == 5


def test_identity_sessions_split_only_at_gaps_over_limit() -> None:
    key = "u:env\x1f\x1f\x1f"
    times = [0, 1800, 3600, 5401, 5402, 9000]  # gaps 1800, 1800, 1801, 1, 3598
    sessions = list(sessionise([entry(key, t, i) for i, t in enumerate(times)]))
    assert [[e.event_time for e in s.entries] for s in sessions] == [[0, 1800, 3600], [5401, 5402], [9000]]
    assert all(s.key == key for s in sessions)


def test_explicit_sessions_are_never_split_by_time() -> None:
    sessions = list(sessionise([entry("s:x", 0, 0), entry("s:x", 10**6, 1)]))
    assert len(sessions) == 1 and len(sessions[0].entries) == 2


def test_custom_gap() -> None:
    sessions = list(sessionise([entry("u:a", 0, 0), entry("u:a", 61, 1)], gap_seconds=60))
    assert len(sessions) == 2


def test_sessions_come_out_in_deterministic_order() -> None:
    keys = [f"s:{i}" for i in range(50)] + [f"u:{i}" for i in range(50)]
    entries = [entry(k, t, i) for i, (k, t) in enumerate((k, t) for k in keys for t in (0, 5000))]
    forward = [(s.key, s.entries[0].event_time) for s in sessionise(entries)]
    backward = [(s.key, s.entries[0].event_time) for s in sessionise(reversed(entries))]
    assert forward == backward
    assert forward == sorted(forward, key=lambda kt: (key_hash(kt[0]), kt[0], kt[1]))


# -- the whole pipeline, as a property ----------------------------------------------------

GAP = 1800

event_spec = st.tuples(
    st.integers(0, 5),  # user
    st.one_of(st.none(), st.sampled_from(["s1", "s2", "s3"])),  # explicit session id
    st.integers(0, 4 * 3600),  # event_time offset: sessions split often
    st.sampled_from(["1", "2", "dup", "x\ty"]),  # event ids repeat on purpose
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(event_spec, max_size=120),
    shard_count=st.integers(1, 5),
    max_events=st.sampled_from([1, 2, 3, 7, 50, MAX_BATCH_EVENTS_LIMIT]),
)
def test_pipeline_conserves_every_event_once(
    specs: list[tuple[int, str | None, int, str]], shard_count: int, max_events: int
) -> None:
    base = 1_714_000_000
    records = []
    key_of_seq: dict[int, str] = {}
    for seq, (user, session_id, offset, event_id) in enumerate(specs):
        event = web_event(event_id, base + offset, envelope=f"env-{user % 3}", seq=seq)
        if user >= 3:
            event["user_data"]["idfa"] = f"idfa-{user}"
        key = session_grouping_key(event, session_id)
        key_of_seq[seq] = key
        records.append((key, base + offset, event_id, event))
    streams, _ = spill(records, shard_count)

    seen: Counter[int] = Counter()
    for index, stream in enumerate(streams):
        sessions = list(sessionise(read_shard(io.BytesIO(stream.kept)), gap_seconds=GAP))
        assert all(s.key_hash % shard_count == index for s in sessions)
        order = [(s.key_hash, s.key, s.entries[0].event_time) for s in sessions]
        assert order == sorted(order)

        by_key: dict[str, list[list[int]]] = defaultdict(list)
        for session in sessions:
            session_times: list[int] = []
            for batch in cut_batches(session, partition=PARTITION, max_events=max_events):
                assert 1 <= batch.event_count <= max_events
                events = orjson.loads(batch.body)["events"]
                assert [e["event_id"] for e in events] == list(batch.event_ids)
                assert {key_of_seq[e["seq"]] for e in events} == {session.key}  # one key per batch
                times = [e["event_time"] for e in events]
                assert times == sorted(times)
                assert batch.session_key_hash == key_hash(session.key)
                seen.update(e["seq"] for e in events)
                session_times += times
            by_key[session.key].append(session_times)

        for key, sessions_times in by_key.items():
            if key.startswith("s:"):
                assert len(sessions_times) == 1
                continue
            for times in sessions_times:  # no gap over the limit inside a session ...
                assert all(b - a <= GAP for a, b in zip(times, times[1:], strict=False))
            for before, after in zip(sessions_times, sessions_times[1:], strict=False):
                assert after[0] - before[-1] > GAP  # ... and a gap over it between sessions

    assert seen == Counter(range(len(specs)))


# -- throughput (printed, not asserted) ---------------------------------------------------


def test_throughput_sanity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    count = 100_000
    base = 1_714_000_000
    rng = random.Random(7)
    events = []
    # 8 events per user a minute apart, users spread over the day, arriving interleaved.
    for i in range(count):
        user, step = divmod(i, 8)
        event_time = base + (user * 7919) % 86_400 + 60 * step
        event = web_event(f"evt-{i}", event_time, envelope=f"{ENVELOPE}{user:06d}")
        event["custom_data"] = [{"key": "currency", "value": "USD"}, {"key": "value", "value": "12.50"}]
        events.append(event)
    rng.shuffle(events)
    shard_count = 4
    paths = [tmp_path / f"s{i}" for i in range(shard_count)]

    started = time.perf_counter()
    with ShardWriter(shard_count, lambda i: paths[i].open("wb")) as writer:
        for event in events:
            writer.write(
                session_grouping_key(event, None), event["event_time"], event["event_id"], None, event
            )
    written = time.perf_counter()
    batches = 0
    entries_read = 0
    for path in paths:
        with path.open("rb") as stream:
            for session in sessionise(read_shard(stream)):
                entries_read += len(session.entries)
                batches += len(cut_batches(session, partition=PARTITION, max_events=50))
    finished = time.perf_counter()

    assert entries_read == count
    with capsys.disabled():
        print(
            f"\n[throughput] {count} events: write {count / (written - started):,.0f}/s, "
            f"read+sessionise+cut {count / (finished - written):,.0f}/s, "
            f"end to end {count / (finished - started):,.0f}/s, {batches} batches"
        )
