"""The console's aggregates on both state-database backends (SQLite, PostgreSQL), against the
same figures computed in Python from the rows themselves."""

from __future__ import annotations

import datetime as dt
import socket
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from liveramp_capi.console import reads
from liveramp_capi.domain.consent import Consent
from liveramp_capi.domain.envelopes import EnvelopeRecord
from liveramp_capi.state.database import make_engine
from liveramp_capi.state.envelope_rows import envelope_table
from liveramp_capi.state.envelope_store import EnvelopeStore
from liveramp_capi.state.ledger import DeliveryLedger, ledger_table

NOW = 1_764_547_200
DAY = 86_400
PG = ("127.0.0.1", 5432)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def engine(request, tmp_path) -> Iterator[sa.Engine]:
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path}/state.db")
        yield engine
        engine.dispose()
        return
    try:
        socket.create_connection(PG, timeout=1).close()
    except OSError:
        pytest.skip("PostgreSQL is unreachable on 127.0.0.1:5432")
    admin = sa.create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT")
    name = f"capi_consoletest_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    engine = make_engine(f"postgresql://postgres@127.0.0.1:5432/{name}")
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def test_envelope_health_matches_the_rows(engine):
    store = EnvelopeStore(engine)
    store.ensure_schema()
    california = Consent(gpp="DBABL~secret-gpp", gpp_sid="7,8")
    tcf = Consent(ct=4, cv="CPXxRfAPXxRfAAfKABENB-secret")
    records = [
        EnvelopeRecord(f"user-{n}", f"envelope-{n}", NOW - (n % 40) * DAY - 3600, consent)
        for n, consent in enumerate([california, tcf, None] * 30)
    ]
    store.upsert(records, now=NOW)
    store.mark_expired_by_state(now=NOW)
    health = reads.envelope_health(engine, now=NOW, remaining_share=1 / 3)

    with engine.connect() as connection:
        rows = connection.execute(sa.select(envelope_table.c.issued_at, envelope_table.c.expires_at, envelope_table.c.state)).all()
    cells = Counter(((expires - issued) // DAY, max(0, (NOW - issued) // (5 * DAY))) for issued, expires, _ in rows)
    assert health["total"] == len(rows) == 90
    assert health["by_state"] == dict(Counter(state for _, _, state in rows))
    assert {(c["lifetime_days"], c["age_from_days"] // 5): c["envelopes"] for c in health["histogram"]} == dict(cells)
    assert health["lifetimes_days"] == [15, 30]
    assert health["expired"] == sum(1 for _, expires, state in rows if state == "expired" or expires <= NOW) > 0
    assert health["due_for_refresh"] == store.count_due(now=NOW, remaining_share=1 / 3)["due"] > 0
    assert health["consent_missing"] == health["by_state"].get("consent_missing", 0) > 0


def _ledger_row(partition: str, n: int, state: str, events: int, attempts: int, session_hash: int) -> dict:
    at = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    return {
        "partition": partition, "batch_id": f"{n:032x}", "session_key_hash": session_hash, "event_count": events,
        "event_ids": '["secret-event-id"]', "state": state, "attempts": attempts,
        "http_status": 400 if state == "failed" else None,
        "error": "HTTP 400 for 6D92078A-8246-4BA4-AE5B-76104861E7DC" if state == "failed" else None,
        "run_id": "r", "first_sent_at": at, "updated_at": at, "acknowledged_at": None,
    }


def test_ledger_counts_and_failed_batches_per_shard(engine):
    DeliveryLedger(engine).ensure_schema()
    rows = [
        _ledger_row(partition, n, state, 1 + n % 3, 1 + (n % 4 == 0), n * 7919)
        for partition in ("2026-11-29", "2026-11-30", "2026-12-01")
        for n, state in enumerate(["acknowledged"] * 20 + ["failed"] * 5 + ["in_flight"] * 2)
    ]
    with engine.begin() as connection:
        connection.execute(sa.insert(ledger_table), rows)

    counts = reads.ledger_counts(engine, ["2026-11-30", "2026-12-01", "2000-01-01"])
    assert set(counts) == {"2026-11-30", "2026-12-01"}
    mine = [r for r in rows if r["partition"] == "2026-11-30"]
    for state in ("acknowledged", "failed", "in_flight"):
        of_state = [r for r in mine if r["state"] == state]
        assert counts["2026-11-30"][state] == {
            "batches": len(of_state), "events": sum(r["event_count"] for r in of_state),
            "attempts": sum(r["attempts"] for r in of_state),
        }
    assert counts["2026-11-30"]["retries"] == sum(r["attempts"] - 1 for r in mine)

    failed = reads.failed_batches(engine, "2026-11-30", limit=2, offset=1)
    assert failed["total"] == 5 and len(failed["batches"]) == 2
    assert all("6D92078A" not in b["error"] and "secret-event-id" not in str(b) for b in failed["batches"])
    shard = reads.failed_batches(engine, "2026-11-30", shard=(1, 3))
    expected = sorted(r["batch_id"] for r in mine if r["state"] == "failed" and r["session_key_hash"] % 3 == 1)
    assert [b["batch_id"] for b in shard["batches"]] == expected and shard["total"] == len(expected)


def test_reads_of_a_database_without_tables(engine):
    assert reads.ledger_counts(engine, ["2026-11-30"]) == {}
    assert reads.failed_batches(engine, "2026-11-30") == {"total": 0, "batches": []}
    assert reads.envelope_health(engine, now=NOW, remaining_share=1 / 3)["total"] == 0


def test_failed_batches_page_reads_the_state_index_not_the_whole_partition(tmp_path):
    """With ``ORDER BY batch_id LIMIT`` SQLite walked the primary key over every row of the
    partition (0.55-0.62 s a page on a 1M-event partition); the page must come from the
    ``(partition, state)`` index and still be in batch id order."""
    engine = make_engine(f"sqlite:///{tmp_path}/state.db")
    DeliveryLedger(engine).ensure_schema()
    rows = [_ledger_row("2026-11-30", n, "failed" if n % 50 == 7 else "acknowledged", 1, 1, n) for n in range(2_000)]
    with engine.begin() as connection:
        connection.execute(sa.insert(ledger_table), rows)
        connection.exec_driver_sql("ANALYZE")  # the planner's statistics, as on a long-lived database
    statements: list[tuple[str, tuple]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if "ORDER BY" in statement:
            statements.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", capture)
    page = reads.failed_batches(engine, "2026-11-30", limit=3, offset=2)
    sa.event.remove(engine, "before_cursor_execute", capture)

    expected = sorted(r["batch_id"] for r in rows if r["state"] == "failed")
    assert page["total"] == 40 and [b["batch_id"] for b in page["batches"]] == expected[2:5]
    (statement, parameters), = statements
    with engine.connect() as connection:
        plan = " | ".join(str(row[-1]) for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters))
    engine.dispose()
    assert "ix_capi_delivery_ledger_partition_state" in plan, plan
    assert "sqlite_autoindex" not in plan, plan
