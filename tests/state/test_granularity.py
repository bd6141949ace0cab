"""One granularity per landing feed: a day and its hours are never both delivered (real SQLite state DB)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from liveramp_capi.domain.batches import Batch
from liveramp_capi.domain.partition import MIXED_GRANULARITY_VARIABLE
from liveramp_capi.state.database import make_engine
from liveramp_capi.state.granularity import (
    MixedGranularity,
    check_one_granularity,
    overlapping_partitions,
)
from liveramp_capi.state.lease import PartitionLease
from liveramp_capi.state.ledger import DeliveryLedger

DAY = "2026-11-20"
NOW = 1_800_000_000.0


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[sa.Engine]:
    engine = make_engine(f"sqlite:///{tmp_path}/state.db")
    yield engine
    engine.dispose()


@pytest.fixture
def lease(engine: sa.Engine) -> PartitionLease:
    lease = PartitionLease(engine, ttl_seconds=600, clock=lambda: NOW)
    lease.ensure_schema()
    return lease


def _deliver(engine: sa.Engine, partition: str) -> None:
    ledger = DeliveryLedger(engine)
    ledger.ensure_schema()
    batch = Batch("ab" * 16, 7, ("e1", "e2"), b"{}")
    ledger.mark_in_flight(partition, [batch], "run-x")
    ledger.record_acknowledged(partition, [(batch, 1)], "run-x")


def _check(engine: sa.Engine, lease: PartitionLease, partition: str, **kwargs: bool) -> None:
    check_one_granularity(engine, partition, lease.read, f"dag/{partition}-run", NOW, **kwargs)


def test_the_other_granularity_of_a_day_and_of_an_hour():
    assert overlapping_partitions(f"{DAY}T13") == [DAY]
    hours = overlapping_partitions(DAY)
    assert len(hours) == 24 and hours[0] == f"{DAY}T00" and hours[-1] == f"{DAY}T23"


def test_a_fresh_state_database_refuses_nothing(engine, lease):
    # No ledger table yet: the first run ever on this database.
    _check(engine, lease, f"{DAY}T13")
    _check(engine, lease, DAY)


def test_an_hour_of_a_delivered_day_is_refused_with_the_way_out(engine, lease):
    _deliver(engine, DAY)
    with pytest.raises(MixedGranularity) as refused:
        _check(engine, lease, f"{DAY}T13")
    message = str(refused.value)
    assert f"partition {DAY}T13 not delivered" in message and f"{DAY}: 1 batches in the ledger" in message
    assert MIXED_GRANULARITY_VARIABLE in message and "Nothing was read or sent" in message
    # Other days and other hours' days are not concerned; the Variable lets it through.
    _check(engine, lease, "2026-11-21T13")
    _check(engine, lease, f"{DAY}T13", allowed=True)


def test_a_day_whose_hours_were_delivered_is_refused(engine, lease):
    _deliver(engine, f"{DAY}T05")
    _deliver(engine, f"{DAY}T06")
    with pytest.raises(MixedGranularity, match=rf"{DAY}T05: 1 batches in the ledger; {DAY}T06: 1 batches"):
        _check(engine, lease, DAY)
    _check(engine, lease, "2026-11-19")


def test_a_live_claim_of_the_other_granularity_refuses_and_a_finished_one_without_batches_does_not(engine, lease):
    lease.acquire(DAY, "tiktok_conversions/manual__day", "claim_partition try 1 on host")
    with pytest.raises(MixedGranularity, match=f"{DAY}: being delivered by run tiktok_conversions/manual__day"):
        _check(engine, lease, f"{DAY}T13")
    # That run ended without sending anything (no valid event): nothing to double-send.
    lease.release(DAY, "tiktok_conversions/manual__day")
    _check(engine, lease, f"{DAY}T13")


def test_of_two_runs_racing_on_a_day_and_its_hour_the_later_one_is_refused(engine, lease):
    hour_run, day_run = "tiktok_conversions_hourly/h", "tiktok_conversions/d"
    assert lease.acquire(f"{DAY}T13", hour_run, "claim").acquired
    check_one_granularity(engine, f"{DAY}T13", lease.read, hour_run, NOW)  # nothing else yet: goes on
    assert lease.acquire(DAY, day_run, "claim").acquired
    with pytest.raises(MixedGranularity, match=f"being delivered by run {hour_run}"):
        check_one_granularity(engine, DAY, lease.read, day_run, NOW)
