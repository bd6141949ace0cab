"""Report: what this run did for its partition, written whatever happened upstream; complete only if delivered."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from liveramp_capi.domain.dry_run import build_dry_run_summary
from liveramp_capi.domain.summary import RunResults, build_summary
from liveramp_capi.pipeline.errors import PermanentStepFailure
from liveramp_capi.pipeline.ports import Ownership
from liveramp_capi.state.lease import PartitionHeld

if TYPE_CHECKING:
    from liveramp_capi.storage import PartitionStorage

_LOG = logging.getLogger(__name__)

_BRIEF = ("partition", "status", "read", "valid", "rejected", "duplicates", "delivered_events",
          "delivered_this_run", "previously_delivered_events", "failed_events")
_DRY_RUN_BRIEF = ("partition", "status", "dry_run", "read", "valid", "rejected", "planned_batches", "planned_events")


@dataclass(frozen=True, slots=True)
class PartitionReport:
    """The run's ``summary.json`` as written."""

    summary: dict[str, Any]

    def brief(self) -> dict[str, Any]:
        """The counts worth passing on (XCom): no list, nothing large."""
        keys = _DRY_RUN_BRIEF if self.summary.get("dry_run") else _BRIEF
        return {k: self.summary.get(k) for k in keys}


def report_partition(
    storage: PartitionStorage,
    ownership: Ownership,
    *,
    dry_run: bool,
    run_id: str | None,
    unfinished_tasks: Mapping[str, str],
) -> PartitionReport:
    """Write this run's summary; publish the partition's files while this run owns it; release the claim.

    It reads only this run's work folder, so an earlier run's output is never presented as this
    run's work.

    :param unfinished_tasks: the run's other tasks that did not succeed, ``{task: state}``.
    :raises PermanentStepFailure: unless this run delivered the partition (a dry run: planned it),
        every upstream task succeeded and the counts add up; or when another run owns the partition.
    """
    layout = storage.layout
    results = [json.loads(path.read_bytes()) for path in storage.iter_output_files(layout.results_dir)]
    summary = (build_dry_run_summary if dry_run else build_summary)(
        RunResults(storage.partition, storage.read_json_if_exists(layout.validation), results, run_id, dict(unfinished_tasks))
    )
    # Conversions of earlier partitions won back (or lost) by this run's recover_held task.
    if storage.exists(layout.held_recovery):
        summary["held_conversions"] = storage.read_json(layout.held_recovery)
    # The run's own summary is always kept in its work folder; the partition's deliverables
    # are replaced only by the run that owns the partition, never by a run that lost it.
    storage.write_json(layout.work(layout.summary), summary)
    if summary["status"] == "not_processed":
        # A run that read nothing has nothing to publish: the partition's files stay those of
        # the run that last processed it (perhaps the very run this one waited for).
        ownership.release()
        _raise_unless_complete(storage, summary)
    try:
        ownership.claim()
    except PartitionHeld as held:
        raise PermanentStepFailure(
            f"{held}; this run's summary is in {layout.folder}/{layout.work(layout.summary)} and the "
            "partition's own files were left as that run writes them"
        ) from None
    try:
        _publish(storage, summary, dry_run=dry_run)
    finally:
        # The run is done with its partition (whatever its outcome): the next run need not wait.
        ownership.release()
    _LOG.info("Partition %s summary: %s", storage.partition, json.dumps(summary, sort_keys=True))
    _raise_unless_complete(storage, summary)
    return PartitionReport(summary)


def _publish(storage: PartitionStorage, summary: dict[str, Any], *, dry_run: bool) -> None:
    layout = storage.layout
    if dry_run:
        parts = {layout.plan: layout.plan_dir}
    else:
        # failed.jsonl lists what is still failed after this run; envelope_expired.jsonl the events
        # held back at send time because every envelope they could use had expired.
        parts = {layout.failed: layout.failed_dir, layout.envelope_expired: layout.expired_dir}
    for deliverable, parts_dir in parts.items():
        storage.concatenate(parts_dir, layout.draft(deliverable))
        storage.publish(deliverable, dry_run=dry_run)
    storage.write_json(layout.draft(layout.summary), summary)
    storage.publish(layout.summary, dry_run=dry_run)


def _raise_unless_complete(storage: PartitionStorage, summary: dict[str, Any]) -> None:
    layout = storage.layout
    stopped = ", ".join(f"{task} {state}" for task, state in summary["unfinished_tasks"].items())
    if summary["status"] == "not_processed":
        raise PermanentStepFailure(
            f"partition {storage.partition} was not processed by this run ({stopped or 'validation did not run'}): "
            f"nothing was sent; this run's summary is {layout.folder}/{layout.work(layout.summary)}"
        )
    if summary.get("dry_run"):
        if summary["status"] != "planned":
            raise PermanentStepFailure(
                f"dry run of partition {storage.partition} is {summary['status'].replace('_', ' ')}"
                + (f"; tasks not done: {stopped}" if stopped else "")
                + f"; see {layout.folder}/{layout.dry_run(layout.summary)}"
            )
    elif summary["status"] != "complete":
        raise PermanentStepFailure(
            f"partition {storage.partition} is {summary['status'].replace('_', ' ')}: this run delivered "
            f"{summary.get('delivered_this_run', 0)} events ({summary.get('previously_delivered_events', 0)} "
            f"were delivered by earlier runs), {summary.get('failed_events', 0)} failed, "
            f"{summary.get('pending_events', 0)} not sent"
            + (f"; tasks not done: {stopped}" if stopped else "")
            + f"; see {layout.folder}/{layout.summary} and {layout.failed}"
        )
    broken = [name for name, ok in summary["checks"].items() if not ok]
    if broken:
        raise PermanentStepFailure(f"partition {storage.partition}: counts do not add up ({', '.join(broken)})")
