from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa

from liveramp_capi.domain.batches import Batch, cut_batches
from liveramp_capi.domain.redaction import MAX_ERROR_CHARS
from liveramp_capi.domain.sessions import Session, ShardEntry, key_hash
from liveramp_capi.state.database import make_engine
from liveramp_capi.state.ledger import (
    ACKNOWLEDGED,
    FAILED,
    IN_FLIGHT,
    SCHEMA_COMPONENT,
    SCHEMA_VERSION,
    DeliveryLedger,
    ledger_table,
)
from liveramp_capi.state.migrations import SchemaVersionError, schema_version_table

P = "2026-11-20"


# -- fixtures -----------------------------------------------------------------------------


BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A ledger database with an empty ledger: a fresh SQLite file, or the session's PG database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/state.db"
    url = request.getfixturevalue("pg_url")
    engine = make_engine(url)
    DeliveryLedger(engine).ensure_schema()
    with engine.begin() as connection:
        connection.execute(sa.delete(ledger_table))
    engine.dispose()
    return url


@pytest.fixture(params=BACKENDS)
def fresh_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database with no tables at all."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/fresh.db"
    return request.getfixturevalue("pg_database_factory")()


@pytest.fixture
def ledger(db_url: str) -> Iterator[DeliveryLedger]:
    engine = make_engine(db_url)
    result = DeliveryLedger(engine)
    result.ensure_schema()
    yield result
    engine.dispose()


def make_batches(
    sessions: int, events_per_session: int = 3, max_events: int = 2, prefix: str = "s"
) -> list[Batch]:
    batches: list[Batch] = []
    for number in range(sessions):
        key = f"s:{prefix}{number}"
        hashed = key_hash(key)
        entries = [
            ShardEntry(
                key,
                hashed,
                1_700_000_000 + i,
                f"{prefix}{number}-{i}",
                i,
                None,
                orjson.dumps({"event_id": f"{prefix}{number}-{i}"}),
            )
            for i in range(events_per_session)
        ]
        batches += cut_batches(Session(key, hashed, entries), partition=P, max_events=max_events)
    return batches


def rows(ledger: DeliveryLedger, partition: str = P) -> dict[str, dict]:
    with ledger.engine.connect() as connection:
        result = connection.execute(sa.select(ledger_table).where(ledger_table.c.partition == partition))
        return {row.batch_id: row._asdict() for row in result}


# -- schema -------------------------------------------------------------------------------


def test_ensure_schema_is_idempotent_and_versioned(fresh_db_url: str) -> None:
    engine = make_engine(fresh_db_url)
    ledger = DeliveryLedger(engine)
    ledger.ensure_schema()
    ledger.ensure_schema()
    inspector = sa.inspect(engine)
    assert {"capi_delivery_ledger", "capi_schema_version"} <= set(inspector.get_table_names())
    index_columns = [ix["column_names"] for ix in inspector.get_indexes("capi_delivery_ledger")]
    assert ["partition", "state"] in index_columns
    assert inspector.get_pk_constraint("capi_delivery_ledger")["constrained_columns"] == [
        "partition",
        "batch_id",
    ]
    with engine.connect() as connection:
        versions = connection.execute(
            sa.select(schema_version_table.c.component, schema_version_table.c.version)
        ).all()
    assert versions == [(SCHEMA_COMPONENT, SCHEMA_VERSION)]
    engine.dispose()


def test_newer_schema_version_is_refused(fresh_db_url: str) -> None:
    engine = make_engine(fresh_db_url)
    ledger = DeliveryLedger(engine)
    ledger.ensure_schema()
    with engine.begin() as connection:
        connection.execute(sa.update(schema_version_table).values(version=SCHEMA_VERSION + 1))
    with pytest.raises(SchemaVersionError, match="upgrade"):
        ledger.ensure_schema()
    engine.dispose()


_ENSURE_SCRIPT = """
import sys
from liveramp_capi.state.ledger import DeliveryLedger
from liveramp_capi.state.database import make_engine
DeliveryLedger(make_engine(sys.argv[1])).ensure_schema()
"""


