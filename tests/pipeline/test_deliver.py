"""The send step as plain Python: shards delivered over real HTTP to the stand-in, through a real SQLite ledger."""

from __future__ import annotations

import json
import random

import pytest

from liveramp_capi.delivery.sender import BatchSender
from liveramp_capi.delivery.settings import CapiSettings
from liveramp_capi.pipeline.config import ValidateConfig
from liveramp_capi.pipeline.deliver import ConfigurationRefused, ShardConfig, deliver_shard, plan_shard
from liveramp_capi.pipeline.extract import extract_partition
from liveramp_capi.pipeline.report import report_partition
from liveramp_capi.pipeline.validate import validate_partition
from liveramp_capi.state.held_store import HeldConversions
from liveramp_capi.state.ledger import DeliveryLedger
from tests.pipeline.pipeline_support import (
    ENVELOPE,
    PARTITION,
    REFERENCE_TIME,
    LeaseOwnership,
    stage,
    web_event,
)

FAST = CapiSettings(concurrency=8, timeout_seconds=3, max_attempts=3, backoff_base_seconds=0.01,
                    backoff_max_seconds=0.05, verify_tls=True)
RUN = "manual__run-1"


def events() -> list[dict]:
    """40 events of 4 users, each user with an envelope of its own (a session each)."""
    return [web_event(i, f"user-{i % 4}", user_data={"partner_id": f"{ENVELOPE[:-1]}{i % 4}"}) for i in range(40)]


@pytest.fixture
def validated(tmp_path, storage, envelope_store, lease):
    """A partition of 40 valid events over 4 users, extracted and validated by run 1 (which holds the claim)."""
    stage(tmp_path / "landing", "web.jsonl", events())
    extract_partition(storage)
    ownership = LeaseOwnership(lease, "dag/run-1")
    ownership.claim()
    config = ValidateConfig.parse({"reference_time": REFERENCE_TIME, "events_per_shard": "15"})
    with ownership.keeper() as claim:
        shards = validate_partition(config, storage, envelope_store, claim).shards
    return ownership, shards


@pytest.fixture
def ledger(engine):
    ledger = DeliveryLedger(engine)
    ledger.ensure_schema()
    return ledger


@pytest.fixture
def held(engine):
    held = HeldConversions(engine)
    held.ensure_schema()
    return held


def deliver_all(standin, storage, ledger, envelope_store, held, ownership, shards, *, try_number=1, config_id=None):
    sender = BatchSender(standin.url, config_id or standin.config_id, FAST, rng=random.Random(1))
    with ownership.keeper() as claim:
        return [
            deliver_shard(ShardConfig(shard, 50, "liveramp_capi_default"), storage, ledger, envelope_store, held,
                          sender.deliver_sync, claim, airflow_run_id=RUN, try_number=try_number)
            for shard in shards
        ]


def test_every_event_is_delivered_once_and_the_report_adds_up(
    standin, roots, storage, ledger, envelope_store, held, validated
) -> None:
    ownership, shards = validated
    assert len(shards) > 1, "the partition is cut into several shards"

    done = deliver_all(standin, storage, ledger, envelope_store, held, ownership, shards)

    assert sum(d.result["delivered_this_run_events"] for d in done) == 40
    assert sorted(standin.received_event_ids()) == sorted(f"web-{i}" for i in range(40))
    assert all(d.brief()["failed_events"] == 0 for d in done)
    # A second try of the same run sends nothing: the ledger knows every batch was acknowledged.
    again = deliver_all(standin, storage, ledger, envelope_store, held, ownership, shards, try_number=2)
    assert len(standin.received_event_ids()) == 40
    assert sum(d.result["delivered_earlier_tries_events"] for d in again) == 40

    report = report_partition(storage, ownership, dry_run=False, run_id=RUN, unfinished_tasks={})
    assert report.brief()["status"] == "complete" and report.brief()["delivered_this_run"] == 40
    summary_path = storage.output_dir / "summary.json"
    assert json.loads(summary_path.read_text())["checks"] == report.summary["checks"]


def test_a_dry_run_plans_the_batches_and_sends_nothing(
    standin, storage, ledger, envelope_store, held, tmp_path, lease
) -> None:
    stage(tmp_path / "landing", "web.jsonl", events())
    extract_partition(storage)
    ownership = LeaseOwnership(lease, "dag/run-1")
    config = ValidateConfig.parse({"reference_time": REFERENCE_TIME, "dry_run": "true"})
    with ownership.keeper() as claim:
        shards = validate_partition(config, storage, envelope_store, claim).shards

    planned = [plan_shard(ShardConfig(shard, 50, "c", dry_run=True), storage, ledger, envelope_store, held)
               for shard in shards]

    assert sum(p.brief()["planned_events"] for p in planned) == 40
    assert standin.received_event_ids() == []
    report = report_partition(storage, ownership, dry_run=True, run_id=RUN, unfinished_tasks={})
    assert report.brief()["status"] == "planned" and report.brief()["planned_events"] == 40
    assert (tmp_path / "output" / f"dt={PARTITION}" / "dry_run" / "plan.jsonl").exists()
    assert not (tmp_path / "output" / f"dt={PARTITION}" / "summary.json").exists()


def test_an_unknown_configuration_id_stops_at_the_first_404(
    standin, storage, ledger, envelope_store, held, validated
) -> None:
    ownership, shards = validated
    standin.config(config_ids=["cfg-some-other"])

    with pytest.raises(ConfigurationRefused, match="does not know the ATS configuration ID in connection") as refused:
        deliver_all(standin, storage, ledger, envelope_store, held, ownership, shards[:1])

    assert refused.value.done.result["delivered_events"] == 0
    assert standin.received_event_ids() == []
