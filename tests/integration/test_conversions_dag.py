"""``tiktok_conversions`` end to end: real Airflow runs (dag.test on a migrated metadata DB), the
local stand-in over real HTTP, a real SQLite ledger, and the sample partition on local storage."""

from __future__ import annotations

from collections import Counter

import pytest

from capi_devtools.sample_partition import stage_sample_partition
from tests.support.conversions_run import (
    SAMPLE_DUPLICATES,
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


def _session_of(event: dict) -> tuple:
    user = event["user_data"]
    return (user["partner_id"], user.get("idfa"), user.get("idfv"), user.get("gaid"))


def test_sample_partition_is_delivered_exactly_once_in_session_batches(airflow_db, standin, tmp_path, monkeypatch):
    partition = yesterday()
    configure_pipeline(monkeypatch, tmp_path, standin)
    stage_sample_partition(tmp_path / "landing", partition)

    assert run_conversions(partition) == "success"

    batches = standin.received()
    events = received_events(batches)
    ids = Counter(event["event_id"] for event in events)
    assert set(ids) == sample_valid_event_ids()
    assert max(ids.values()) == 1, "an event was delivered twice"
    for batch in batches:
        # One session per batch: one identity, and within it event_time order.
        assert len({_session_of(e) for e in batch["events"]}) == 1
        times = [e["event_time"] for e in batch["events"]]
        assert times == sorted(times)
        assert len(batch["events"]) <= 50
        for event in batch["events"]:
            # Pipeline-only fields never leave the pipeline.
            assert not {"session_id", "user_key", "envelope_issued_at", "consent", "client_ip"} & set(event)
    summary = output_json(tmp_path, partition, "summary.json")
    assert summary["status"] == "complete"
    assert summary["rejected"] == SAMPLE_REJECTED_COUNT
    assert summary["duplicates"] == SAMPLE_DUPLICATES
    assert summary["valid"] == summary["delivered_events"] == len(ids)
    assert summary["read"] == summary["valid"] + summary["rejected"] + summary["duplicates"]
    assert summary["batches"] == len(batches)
    assert all(summary["checks"].values())
    rejects = output_jsonl(tmp_path, partition, "rejected.jsonl")
    assert len(rejects) == SAMPLE_REJECTED_COUNT
    for reject in rejects:
        assert reject["file"] and reject["reason"] and "pointer" in reject and "line" in reject
    by_id = {r["event_id"]: r for r in rejects}
    assert "milliseconds" in by_id["bad-ms"]["reason"]
    assert by_id["bad-ms"]["pointer"] == "/event_time"


def test_rerun_after_a_refused_batch_delivers_only_the_remainder(airflow_db, standin, tmp_path, monkeypatch):
    partition = yesterday()
    configure_pipeline(monkeypatch, tmp_path, standin)
    stage_sample_partition(tmp_path / "landing", partition)
    valid = sample_valid_event_ids()
    refused = sorted(i for i in valid if i.startswith("app-"))[0]
    standin.config(reject_event_ids=[refused])

    assert run_conversions(partition) == "failed"

    first = received_events(standin.received())
    failed = output_jsonl(tmp_path, partition, "failed.jsonl")
    assert len(failed) == 1 and refused in failed[0]["event_ids"]
    assert failed[0]["http_status"] == 400 and failed[0]["response_excerpt"]
    # The refusal's body is kept (the stand-in names the event), and it is a permanent verdict.
    assert "invalid event" in failed[0]["response_excerpt"] and refused in failed[0]["response_excerpt"]
    assert failed[0]["permanent"] is True and failed[0]["attempts"] == 1
    assert standin.config_id not in failed[0]["response_excerpt"]
    refused_batch = set(failed[0]["event_ids"])
    assert {e["event_id"] for e in first} == valid - refused_batch
    summary = output_json(tmp_path, partition, "summary.json")
    assert summary["status"] == "incomplete"
    assert summary["failed_events"] == len(refused_batch)
    assert summary["valid"] == summary["delivered_events"] + summary["failed_events"]

    standin.config(reject_event_ids=[])
    standin.reset()
    assert run_conversions(partition) == "success"

    second = received_events(standin.received())
    assert Counter(e["event_id"] for e in second) == Counter(refused_batch), "the rerun must send exactly the failed batch"
    summary = output_json(tmp_path, partition, "summary.json")
    assert summary["status"] == "complete"
    assert summary["delivered_this_run"] == len(refused_batch)
    assert summary["previously_delivered_events"] == len(valid) - len(refused_batch)
    assert output_jsonl(tmp_path, partition, "failed.jsonl") == []
