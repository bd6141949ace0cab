"""Recover held conversions: deliver events held for an expired envelope once their user has a live one."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from liveramp_capi.domain.consent import DAY_SECONDS
from liveramp_capi.domain.recovery import SendBatches, recover_held_conversions
from liveramp_capi.pipeline.config import RecoverConfig

if TYPE_CHECKING:
    from liveramp_capi.state.held_store import HeldConversions
    from liveramp_capi.state.ledger import DeliveryLedger
    from liveramp_capi.storage import OutputFolder

_LOG = logging.getLogger(__name__)

_BRIEF = ("recovered", "recovered_already_acknowledged", "lost_window_passed", "lost_refused", "released", "still_held")


@dataclass(frozen=True, slots=True)
class RecoveryResult:
    """A recovery pass's counts, as written to ``held_recovery.json`` (no identifiers)."""

    counts: dict[str, Any]

    def brief(self) -> dict[str, Any]:
        """The counts worth passing on (XCom)."""
        return {k: self.counts[k] for k in _BRIEF}


def recover_held(
    config: RecoverConfig,
    held: HeldConversions,
    ledger: DeliveryLedger,
    send: SendBatches,
    *,
    folder: OutputFolder,
    result_file: str,
    run_id: str,
    partition: str | None = None,
) -> RecoveryResult:
    """Deliver held conversions whose user key now has a live envelope; mark those past the window lost.

    See :mod:`liveramp_capi.domain.recovery`. Held events are not this run's own events, so a
    transient failure does not fail the step: the events go back to waiting and a later pass
    tries again.

    :param folder: where the result is written, as ``result_file``.
    :param run_id: the run and try, recorded with each recovery.
    :param partition: a conversions run's partition: its own held events are counted by state
        (``this_partition``).
    """
    result = recover_held_conversions(
        held, ledger, send, now=int(time.time()), window_seconds=config.max_event_age_days * DAY_SECONDS, run_id=run_id
    )
    totals = held.counts()
    result["still_held"] = totals["held"] + totals["delivering"]
    result["totals"] = totals
    if partition:
        result["this_partition"] = held.counts(partition)
    folder.write_json(result_file, result)
    _LOG.info(
        "Held conversions: %d recovered now (%d found acknowledged already), %d lost now (%s), %d to retry; "
        "%d still held, %d recovered and %d lost in all",
        result["recovered"] + result["recovered_already_acknowledged"], result["recovered_already_acknowledged"],
        result["lost_window_passed"] + result["lost_refused"], result["lost_by_reason"], result["released"],
        result["still_held"], totals["recovered"], totals["lost"],
    )
    if result["released"]:
        _LOG.warning(
            "%d held conversions could not be delivered now (transient failures); the next pass retries them",
            result["released"],
        )
    return RecoveryResult(result)