def test_ensure_schema_from_many_processes_at_once(fresh_db_url: str) -> None:
    processes = [
        subprocess.Popen([sys.executable, "-c", _ENSURE_SCRIPT, fresh_db_url], stderr=subprocess.PIPE)
        for _ in range(6)
    ]
    errors = [p.communicate(timeout=120)[1].decode() for p in processes]
    assert [p.returncode for p in processes] == [0] * 6, errors
    engine = make_engine(fresh_db_url)
    with engine.connect() as connection:
        assert (
            connection.execute(sa.select(sa.func.count()).select_from(schema_version_table)).scalar_one() == 1
        )
    engine.dispose()


# -- upserts ------------------------------------------------------------------------------


def test_lifecycle_and_attempt_totals(ledger: DeliveryLedger) -> None:
    batches = make_batches(2)
    ledger.mark_in_flight(P, batches, "run-1")
    assert {r["state"] for r in rows(ledger).values()} == {IN_FLIGHT}
    first = rows(ledger)
    assert all(r["attempts"] == 0 and r["run_id"] == "run-1" for r in first.values())

    ledger.record_failed(P, [(b, 3, 503, "HTTP 503") for b in batches], "run-1")
    ledger.mark_in_flight(P, batches, "run-2")
    ledger.record_acknowledged(P, [(b, 2) for b in batches], "run-2")
    final = rows(ledger)
    for batch in batches:
        row = final[batch.batch_id]
        assert row["state"] == ACKNOWLEDGED
        assert row["attempts"] == 5
        assert row["run_id"] == "run-2"
        assert row["http_status"] is None and row["error"] is None
        assert row["acknowledged_at"] is not None
        assert row["first_sent_at"] == first[batch.batch_id]["first_sent_at"]
        assert row["event_count"] == batch.event_count
        assert json.loads(row["event_ids"]) == list(batch.event_ids)
        assert row["session_key_hash"] == batch.session_key_hash


def test_acknowledged_is_never_downgraded(ledger: DeliveryLedger) -> None:
    batches = make_batches(3)
    ledger.record_acknowledged(P, [(b, 1) for b in batches], "run-1")
    acknowledged_at = {k: r["acknowledged_at"] for k, r in rows(ledger).items()}
    ledger.mark_in_flight(P, batches, "zombie")
    ledger.record_failed(P, [(b, 4, 500, "late failure") for b in batches], "zombie")
    after = rows(ledger)
    assert {r["state"] for r in after.values()} == {ACKNOWLEDGED}
    assert {r["run_id"] for r in after.values()} == {"run-1"}
    assert {r["error"] for r in after.values()} == {None}
    assert {r["http_status"] for r in after.values()} == {None}
    # The zombie's requests still count.
    assert {r["attempts"] for r in after.values()} == {5}
    # A second acknowledgement (a duplicate send) adds attempts but keeps the first time.
    ledger.record_acknowledged(P, [(b, 1) for b in batches], "run-2")
    again = rows(ledger)
    assert {r["attempts"] for r in again.values()} == {6}
    assert {k: r["acknowledged_at"] for k, r in again.items()} == acknowledged_at


def test_failed_rows_without_prior_in_flight_and_sanitised_errors(ledger: DeliveryLedger) -> None:
    [batch] = make_batches(1, events_per_session=1)
    envelope = "AgNTagi_Y2T6eSlK9l3X7uJ11ib8QP2RXvpd2id5wnpjZBOvMGlVDhKsr2MrYrG6iDQHE7Gzlfx"
    idfa = "6D92078A-8246-4BA4-AE5B-76104861E7DC"
    error = f"HTTP 400: bad partner_id {envelope} idfa {idfa}\nnext line" + "x" * 1000
    ledger.record_failed(P, [(batch, 1, 400, error)], None)
    row = rows(ledger)[batch.batch_id]
    assert row["state"] == FAILED and row["http_status"] == 400 and row["run_id"] is None
    assert envelope not in row["error"] and idfa not in row["error"] and "\n" not in row["error"]
    assert row["error"].startswith("HTTP 400: bad partner_id <redacted> idfa <redacted>")
    assert len(row["error"]) <= MAX_ERROR_CHARS


