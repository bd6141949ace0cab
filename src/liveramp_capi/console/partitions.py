"""One row per partition (newest first, paged), one partition in detail, and the daily series.

A partition is known from its output folder or from a run that named it. Its numbers come from
its ``summary.json`` (the report's accounting) and, beside them, the delivery ledger's live
counts (a partition still sending has no summary yet); state and timing from Airflow's runs.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from liveramp_capi.console import reads, runs
from liveramp_capi.console.summaries import OutputRoot

TOP_REASONS = 3
_RUNNING = {"queued", "running"}


def _counts(summary: dict[str, Any] | None) -> dict[str, Any]:
    """The headline numbers of a summary; a key the summary lacks stays absent."""
    if not summary:
        return {}
    names = {
        "received": "read",
        "valid": "valid",
        "rejected": "rejected",
        "duplicates": "duplicates",
        "delivered": "delivered_events",
        "delivered_this_run": "delivered_this_run_events",
        "delivered_earlier_tries": "delivered_earlier_tries_events",
        "delivered_earlier_runs": "previously_delivered_events",
        "failed": "failed_events",
        "failed_batches": "failed_batches",
        "skipped_envelope_expired": "envelope_expired_events",
        "not_sent": "not_sent_events",
        "pending": "pending_events",
        "requests": "requests",
        "retries": "retries",
        "throttled": "throttled_requests",
        "resent_unknown_outcome_batches": "resent_unknown_outcome_batches",
    }
    found = {label: summary[key] for label, key in names.items() if isinstance(summary.get(key), int | float)}
    if "delivered_this_run" not in found and isinstance(summary.get("delivered_this_run"), int):
        found["delivered_this_run"] = summary["delivered_this_run"]
    skipped = [found[k] for k in ("skipped_envelope_expired", "not_sent") if k in found]
    if skipped:
        found["skipped"] = sum(skipped)
    return found


def _top_reasons(summary: dict[str, Any] | None, limit: int | None = TOP_REASONS) -> list[dict[str, Any]]:
    reasons = (summary or {}).get("rejected_by_reason")
    if not isinstance(reasons, dict):
        return []
    ranked = sorted(((code, n) for code, n in reasons.items() if isinstance(n, int)), key=lambda item: (-item[1], item[0]))
    return [{"code": code, "count": n} for code, n in ranked[:limit]]


def _state(run: runs.RunInfo | None, summary: dict[str, Any] | None) -> str:
    """``running``, ``failed``, ``delivered`` or ``unknown`` (a summary without a known run)."""
    if run is not None and run.state in _RUNNING:
        return "running"
    status = (summary or {}).get("status")
    if (run is not None and run.state == "failed") or (status and status != "complete"):
        return "failed"
    if status == "complete" or (run is not None and run.state == "success"):
        return "delivered"
    return "unknown"


def _row(
    partition: str,
    partition_runs: list[runs.RunInfo],
    summary: dict[str, Any] | None,
    ledger: dict[str, Any] | None,
) -> dict[str, Any]:
    # A dry run sends nothing: the partition's state is that of its newest real run.
    delivering = runs.real_runs(partition_runs)
    last = delivering[0] if delivering else None
    row: dict[str, Any] = {
        "partition": partition,
        "state": _state(last, summary),
        "summary_status": (summary or {}).get("status"),
        "summary_run_id": (summary or {}).get("run_id"),
        "counts": _counts(summary),
        "top_reasons": _top_reasons(summary),
        "runs": len(delivering),
        "dry_runs": len(partition_runs) - len(delivering),
        "last_run": last.as_dict() if last else None,
        "duration_seconds": last.duration_seconds if last else None,
    }
    if ledger:
        row["ledger"] = {
            "acknowledged_events": ledger["acknowledged"]["events"],
            "failed_events": ledger["failed"]["events"],
            "in_flight_events": ledger["in_flight"]["events"],
            "batches": sum(ledger[s]["batches"] for s in ("acknowledged", "failed", "in_flight")),
            "failed_batches": ledger["failed"]["batches"],
            "retries": ledger["retries"],
        }
    return row


def partition_rows(
    session: Session,
    output: OutputRoot,
    engine: Engine,
    *,
    limit: int,
    offset: int,
    dag_ids: Collection[str] = runs.CONVERSIONS_DAG_IDS,
) -> dict[str, Any]:
    """A page of partitions, newest first: state, counts, top reasons, retries, last run.

    Reads one ``summary.json`` and one grouped ledger query per page, whatever the history size.

    :param dag_ids: the conversions DAGs whose runs the reader may see (a day's, an hour's).
    """
    by_partition = runs.conversions_runs(session, dag_ids)
    every = sorted(set(output.partitions()) | set(by_partition), reverse=True)
    page = every[offset : offset + limit]
    ledger = reads.ledger_counts(engine, page)
    return {
        "total": len(every),
        "limit": limit,
        "offset": offset,
        "partitions": [
            _row(partition, by_partition.get(partition, []), output.summary(partition), ledger.get(partition))
            for partition in page
        ],
    }


def partition_detail(
    session: Session,
    output: OutputRoot,
    engine: Engine,
    partition: str,
    *,
    run_id: str | None = None,
    dag_id: str | None = None,
    failed_limit: int = 50,
    failed_offset: int = 0,
    dag_ids: Collection[str] = runs.CONVERSIONS_DAG_IDS,
) -> dict[str, Any] | None:
    """Everything about one partition: the row, all reasons, tries, failed batches, tasks, rerun.

    :param run_id: the run to describe (the run tab); default the partition's newest run.
    :param dag_id: that run's DAG (any conversions DAG when not given).
    :param dag_ids: the conversions DAGs whose runs the reader may see.
    """
    partition_runs = runs.conversions_runs(session, dag_ids).get(partition, [])
    summary = output.summary(partition)
    ledger = reads.ledger_counts(engine, [partition]).get(partition)
    if not partition_runs and summary is None and ledger is None:
        return None
    detail = _row(partition, partition_runs, summary, ledger)
    run = (
        next((r for r in partition_runs if r.run_id == run_id and dag_id in (None, r.dag_id)), None)
        if run_id
        else None
    )
    delivering = runs.real_runs(partition_runs)
    run = run or (delivering[0] if delivering else partition_runs[0] if partition_runs else None)
    detail["run"] = run.as_dict() if run else None
    detail["summary_is_from_this_run"] = bool(run and summary and summary.get("run_id") == run.run_id)
    detail["rejected_by_reason"] = _top_reasons(summary, limit=None)
    detail["tries"] = (summary or {}).get("tries") if isinstance((summary or {}).get("tries"), list) else None
    detail["unfinished_tasks"] = (summary or {}).get("unfinished_tasks")
    detail["checks"] = (summary or {}).get("checks")
    detail["shards"] = (summary or {}).get("shards")
    detail["ledger_states"] = ledger
    detail["failed_batches"] = reads.failed_batches(engine, partition, limit=failed_limit, offset=failed_offset)
    detail["all_runs"] = [r.as_dict() for r in partition_runs]
    detail["dry_run_summary"] = output.dry_run_summary(partition)
    if run is not None:
        tasks = runs.task_states(session, run.run_id, run.dag_id)
        detail["tasks"] = tasks
        key = (run.dag_id, run.run_id)
        detail["send_duration_seconds"] = runs.send_durations(session, [key]).get(key)
        if detail["state"] == "failed" or run.state == "failed":
            detail["rerun"] = runs.rerun_action(run, tasks)
    return detail


def daily_series(session: Session, output: OutputRoot, *, days: int, today: dt.date | None = None) -> dict[str, Any]:
    """Per partition day over the last ``days`` days: delivered events, rejection rate, send duration."""
    today = today or dt.datetime.now(dt.UTC).date()
    # Day partitions only: an hour's runs are not a day's.
    by_partition = runs.conversions_runs(session, (runs.CONVERSIONS_DAG_ID,))
    dates = [(today - dt.timedelta(days=n)).isoformat() for n in range(days, 0, -1)]
    by_partition = {d: runs.real_runs(rs) for d, rs in by_partition.items()}
    last_runs = {d: (by_partition[d][0].dag_id, by_partition[d][0].run_id) for d in dates if by_partition.get(d)}
    durations = runs.send_durations(session, last_runs.values())
    series = []
    for day in dates:
        summary = output.summary(day)
        counts = _counts(summary)
        received = counts.get("received")
        series.append(
            {
                "partition": day,
                "delivered": counts.get("delivered"),
                "failed": counts.get("failed"),
                "rejection_rate": (round(counts.get("rejected", 0) / received, 4) if received else None),
                "send_duration_seconds": durations.get(last_runs[day]) if day in last_runs else None,
                "state": _state(by_partition[day][0] if by_partition.get(day) else None, summary)
                if (summary or day in by_partition)
                else None,
            }
        )
    return {"days": days, "series": series}


def find_run(session: Session, run_id: str, dag_id: str | None, dag_ids: Collection[str]) -> runs.RunInfo | None:
    """The run ``run_id`` of a conversions DAG (of ``dag_id`` when given), if the reader may see it."""
    wanted = [d for d in dag_ids if dag_id in (None, d)]
    return next((r for rs in runs.conversions_runs(session, wanted).values() for r in rs if r.run_id == run_id), None)


def task_detail(
    session: Session,
    output: OutputRoot,
    engine: Engine,
    run_id: str,
    task_id: str,
    map_index: int,
    *,
    dag_id: str | None = None,
    dag_ids: Collection[str] = runs.CONVERSIONS_DAG_IDS,
) -> dict[str, Any] | None:
    """A task instance's view: its run's partition, and for a ``send`` task its shard's counters,
    its failed batches and how to rerun just it."""
    run = find_run(session, run_id, dag_id, dag_ids)
    if run is None:
        return None
    detail = partition_detail(
        session, output, engine, run.partition, run_id=run_id, dag_id=run.dag_id, dag_ids=dag_ids
    ) or {"partition": run.partition}
    task = next(
        (
            t
            for t in runs.task_states(session, run_id, run.dag_id)
            if t["task_id"] == task_id and t["map_index"] == map_index
        ),
        None,
    )
    detail["task"] = task
    if task_id == runs.SEND_TASK_ID and map_index >= 0:
        result = output.shard_result(run.partition, map_index, run_id)
        detail["shard_result"] = result
        if result and isinstance(result.get("shard_count"), int) and result["shard_count"] > 0:
            detail["shard_failed_batches"] = reads.failed_batches(
                engine, run.partition, shard=(result["shard"], result["shard_count"])
            )
    return detail
