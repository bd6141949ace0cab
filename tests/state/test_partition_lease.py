"""The partition lease on SQLite and PostgreSQL: one owner at a time, renewals, lapses, releases, races."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from liveramp_capi.state.lease import LeaseKeeper, PartitionHeld, PartitionLease, lease_table

P = "2026-11-20"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def engine(state_engine: sa.Engine) -> sa.Engine:
    """An empty state database (``tests/state/conftest.py``), both backends."""
    return state_engine


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def lease(engine: sa.Engine, clock: Clock) -> PartitionLease:
    lease = PartitionLease(engine, ttl_seconds=60, clock=clock)
    lease.ensure_schema()
    return lease


def test_first_claim_is_granted_and_a_second_run_is_refused(lease: PartitionLease) -> None:
    first = lease.acquire(P, "dag/run-a", "claim_partition try 1 on host-a")
    second = lease.acquire(P, "dag/run-b", "claim_partition try 1 on host-b")

    assert first.acquired and first.owner == "dag/run-a"
    assert not second.acquired
    assert second.owner == "dag/run-a"
    assert "run dag/run-a (claim_partition try 1 on host-a" in str(PartitionHeld(second, lease.clock()))


def test_other_partitions_are_independent(lease: PartitionLease) -> None:
    assert lease.acquire(P, "dag/run-a", "h").acquired
    assert lease.acquire("2026-11-21", "dag/run-b", "h").acquired


def test_renewal_by_the_owner_moves_the_expiry_but_keeps_the_acquisition_time(
    lease: PartitionLease, clock: Clock
) -> None:
    first = lease.acquire(P, "dag/run-a", "claim")
    clock.now += 45
    renewed = lease.acquire(P, "dag/run-a", "send[0] try 1")
    clock.now += 45  # 90 s after the first claim, 45 s after the renewal: still held

    assert renewed.acquired
    assert renewed.expires_at == first.expires_at + 45
    assert not lease.acquire(P, "dag/run-b", "claim").acquired
    with lease.engine.connect() as connection:
        acquired_at = connection.execute(sa.select(lease_table.c.acquired_at)).scalar_one()
    assert acquired_at == first.heartbeat_at


def test_a_lapsed_claim_is_taken_over(lease: PartitionLease, clock: Clock) -> None:
    lease.acquire(P, "dag/killed-run", "send[3] try 1")
    clock.now += 60  # exactly the time to live: lapsed

    taken = lease.acquire(P, "dag/run-b", "claim")

    assert taken.acquired and taken.owner == "dag/run-b"
    assert not lease.acquire(P, "dag/killed-run", "send[3] try 2").acquired


def test_a_released_claim_is_free_at_once_and_release_needs_the_owner(lease: PartitionLease) -> None:
    lease.acquire(P, "dag/run-a", "claim")

    assert not lease.release(P, "dag/run-b")
    assert not lease.acquire(P, "dag/run-b", "claim").acquired
    assert lease.release(P, "dag/run-a")
    assert lease.acquire(P, "dag/run-b", "claim").acquired
    state = lease.read(P)
    assert state is not None and state.owner == "dag/run-b" and not state.released


def test_take_over_from_an_ended_run_only(lease: PartitionLease) -> None:
    lease.acquire(P, "dag/run-a", "claim")

    assert not lease.acquire(P, "dag/run-c", "claim", take_over_from="dag/run-b").acquired
    assert lease.acquire(P, "dag/run-c", "claim", take_over_from="dag/run-a").acquired


def test_read_of_a_never_claimed_partition_is_none(lease: PartitionLease) -> None:
    assert lease.read(P) is None


def test_ensure_schema_is_idempotent(lease: PartitionLease) -> None:
    lease.ensure_schema()
    lease.ensure_schema()
    assert lease.acquire(P, "dag/run-a", "claim").acquired


def test_ttl_must_be_positive(engine: sa.Engine) -> None:
    with pytest.raises(ValueError, match="time to live must be positive"):
        PartitionLease(engine, ttl_seconds=0)


def test_many_runs_racing_for_one_partition_get_exactly_one_winner(engine: sa.Engine) -> None:
    """Eight threads, each its own connection, claim at the same instant: one wins, all agree who."""
    PartitionLease(engine, ttl_seconds=600).ensure_schema()
    start = threading.Barrier(8)
    results: dict[str, object] = {}

    def claim(owner: str) -> None:
        lease = PartitionLease(engine, ttl_seconds=600)
        start.wait()
        results[owner] = lease.acquire(P, owner, "claim")

    threads = [threading.Thread(target=claim, args=(f"dag/run-{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    winners = [owner for owner, state in results.items() if state.acquired]  # type: ignore[attr-defined]
    assert len(results) == 8
    assert len(winners) == 1
    assert {state.owner for state in results.values()} == set(winners)  # type: ignore[attr-defined]


def _wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    done = threading.Event()
    deadline = threading.Timer(timeout, done.set)
    deadline.start()
    try:
        while not done.is_set():
            if condition():
                return True
            done.wait(0.02)
        return condition()
    finally:
        deadline.cancel()


def test_keeper_renews_in_the_background_and_notices_a_takeover(lease: PartitionLease, clock: Clock) -> None:
    lease.acquire(P, "dag/run-a", "send[0]")
    with LeaseKeeper(lease, P, "dag/run-a", "send[0]", interval_seconds=0.05) as keeper:
        first_heartbeat = lease.read(P).heartbeat_at  # type: ignore[union-attr]
        clock.now += 30
        assert _wait_until(lambda: lease.read(P).heartbeat_at > first_heartbeat)  # type: ignore[union-attr]
        keeper.ensure_held()

        # The claim lapses (e.g. the database was unreachable for a whole ttl) and run-b takes it.
        with lease.engine.begin() as connection:
            connection.execute(sa.update(lease_table).values(expires_at=clock.now - 1))
        assert lease.acquire(P, "dag/run-b", "claim").acquired
        assert _wait_until(lambda: keeper.lost_to is not None)

        with pytest.raises(PartitionHeld, match="being delivered by run dag/run-b"):
            keeper.ensure_held()