def test_every_value_survives_the_json_payload(ledger: DeliveryLedger) -> None:
    """The writes carry their rows as one JSON array the database unpacks: ids with quotes,
    backslashes and non-ASCII, extreme hashes, a NULL status and a long error come back as written."""
    odd = Batch("odd-\"id\\é", (1 << 63) - 1, ('"q"', "back\\slash", "ünï", "tab\t"), b"{}")
    plain = Batch("plain", 0, ("1",), b"{}")
    ledger.mark_in_flight(P, [odd, plain], "run#1")
    ledger.record_failed(P, [(plain, 3, None, "x" * (MAX_ERROR_CHARS + 50))], "run#1")
    ledger.record_acknowledged(P, [(odd, 2)], "run#2")
    stored = rows(ledger)
    assert stored[odd.batch_id]["event_ids"] == orjson.dumps(odd.event_ids).decode()
    assert stored[odd.batch_id]["session_key_hash"] == (1 << 63) - 1
    assert (stored[odd.batch_id]["state"], stored[odd.batch_id]["attempts"]) == (ACKNOWLEDGED, 2)
    assert stored[odd.batch_id]["run_id"] == "run#2" and stored[odd.batch_id]["event_count"] == 4
    assert stored["plain"]["http_status"] is None and stored["plain"]["attempts"] == 3
    assert len(stored["plain"]["error"]) <= MAX_ERROR_CHARS


def test_duplicate_batches_in_one_call_and_empty_calls(ledger: DeliveryLedger) -> None:
    batches = make_batches(1)
    ledger.mark_in_flight(P, batches + batches, "run")
    ledger.record_acknowledged(P, [(batches[0], 1), (batches[0], 1)], "run")
    ledger.mark_in_flight(P, [], "run")
    ledger.record_acknowledged(P, [], "run")
    ledger.record_failed(P, [], "run")
    assert len(rows(ledger)) == len(batches)


def test_rerun_after_crash(ledger: DeliveryLedger) -> None:
    shard_count = 4
    batches = make_batches(40)
    # Run 1 marks everything in flight, gets a third acknowledged, a few failed, then dies.
    ledger.mark_in_flight(P, batches, "run-1")
    acked = batches[::3]
    failed = batches[1::7]
    failed = [b for b in failed if b not in acked]
    ledger.record_acknowledged(P, [(b, 1) for b in acked], "run-1")
    ledger.record_failed(P, [(b, 5, 429, "rate limited") for b in failed], "run-1")
    unknown = [b for b in batches if b not in acked and b not in failed]

    # Another partition's rows must never leak in.
    ledger.record_acknowledged("2026-11-21", [(b, 1) for b in batches], "other")

    for shard in range(shard_count):

        def mine(items: list[Batch], shard: int = shard) -> list[Batch]:
            return [b for b in items if b.session_key_hash % shard_count == shard]

        assert ledger.unresolved_batches(P, shard, shard_count) == sorted(b.batch_id for b in mine(unknown))
        assert set(ledger.acknowledged_batch_runs(P, shard, shard_count)) == {b.batch_id for b in mine(acked)}
    assert sum(len(ledger.unresolved_batches(P, s, shard_count)) for s in range(shard_count)) == len(unknown)

    # Run 2 resolves the unknown ones.
    ledger.mark_in_flight(P, unknown, "run-2")
    ledger.record_acknowledged(P, [(b, 1) for b in unknown], "run-2")
    assert all(ledger.unresolved_batches(P, s, shard_count) == [] for s in range(shard_count))

    counts = ledger.partition_counts(P)
    assert counts[ACKNOWLEDGED]["batches"] == len(acked) + len(unknown)
    assert counts[FAILED] == {"batches": len(failed), "events": sum(b.event_count for b in failed)}
    assert counts[IN_FLIGHT] == {"batches": 0, "events": 0}
    assert ledger.partition_counts("1999-01-01") == {
        s: {"batches": 0, "events": 0} for s in (IN_FLIGHT, ACKNOWLEDGED, FAILED)
    }


