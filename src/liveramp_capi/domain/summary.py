"""The partition summary: every event of a partition accounted for, in one small document.

Built from the validation tally and the per-shard delivery results; plain data in, plain data
out, so the same arithmetic serves the report task, the tests and the benchmark.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Per-shard counters the send step reports and the summary adds up.
SHARD_COUNTERS: tuple[str, ...] = (
    "events",
    "sessions",
    "batches",
    "delivered_events",
    "delivered_earlier_tries_events",
    "previously_delivered_events",
    "not_sent_events",
    "failed_events",
    "failed_batches",
    "envelope_expired_events",
    "envelope_replaced_events",
    "envelope_held_earlier_events",
    "batches_sent",
    "unknown_outcome_batches",
    "requests",
    "retries",
)


@dataclass(frozen=True, slots=True)
class RunResults:
    """What one run left of a partition in its work folder: the inputs of its summary.

    :param partition: the partition name.
    :param validation: this run's validate tally (``None`` when validation never finished).
    :param shard_results: one result per send shard that reported in this run.
    :param run_id: the Airflow run that produced the summary.
    :param unfinished_tasks: tasks of this run that did not succeed, ``{task: state}``; any makes
        the status at best ``incomplete``.
    """

    partition: str
    validation: Mapping[str, Any] | None
    shard_results: Sequence[Mapping[str, Any]]
    run_id: str | None = None
    unfinished_tasks: Mapping[str, str] = field(default_factory=dict)


def build_summary(results: RunResults) -> dict[str, Any]:
    """Add up what one run did for a partition and check that the counts balance.

    Everything counted comes from this run's own work folder: an earlier run's deliveries appear
    only as ``previously_delivered_events`` (read from the ledger by the send step), never as
    this run's. Counts add up over all task tries of the run.
    """
    partition, validation, run_id = results.partition, results.validation, results.run_id
    unfinished_tasks = results.unfinished_tasks
    shard_results = results.shard_results
    totals: Counter[str] = Counter()
    reported: list[int] = []
    by_try: dict[int, Counter[str]] = {}
    for result in shard_results:
        reported.append(int(result["shard"]))
        for name in SHARD_COUNTERS:
            totals[name] += int(result.get(name, 0))
        for entry in result.get("tries", []):
            per_try = by_try.setdefault(int(entry["try"]), Counter())
            per_try.update({k: int(v) for k, v in entry.items() if k != "try"})

    unfinished = dict(sorted((unfinished_tasks or {}).items()))
    summary: dict[str, Any] = {"partition": partition, "run_id": run_id, "unfinished_tasks": unfinished}
    if validation is None:
        # Nothing of the partition was read by this run: say so, with the tasks that stopped it.
        summary.update({"status": "not_processed", "read": None, "delivered_this_run": 0})
        return summary

    read = int(validation["read"])
    valid = int(validation["valid"])
    rejected = int(validation["rejected"])
    duplicates = int(validation["duplicates"])
    planned = list(validation.get("shards", []))
    delivered_this_run = totals["delivered_events"] + totals["delivered_earlier_tries_events"]
    delivered = delivered_this_run + totals["previously_delivered_events"]
    failed = totals["failed_events"]
    # Held back at send time: every envelope they could use had expired (not a delivery failure).
    expired = totals["envelope_expired_events"]
    # Events of shards whose send task did not report (failed before the end, or never ran).
    pending = valid - delivered - failed - expired
    missing_shards = sorted(set(planned) - set(reported))

    if validation.get("rejected_ratio_exceeded"):
        status = "rejected_ratio_exceeded"
    elif failed or missing_shards or unfinished or totals["not_sent_events"]:
        status = "incomplete"
    else:
        status = "complete"

    summary.update(
        {
            "status": status,
            "files": validation.get("files", 0),
            "ignored_files": validation.get("ignored_files", []),
            "read": read,
            "valid": valid,
            "rejected": rejected,
            "rejected_by_reason": dict(sorted(validation.get("rejected_by_code", {}).items())),
            "duplicates": duplicates,
            "sessions": totals["sessions"],
            "batches": totals["batches"],
            "delivered_events": delivered,
            "delivered_this_run": delivered_this_run,
            "previously_delivered_events": totals["previously_delivered_events"],
            "failed_events": failed,
            "not_sent_events": totals["not_sent_events"],
            "failed_batches": totals["failed_batches"],
            "envelope_expired_events": expired,
            "envelope_replaced_events": totals["envelope_replaced_events"],
            "pending_events": pending,
            "resent_unknown_outcome_batches": totals["unknown_outcome_batches"],
            "requests": totals["requests"],
            "retries": totals["retries"],
            "shards": {"planned": len(planned), "reported": len(reported), "missing": missing_shards},
            "tries": {str(n): dict(sorted(by_try[n].items())) for n in sorted(by_try)},
        }
    )
    summary["checks"] = {
        "read_equals_valid_rejected_duplicates": read == valid + rejected + duplicates,
        "valid_equals_delivered_failed_expired": pending == 0 and valid == delivered + failed + expired,
        "shard_events_equal_valid": (not missing_shards) and totals["events"] == valid,
    }
    return summary
