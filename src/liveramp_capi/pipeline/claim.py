"""Claim: the run takes ownership of its partition before it reads, writes or sends anything."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from liveramp_capi.pipeline.config import ClaimConfig
from liveramp_capi.pipeline.errors import PermanentStepFailure
from liveramp_capi.pipeline.ports import Ownership
from liveramp_capi.state.granularity import MixedGranularity
from liveramp_capi.state.lease import LeaseState, PartitionHeld

if TYPE_CHECKING:
    from liveramp_capi.storage import PartitionStorage

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """The claimed partition, when, and the other runs whose work files were removed."""

    partition: str
    claimed_at: float
    removed_runs: list[str]


def claim_partition(
    config: ClaimConfig,
    storage: PartitionStorage,
    ownership: Ownership,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> ClaimResult:
    """Claim the partition, waiting up to ``config.wait_seconds`` while another run holds it.

    Once claimed, other runs' work files are removed (their summaries stay), except in a dry run:
    a failed run whose tasks are cleared after a dry run still finds its shards.

    :raises PermanentStepFailure: when the wait ends with the partition still held.
    """
    state = _claim_with_wait(config, ownership, sleep)
    if not config.allow_mixed_granularity:
        _refuse_mixed_granularity(ownership)
    removed = [] if config.dry_run else storage.remove_other_runs()
    _LOG.info(
        "Partition %s claimed by run %s%s",
        storage.partition,
        state.owner,
        f"; removed the work files of {len(removed)} other runs (their summaries stay)" if removed else "",
    )
    return ClaimResult(storage.partition, round(state.heartbeat_at, 3), removed)


def _refuse_mixed_granularity(ownership: Ownership) -> None:
    # Checked after this run's own claim: of two runs racing on a day and one of its hours, the
    # later sees the other's claim. The claim is given back at once, so a later run of the
    # partition (the Variable turned on) need not wait for it to lapse.
    try:
        ownership.check_one_granularity()
    except MixedGranularity as refused:
        ownership.release()
        raise PermanentStepFailure(str(refused)) from None


def _claim_with_wait(config: ClaimConfig, ownership: Ownership, sleep: Callable[[float], None]) -> LeaseState:
    deadline = time.monotonic() + config.wait_seconds
    while True:
        try:
            return ownership.claim()
        except PartitionHeld as held:
            if time.monotonic() + config.poll_seconds > deadline:
                raise PermanentStepFailure(
                    f"{held}; gave up after waiting {config.wait_seconds / 60:g} minutes. Nothing was read or sent by "
                    "this run. Once that run has finished (or its claim has lapsed), clear this task to deliver "
                    "what is left."
                ) from None
            _LOG.info("Waiting: %s", held)
            sleep(config.poll_seconds)
