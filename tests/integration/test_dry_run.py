"""Dry run end to end: the plan a real run would send, nothing sent, no state changed.

Real Airflow runs (``dag.test()``), the stand-in over real HTTP, a real SQLite state database.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections import Counter
from pathlib import Path

import pytest

from capi_devtools.sample_partition import stage_sample_partition
from tests.support.conversions_run import (
    SAMPLE_REJECTED_COUNT,
    configure_pipeline,
    output_json,
    output_jsonl,
    received_events,
    run_conversions,
    sample_valid_event_ids,
    yesterday,
)

pytestmark = pytest.mark.airflow

STATE_TABLES = ("capi_delivery_ledger", "capi_envelope_store", "capi_held_conversions")


def state_rows(state_db: Path) -> dict[str, list[tuple]]:
    """Every row of the ledger, the envelope store and the held table (absent tables: no rows)."""
    rows: dict[str, list[tuple]] = {}
    with sqlite3.connect(state_db) as connection:
        present = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for table in STATE_TABLES:
            rows[table] = sorted(connection.execute(f"SELECT * FROM {table}")) if table in present else []
    return rows


def add_user_with_a_stale_and_a_fresh_envelope(landing: Path, partition: str) -> tuple[str, str]:
    """Two events of one user: the earlier carries an envelope issued 60 days ago (expired), the
    later a fresh one. A real run upserts the fresh one in validate and sends the earlier event
    with it; a dry run must plan the same, without touching the store."""
    day = int(dt.datetime.fromisoformat(partition).replace(tzinfo=dt.UTC).timestamp())
    events = []
    for n, (issued, envelope) in enumerate(((day - 60 * 86400, "AjfowMv4ZHZQJFM_stale"), (day + 7000, "AjfowMv4ZHZQJFM_fresh"))):
        events.append(
            {
                "event_manager": ["tiktok"],
                "event_id": f"dry-{n}",
                "event_type": "CompletePayment",
                "event_time": day + 7200 + n * 4000,
                "event_source_url": "https://shop.example/p/1",
                "user_data": {"partner_id": envelope},
                "custom_data": [{"key": "currency", "value": "EUR"}, {"key": "value", "value": "10.00"}],
                "user_key": "uk-dry-run",
                "envelope_issued_at": issued,
            }
        )
    (landing / f"dt={partition}" / "dry-run-user.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return events[0]["event_id"], events[1]["event_id"]


def test_dry_run_plans_what_the_next_real_run_sends_and_sends_nothing(airflow_db, standin, tmp_path, monkeypatch):
    partition = yesterday()
    configure_pipeline(monkeypatch, tmp_path, standin)
    stage_sample_partition(tmp_path / "landing", partition)
    stale_event, _ = add_user_with_a_stale_and_a_fresh_envelope(tmp_path / "landing", partition)
    valid = sample_valid_event_ids() | {"dry-0", "dry-1"}
    out = tmp_path / "output" / f"dt={partition}"

    assert run_conversions(partition, dry_run=True) == "success"

    assert standin.stats()["requests"] == 0
    assert standin.received() == []
    before = state_rows(tmp_path / "state.db")
    assert before == {table: [] for table in STATE_TABLES}, "a dry run writes no ledger, envelope or held row"
    # The real deliverables do not exist; the dry run's sit under dry_run/.
    assert not (out / "summary.json").exists() and not (out / "rejected.jsonl").exists()
    summary = output_json(tmp_path, partition, "dry_run/summary.json")
    assert summary["dry_run"] is True and summary["status"] == "planned"
    assert all(summary["checks"].values())
    assert summary["valid"] == len(valid) and summary["rejected"] == SAMPLE_REJECTED_COUNT
    assert summary["envelope_expired_events"] == 0, "the stale envelope is replaced by the partition's fresh one"
    assert summary["envelope_replaced_events"] >= 1
    rejects = output_jsonl(tmp_path, partition, "dry_run/rejected.jsonl")
    assert len(rejects) == SAMPLE_REJECTED_COUNT
    plan = output_jsonl(tmp_path, partition, "dry_run/plan.jsonl")
    assert set(plan[0]) == {"shard", "batch_id", "events"}, "the plan holds no identifier"
    assert "AjfowMv4ZHZQJFM" not in (out / "dry_run" / "plan.jsonl").read_text()
    assert sum(line["events"] for line in plan) == summary["planned_events"] == len(valid)
    assert len(plan) == summary["planned_batches"]
    assert summary["by_shard"] == {
        str(shard): {"batches": n, "events": sum(line["events"] for line in plan if line["shard"] == shard)}
        for shard, n in Counter(line["shard"] for line in plan).items()
    }

    assert run_conversions(partition, dry_run=False) == "success"

    batches = standin.received()
    events = received_events(batches)
    ids = Counter(event["event_id"] for event in events)
    assert set(ids) == valid and max(ids.values()) == 1
    # The plan's batches and their sizes are what the real run sent.
    assert len(batches) == len(plan)
    assert sorted(len(batch["events"]) for batch in batches) == sorted(line["events"] for line in plan)
    real = output_json(tmp_path, partition, "summary.json")
    assert real["status"] == "complete" and real["batches"] == summary["planned_batches"]
    assert real["delivered_this_run"] == summary["planned_events"]
    assert real["envelope_replaced_events"] == summary["envelope_replaced_events"]
    sent_stale = next(e for e in events if e["event_id"] == stale_event)
    assert sent_stale["user_data"]["partner_id"].endswith("_fresh")
    # The real run's files did not replace the dry run's record, nor the other way round.
    assert output_json(tmp_path, partition, "dry_run/summary.json") == summary
    after = state_rows(tmp_path / "state.db")
    assert after["capi_delivery_ledger"] and after["capi_envelope_store"]


def test_dry_run_after_a_partial_delivery_plans_only_the_remainder(airflow_db, standin, tmp_path, monkeypatch):
    partition = yesterday()
    configure_pipeline(monkeypatch, tmp_path, standin)
    stage_sample_partition(tmp_path / "landing", partition)
    refused = sorted(i for i in sample_valid_event_ids() if i.startswith("app-"))[0]
    standin.config(reject_event_ids=[refused])
    assert run_conversions(partition, dry_run=False) == "failed"
    failed_summary = output_json(tmp_path, partition, "summary.json")
    before = state_rows(tmp_path / "state.db")
    standin.config(reject_event_ids=[])
    standin.reset()

    assert run_conversions(partition, dry_run=True) == "success"

    assert standin.stats()["requests"] == 0
    assert state_rows(tmp_path / "state.db") == before
    assert output_json(tmp_path, partition, "summary.json") == failed_summary, "the real summary stays"
    # The failed run's own work stays: clearing its failed tasks after a dry run still finds its shards.
    from liveramp_capi.storage.layout import PartitionLayout, run_key

    failed_run = PartitionLayout(partition, run_key(failed_summary["run_id"]))
    assert (tmp_path / "output" / failed_run.folder / failed_run.validation).exists()
    summary = output_json(tmp_path, partition, "dry_run/summary.json")
    plan = output_jsonl(tmp_path, partition, "dry_run/plan.jsonl")
    assert summary["planned_events"] == failed_summary["failed_events"]
    assert summary["previously_delivered_events"] == failed_summary["delivered_events"]

    assert run_conversions(partition, dry_run=False) == "success"

    batches = standin.received()
    assert sorted(len(b["events"]) for b in batches) == sorted(line["events"] for line in plan)
    assert len(batches) == len(plan) == 1
