"""One granularity per landing feed: a day and its hours are never both delivered.

The daily and the hourly DAG read the same landing root, and the ledger keys batches by
partition name: events exported once as ``dt=2026-11-20`` and again as ``dt=2026-11-20T13``
would be sent twice, once per name. So a run that has claimed its partition checks the other
granularity's partitions of the same day (the day for an hour; the 24 hours for a day) and
refuses to go on when one of them has batches in the ledger or is claimed by a live run.

Checked after this run's own claim is taken: of two runs racing on a day and one of its hours,
at least the later one sees the other's claim, so they never both send (both may refuse).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from liveramp_capi.domain.partition import HOURLY, MIXED_GRANULARITY_VARIABLE, partition_granularity
from liveramp_capi.state.ledger import ledger_table


class Claim(Protocol):
    """What the check needs of a stored partition claim (``state.lease.LeaseState``)."""

    owner: str
    expires_at: float
    released: bool


class MixedGranularity(RuntimeError):
    """The partition's day is delivered at the other granularity too."""


@dataclass(frozen=True, slots=True)
class Overlap:
    """A partition of the other granularity on the same day that is, or was, being delivered."""

    partition: str
    ledger_batches: int
    live_claim_owner: str | None


def overlapping_partitions(partition: str) -> list[str]:
    """The other granularity's partitions of ``partition``'s day: the day of an hour, the hours of a day."""
    day = partition[:10]
    if partition_granularity(partition) == HOURLY:
        return [day]
    return [f"{day}T{hour:02d}" for hour in range(24)]


def ledger_batches(engine: Engine, partitions: list[str]) -> dict[str, int]:
    """Batches the ledger holds per partition (any state: each was at least put on the wire)."""
    query = (
        sa.select(ledger_table.c.partition, sa.func.count())
        .where(ledger_table.c.partition.in_(partitions))
        .group_by(ledger_table.c.partition)
    )
    with engine.connect() as connection:
        if not sa.inspect(connection).has_table(ledger_table.name):
            return {}  # a state database no run has sent from yet
        return {str(name): int(count) for name, count in connection.execute(query)}


def find_overlaps(
    engine: Engine, partition: str, read_claim: Callable[[str], Claim | None], owner: str, now: float
) -> list[Overlap]:
    """The other granularity's partitions of the same day with ledger batches or a live claim.

    :param read_claim: the stored claim of a partition (``PartitionLease.read``).
    :param owner: this run's claim owner: its own claims never count.
    :param now: Unix seconds, to tell a live claim from a lapsed one.
    """
    others = overlapping_partitions(partition)
    batches = ledger_batches(engine, others)
    found = []
    for other in others:
        claim = read_claim(other)
        live = claim is not None and not claim.released and claim.expires_at > now and claim.owner != owner
        if batches.get(other) or live:
            found.append(Overlap(other, batches.get(other, 0), claim.owner if live and claim else None))
    return found


def refusal(partition: str, overlaps: list[Overlap]) -> str:
    """The message of a refused run: what overlaps, why it matters, and the two ways out."""
    described = "; ".join(
        f"{o.partition}: "
        + ", ".join(
            part
            for part in (
                f"{o.ledger_batches} batches in the ledger" if o.ledger_batches else "",
                f"being delivered by run {o.live_claim_owner}" if o.live_claim_owner else "",
            )
            if part
        )
        for o in overlaps[:3]
    )
    more = f" (and {len(overlaps) - 3} more)" if len(overlaps) > 3 else ""
    return (
        f"partition {partition} not delivered: the same day is delivered at the other granularity "
        f"({described}{more}). A day and its hours exported from one feed hold the same events, which "
        "would reach TikTok twice. Deliver each feed either by day (tiktok_conversions) or by hour "
        f"(tiktok_conversions_hourly); if this day's and its hours' files hold different events, set the "
        f"Variable {MIXED_GRANULARITY_VARIABLE} to true and clear this task. Nothing was read or sent by this run."
    )


def check_one_granularity(
    engine: Engine,
    partition: str,
    read_claim: Callable[[str], Any],
    owner: str,
    now: float,
    *,
    allowed: bool = False,
) -> None:
    """Refuse a partition whose day is delivered at the other granularity too.

    :param allowed: the Variable :data:`MIXED_GRANULARITY_VARIABLE` is on: nothing is checked.
    :raises MixedGranularity: with :func:`refusal`'s message.
    """
    if allowed:
        return
    overlaps = find_overlaps(engine, partition, read_claim, owner, now)
    if overlaps:
        raise MixedGranularity(refusal(partition, overlaps))