def test_shard_filter_with_extreme_hashes(ledger: DeliveryLedger) -> None:
    largest = 2**63 - 1
    batches = [Batch(f"{i:032x}", h, (f"e{i}",), b"{}") for i, h in enumerate([0, 1, largest, largest - 1])]
    ledger.record_acknowledged(P, [(b, 1) for b in batches], "run")
    for shard_count in (1, 3, 7, 256):
        for shard in range(shard_count):
            expected = {b.batch_id for b in batches if b.session_key_hash % shard_count == shard}
            assert set(ledger.acknowledged_batch_runs(P, shard, shard_count)) == expected
    with pytest.raises(ValueError):
        ledger.unresolved_batches(P, 3, 3)


def test_two_writers_at_once(db_url: str) -> None:
    batches = make_batches(120, events_per_session=4, max_events=2)  # 240 batches
    both = batches[:160]  # A acknowledges 0..80, B fails 40..80 and acknowledges 80..160
    only_failed = batches[160:200]  # B only fails these
    only_in_flight = batches[200:]  # A marks these and "dies"
    chunk = 10
    barrier = threading.Barrier(2, timeout=60)
    errors: list[BaseException] = []

    def chunks(items: list[Batch]) -> list[list[Batch]]:
        return [items[i : i + chunk] for i in range(0, len(items), chunk)]

    def writer_a() -> None:
        engine = make_engine(db_url)
        ledger = DeliveryLedger(engine)
        try:
            ledger.ensure_schema()
            barrier.wait()
            for group in chunks(both[:120]):
                ledger.mark_in_flight(P, group, "A")
                ledger.record_acknowledged(P, [(b, 1) for b in group if b in both[:80]], "A")
            ledger.mark_in_flight(P, only_in_flight, "A")
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()
        finally:
            engine.dispose()

    def writer_b() -> None:
        engine = make_engine(db_url)
        ledger = DeliveryLedger(engine)
        try:
            ledger.ensure_schema()
            barrier.wait()
            # Opposite order, so both writers collide on the same rows from both ends.
            for group in reversed(chunks(list(reversed(both[40:])) + only_failed)):
                ledger.mark_in_flight(P, group, "B")
                ledger.record_failed(
                    P, [(b, 1, 500, "HTTP 500") for b in group if b in both[40:80] or b in only_failed], "B"
                )
                ledger.record_acknowledged(P, [(b, 1) for b in group if b in both[80:]], "B")
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()
        finally:
            engine.dispose()

    threads = [threading.Thread(target=writer_a), threading.Thread(target=writer_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors

    engine = make_engine(db_url)
    ledger = DeliveryLedger(engine)
    final = rows(ledger)
    assert len(final) == len(batches)  # nothing lost, nothing duplicated
    for batch in both:
        assert final[batch.batch_id]["state"] == ACKNOWLEDGED
    for batch in only_failed:
        assert final[batch.batch_id]["state"] == FAILED
    for batch in only_in_flight:
        assert final[batch.batch_id]["state"] == IN_FLIGHT
    # Attempts are totals over both writers, whatever the interleaving.
    expected_attempts = {b.batch_id: 0 for b in batches}
    for b in both[:80]:
        expected_attempts[b.batch_id] += 1  # A's ack
    for b in both[40:80] + only_failed:
        expected_attempts[b.batch_id] += 1  # B's failure
    for b in both[80:]:
        expected_attempts[b.batch_id] += 1  # B's ack
    assert {k: r["attempts"] for k, r in final.items()} == expected_attempts
    counts = ledger.partition_counts(P)
    assert counts[ACKNOWLEDGED]["batches"] == len(both)
    assert counts[ACKNOWLEDGED]["events"] == sum(b.event_count for b in both)
    engine.dispose()


def test_thousand_row_upserts_are_fast(ledger: DeliveryLedger, capsys: pytest.CaptureFixture[str]) -> None:
    batches = make_batches(500, events_per_session=4, max_events=2)
    assert len(batches) == 1000
    timings = {}
    for name, call in (
        ("mark_in_flight", lambda: ledger.mark_in_flight(P, batches, "run")),
        (
            "record_acknowledged",
            lambda: ledger.record_acknowledged(P, [(b, 1) for b in batches[:500]], "run"),
        ),
        (
            "record_failed",
            lambda: ledger.record_failed(P, [(b, 2, 503, "HTTP 503") for b in batches[500:]], "run"),
        ),
        ("acknowledged_batch_runs", lambda: ledger.acknowledged_batch_runs(P, 0, 1)),
    ):
        started = time.perf_counter()
        call()
        timings[name] = (time.perf_counter() - started) * 1000
    with capsys.disabled():
        print(
            f"\n[ledger {ledger.dialect}] 1000 rows: "
            + ", ".join(f"{k} {v:.1f} ms" for k, v in timings.items())
        )
    assert ledger.partition_counts(P)[ACKNOWLEDGED]["batches"] == 500
    # Generous bound: catches a row-per-transaction regression, not a slow machine.
    assert timings["mark_in_flight"] < 5000


def test_hour_keys_fit_and_an_older_ten_character_partition_column_is_widened(fresh_db_url: str) -> None:
    """State databases made before hourly partitions declared ``partition`` as 10 characters;
    PostgreSQL enforces that, so ensure_schema widens it in place (rows kept)."""
    from liveramp_capi.state.held_store import HeldConversions, held_table

    hour = "2026-11-20T13"
    engine = make_engine(fresh_db_url)
    old = sa.MetaData()
    for table in (ledger_table, held_table):
        copy = table.to_metadata(old)
        copy.c.partition.type = sa.String(10)
    old.create_all(engine)
    ledger = DeliveryLedger(engine)
    [batch] = make_batches(1, events_per_session=2, max_events=5)
    ledger.mark_in_flight(P, [batch], "old-run")  # a day's row written before the upgrade

    ledger.ensure_schema()
    HeldConversions(engine).ensure_schema()

    ledger.record_acknowledged(hour, [(batch, 1)], "hourly-run")
    assert set(rows(ledger, hour)) == {batch.batch_id} and set(rows(ledger, P)) == {batch.batch_id}
    assert ledger.acknowledged_batch_runs(hour, 0, 1) == {batch.batch_id: "hourly-run"}
    if engine.dialect.name == "postgresql":  # SQLite keeps the declared text but enforces no length
        for table in ("capi_delivery_ledger", "capi_held_conversions"):
            column = next(c for c in sa.inspect(engine).get_columns(table) if c["name"] == "partition")
            assert column["type"].length == 32
    engine.dispose()


def test_sqlite_timestamps_are_stored_as_the_driver_adapts_them(tmp_path: Path) -> None:
    """The ledger adapts its timestamp once per call; the text must be what ``sqlite3`` stores per row."""
    import datetime as dt
    import sqlite3

    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger = DeliveryLedger(engine)
    ledger.ensure_schema()
    batch = make_batches(1)[0]
    ledger.mark_in_flight(P, [batch], "run-1")
    ledger.record_acknowledged(P, [(batch, 1)], "run-1")
    with sqlite3.connect(tmp_path / "ledger.db") as raw:
        stored = raw.execute(
            "SELECT first_sent_at, updated_at, acknowledged_at, typeof(updated_at) FROM capi_delivery_ledger"
        ).fetchone()
    assert stored[3] == "text"
    for text in stored[:3]:
        moment = dt.datetime.fromisoformat(text)
        assert moment.tzinfo is not None and moment.utcoffset() == dt.timedelta(0)
        assert text == moment.isoformat(" ")  # sqlite3's own datetime adapter's format
    assert rows(ledger)[batch.batch_id]["acknowledged_at"] is not None
