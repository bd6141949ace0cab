"""The partition summary: every event of a partition accounted for, in one small document.

Built from the validation tally and the per-shard delivery results; plain data in, plain data
out, so the same arithmetic serves the report task, the tests and the benchmark.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

#: Per-shard counters the send step reports and the summary adds up.
SHARD_COUNTERS: tuple[str, ...] = (
    "events",
    "sessions",
    "batches",
    "delivered_events",
    "previously_delivered_events",
    "failed_events",
    "failed_batches",
    "envelope_expired_events",
    "envelope_replaced_events",
    "batches_sent",
    "unknown_outcome_batches",
    "requests",
    "retries",
)


def build_summary(
    partition: str,
    validation: Mapping[str, Any] | None,
    shard_results: Iterable[Mapping[str, Any]],
    *,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Add up a partition's counts and check that they balance.

    :param partition: the partition name.
    :param validation: the validate step's tally (``None`` when validation never finished).
    :param shard_results: one result per send shard that reported.
    :param run_id: the Airflow run that produced this summary.
    """
    totals: Counter[str] = Counter()
    reported: list[int] = []
    for result in shard_results:
        reported.append(int(result["shard"]))
        for name in SHARD_COUNTERS:
            totals[name] += int(result.get(name, 0))

    summary: dict[str, Any] = {"partition": partition, "run_id": run_id}
    if validation is None:
        summary["status"] = "validation_incomplete"
        summary["read"] = None
        return summary

    read = int(validation["read"])
    valid = int(validation["valid"])
    rejected = int(validation["rejected"])
    duplicates = int(validation["duplicates"])
    planned = list(validation.get("shards", []))
    delivered = totals["delivered_events"] + totals["previously_delivered_events"]
    failed = totals["failed_events"]
    # Held back at send time: every envelope they could use had expired (not a delivery failure).
    expired = totals["envelope_expired_events"]
    # Events of shards whose send task did not report (failed before the end, or never ran).
    pending = valid - delivered - failed - expired
    missing_shards = sorted(set(planned) - set(reported))

    if validation.get("rejected_ratio_exceeded"):
        status = "rejected_ratio_exceeded"
    elif failed or missing_shards:
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
            "delivered_this_run": totals["delivered_events"],
            "previously_delivered_events": totals["previously_delivered_events"],
            "failed_events": failed,
            "failed_batches": totals["failed_batches"],
            "envelope_expired_events": expired,
            "envelope_replaced_events": totals["envelope_replaced_events"],
            "pending_events": pending,
            "resent_unknown_outcome_batches": totals["unknown_outcome_batches"],
            "requests": totals["requests"],
            "retries": totals["retries"],
            "shards": {"planned": len(planned), "reported": len(reported), "missing": missing_shards},
        }
    )
    summary["checks"] = {
        "read_equals_valid_rejected_duplicates": read == valid + rejected + duplicates,
        "valid_equals_delivered_failed_expired": pending == 0 and valid == delivered + failed + expired,
        "shard_events_equal_valid": (not missing_shards) and totals["events"] == valid,
    }
    return summary
