"""Extract, validate and report as plain Python: real files, a real SQLite state database, no Airflow DB."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

from liveramp_capi.pipeline.config import SettingError, ValidateConfig
from liveramp_capi.pipeline.errors import PermanentStepFailure
from liveramp_capi.pipeline.extract import extract_partition
from liveramp_capi.pipeline.report import report_partition
from liveramp_capi.pipeline.validate import RejectedShareExceeded, validate_partition
from liveramp_capi.storage import PartitionStorage
from tests.pipeline.pipeline_support import PARTITION, REFERENCE_TIME, LeaseOwnership, stage, web_event


def config(**settings: object) -> ValidateConfig:
    return ValidateConfig.parse({"reference_time": REFERENCE_TIME, **settings})


def output(tmp_path: Path, relative: str) -> Path:
    return tmp_path / "output" / f"dt={PARTITION}" / relative


def stage_partition(tmp_path: Path) -> None:
    stage(tmp_path / "landing", "web.jsonl", [
        *(web_event(i, f"user-{i % 3}") for i in range(30)),
        web_event(40, "user-0", event_type=None),  # rejected: event_type must be a string
        web_event(1, "user-1"),  # a duplicate event_id
    ])


def test_validate_writes_shards_rejects_and_the_envelope_store(tmp_path, storage, envelope_store, lease) -> None:
    stage_partition(tmp_path)
    manifest = extract_partition(storage)
    assert manifest.brief()["files"] == 1

    with LeaseOwnership(lease, "dag/run-1").keeper() as claim:
        result = validate_partition(config(), storage, envelope_store, claim)

    validation = result.validation
    assert (validation["read"], validation["valid"], validation["rejected"], validation["duplicates"]) == (32, 30, 1, 1)
    assert validation["read"] == validation["valid"] + validation["rejected"] + validation["duplicates"]
    assert sum(validation["shard_events"]) == 30
    assert result.shards == [i for i, n in enumerate(validation["shard_events"]) if n]
    assert json.loads(output(tmp_path, storage.layout.validation).read_text()) == validation
    rejects = [orjson.loads(line) for line in output(tmp_path, "rejected.jsonl").read_bytes().splitlines()]
    assert [(r["file"], r["line"]) for r in rejects] == [("web.jsonl", 31)]
    # Every user's newest envelope reached the store.
    assert validation["envelope_store_upserts"] > 0
    assert set(envelope_store.resolve({"user-0", "user-1", "user-2"}, now=REFERENCE_TIME)) == {
        "user-0", "user-1", "user-2"
    }


def test_a_dry_run_leaves_the_store_alone_and_publishes_under_dry_run(tmp_path, storage, envelope_store, lease) -> None:
    stage_partition(tmp_path)
    extract_partition(storage)

    with LeaseOwnership(lease, "dag/run-1").keeper() as claim:
        result = validate_partition(config(dry_run=True), storage, envelope_store, claim)

    assert result.validation["dry_run"] is True and result.validation["envelope_store_upserts"] == 0
    assert envelope_store.resolve({"user-0"}, now=REFERENCE_TIME) == {}
    assert output(tmp_path, "dry_run/rejected.jsonl").exists()
    assert not output(tmp_path, "rejected.jsonl").exists()
    assert output(tmp_path, storage.layout.envelope_overlay).read_bytes().count(b"\n") == 3


def test_too_many_rejects_fail_after_the_rejects_are_published(tmp_path, storage, envelope_store, lease) -> None:
    stage_partition(tmp_path)
    extract_partition(storage)

    with LeaseOwnership(lease, "dag/run-1").keeper() as claim, pytest.raises(RejectedShareExceeded) as failed:
        validate_partition(config(max_invalid_ratio="0.01"), storage, envelope_store, claim)

    assert "1 of 32 records rejected" in str(failed.value) and "max_invalid_ratio 1.0%" in str(failed.value)
    assert failed.value.result.validation["rejected_ratio_exceeded"] is True
    assert output(tmp_path, "rejected.jsonl").exists()


def test_a_malformed_setting_names_its_variable() -> None:
    with pytest.raises(SettingError, match=r"max_invalid_ratio \(Variable capi_max_invalid_ratio\) .*'5%'"):
        ValidateConfig.parse({"max_invalid_ratio": "5%"})
    with pytest.raises(SettingError, match=r"events_per_shard \(Variable capi_events_per_shard\)"):
        ValidateConfig.parse({"events_per_shard": "0"})
    defaults = ValidateConfig.parse({"reference_time": REFERENCE_TIME})
    assert (defaults.max_invalid_ratio, defaults.max_event_age_days, defaults.events_per_shard) == (0.05, 28, 100_000)
    assert defaults.allow_custom_events is False and defaults.dry_run is False


def test_an_empty_partition_fails_extract(tmp_path, storage) -> None:
    (tmp_path / "landing" / f"dt={PARTITION}").mkdir(parents=True)
    with pytest.raises(PermanentStepFailure, match="holds no input files"):
        extract_partition(storage)
    assert extract_partition(storage, allow_empty=True).brief()["files"] == 0


def test_report_of_a_validated_partition_with_nothing_sent_is_incomplete(
    tmp_path, roots, storage, envelope_store, lease
) -> None:
    stage_partition(tmp_path)
    extract_partition(storage)
    ownership = LeaseOwnership(lease, "dag/run-1")
    with ownership.keeper() as claim:
        validate_partition(config(), storage, envelope_store, claim)

    reporting = PartitionStorage(None, roots["output_root"], PARTITION, "manual__run-1")
    with pytest.raises(PermanentStepFailure, match=f"partition {PARTITION} is incomplete"):
        report_partition(reporting, ownership, dry_run=False, run_id="manual__run-1", unfinished_tasks={})

    summary = json.loads(output(tmp_path, "summary.json").read_text())
    assert summary["status"] == "incomplete" and summary["valid"] == 30 and summary["delivered_this_run"] == 0
    assert output(tmp_path, "failed.jsonl").read_bytes() == b""
    # The claim was given back: another run takes the partition at once.
    assert LeaseOwnership(lease, "dag/run-2").claim().acquired


def test_report_of_a_run_that_read_nothing_publishes_nothing(tmp_path, roots, lease) -> None:
    storage = PartitionStorage(None, roots["output_root"], PARTITION, "manual__run-1")
    ownership = LeaseOwnership(lease, "dag/run-1")
    ownership.claim()

    with pytest.raises(PermanentStepFailure, match="was not processed by this run .wait_for_partition failed"):
        report_partition(storage, ownership, dry_run=False, run_id="manual__run-1",
                         unfinished_tasks={"wait_for_partition": "failed"})

    assert not output(tmp_path, "summary.json").exists()
    run_summary = json.loads(output(tmp_path, storage.layout.work("summary.json")).read_text())
    assert run_summary["status"] == "not_processed"
    assert LeaseOwnership(lease, "dag/run-2").claim().acquired


def test_report_of_a_run_that_lost_the_partition_leaves_its_files(tmp_path, storage, envelope_store, lease) -> None:
    stage_partition(tmp_path)
    extract_partition(storage)
    with LeaseOwnership(lease, "dag/run-1").keeper() as claim:
        validate_partition(config(), storage, envelope_store, claim)
    lease.release(PARTITION, "dag/run-1")
    LeaseOwnership(lease, "dag/run-2").claim()

    with pytest.raises(PermanentStepFailure, match="being delivered by"):
        report_partition(storage, LeaseOwnership(lease, "dag/run-1"), dry_run=False, run_id="manual__run-1",
                         unfinished_tasks={})

    assert not output(tmp_path, "summary.json").exists()
    assert output(tmp_path, storage.layout.work("summary.json")).exists()
