"""What Airflow knows about the conversions runs: which run processed which partition, its state,
timing, the failed tasks and the exact rerun action. Read from Airflow's metadata database.

Days are delivered by ``tiktok_conversions``, hours by ``tiktok_conversions_hourly``: a run is
always described, linked and rerun in its own DAG.
"""

from __future__ import annotations

import datetime as dt
import json
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import sqlalchemy as sa
from airflow.models.dagrun import DagRun
from airflow.models.taskinstance import TaskInstance
from sqlalchemy.orm import Session

CONVERSIONS_DAG_ID = "tiktok_conversions"
HOURLY_CONVERSIONS_DAG_ID = "tiktok_conversions_hourly"
#: The DAGs whose runs deliver partitions (a day's or an hour's), built by one factory.
CONVERSIONS_DAG_IDS = (CONVERSIONS_DAG_ID, HOURLY_CONVERSIONS_DAG_ID)
ENVELOPE_REFRESH_DAG_ID = "ats_envelope_refresh"
SEND_TASK_ID = "send"
_FAILED_STATES = ("failed", "upstream_failed")


@dataclass(frozen=True, slots=True)
class RunInfo:
    """One run of the conversions DAG, reduced to what the console shows."""

    run_id: str
    partition: str
    state: str
    run_type: str
    partition_key: str | None
    start_date: dt.datetime | None
    end_date: dt.datetime | None
    run_after: dt.datetime | None
    dry_run: bool = False
    dag_id: str = CONVERSIONS_DAG_ID

    @property
    def duration_seconds(self) -> float | None:
        if self.start_date and self.end_date:
            return round((self.end_date - self.start_date).total_seconds(), 3)
        return None

    def as_dict(self) -> dict[str, Any]:
        return {
            "dag_id": self.dag_id,
            "run_id": self.run_id,
            "state": self.state,
            "run_type": self.run_type,
            "start_date": _iso(self.start_date),
            "end_date": _iso(self.end_date),
            "duration_seconds": self.duration_seconds,
            "url": run_url(self.dag_id, self.run_id),
            "dry_run": self.dry_run,
        }


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


def run_url(dag_id: str, run_id: str) -> str:
    """The Airflow UI page of a run (relative to the UI's root)."""
    return f"/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"


def task_url(dag_id: str, run_id: str, task_id: str, map_index: int) -> str:
    """The Airflow UI page of a task instance (relative to the UI's root)."""
    base = f"{run_url(dag_id, run_id)}/tasks/{quote(task_id, safe='')}"
    return f"{base}/mapped/{map_index}" if map_index >= 0 else base


def is_dry_run(conf: Any) -> bool:
    """Whether a run was triggered with the param ``dry_run`` on (it sent nothing)."""
    if isinstance(conf, str):
        try:
            conf = json.loads(conf)
        except ValueError:
            return False
    return isinstance(conf, dict) and conf.get("dry_run") is True


def real_runs(partition_runs: list[RunInfo]) -> list[RunInfo]:
    """The runs that delivered (not dry runs), in the given order: they alone decide a partition's state."""
    return [run for run in partition_runs if not run.dry_run]


def partition_of(
    conf: Any, partition_key: str | None, logical_date: dt.datetime | None, dag_id: str = CONVERSIONS_DAG_ID
) -> str | None:
    """The partition a run processed: the param ``partition``, the partition key, or the logical date.

    Mirrors the DAG's ``{{ params.partition or partition_key or ds }}`` (``ts[:13]``, the hour, in
    the hourly DAG).
    """
    if isinstance(conf, str):
        try:
            conf = json.loads(conf)
        except ValueError:
            conf = None
    named = conf.get("partition") if isinstance(conf, dict) else None
    if isinstance(named, str) and named:
        return named
    if partition_key:
        return partition_key
    if logical_date is None:
        return None
    return logical_date.strftime("%Y-%m-%dT%H") if dag_id == HOURLY_CONVERSIONS_DAG_ID else logical_date.date().isoformat()


def conversions_runs(session: Session, dag_ids: Iterable[str] = CONVERSIONS_DAG_IDS) -> dict[str, list[RunInfo]]:
    """Every run of the conversions DAGs in ``dag_ids``, grouped by partition, newest run first.

    One indexed read of ``dag_run`` (a year of daily runs is a few hundred rows; of hourly runs,
    a few thousand). Day and hour keys never collide, so a partition's runs are of one DAG.
    """
    query = sa.select(
        DagRun.dag_id, DagRun.run_id, DagRun.state, DagRun.run_type, DagRun.conf, DagRun.partition_key,
        DagRun.logical_date, DagRun.start_date, DagRun.end_date, DagRun.run_after,
    ).where(DagRun.dag_id.in_(sorted(set(dag_ids))))
    by_partition: dict[str, list[RunInfo]] = {}
    for row in session.execute(query):
        partition = partition_of(row.conf, row.partition_key, row.logical_date, row.dag_id)
        if partition is None:
            continue
        by_partition.setdefault(partition, []).append(
            RunInfo(
                run_id=row.run_id, partition=partition, state=str(row.state), run_type=str(row.run_type),
                partition_key=row.partition_key, start_date=row.start_date, end_date=row.end_date,
                run_after=row.run_after, dry_run=is_dry_run(row.conf), dag_id=row.dag_id,
            )
        )
    epoch = dt.datetime.min.replace(tzinfo=dt.UTC)
    for runs in by_partition.values():
        runs.sort(key=lambda run: (run.run_after or run.start_date or epoch), reverse=True)
    return by_partition


def send_durations(session: Session, run_keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], float]:
    """Wall time of the mapped ``send`` tasks of each run (first start to last end), in seconds.

    :param run_keys: ``(dag_id, run_id)`` of the runs (run ids are unique within a DAG only).
    """
    wanted = set(run_keys)
    if not wanted:
        return {}
    query = (
        sa.select(
            TaskInstance.dag_id, TaskInstance.run_id,
            sa.func.min(TaskInstance.start_date), sa.func.max(TaskInstance.end_date),
        )
        .where(
            TaskInstance.dag_id.in_(sorted({dag_id for dag_id, _ in wanted})),
            TaskInstance.task_id == SEND_TASK_ID,
            TaskInstance.run_id.in_(sorted({run_id for _, run_id in wanted})),
        )
        .group_by(TaskInstance.dag_id, TaskInstance.run_id)
    )
    found = {}
    for dag_id, run_id, started, ended in session.execute(query):
        if started and ended and (dag_id, run_id) in wanted:
            found[(dag_id, run_id)] = round((ended - started).total_seconds(), 3)
    return found


def task_states(session: Session, run_id: str, dag_id: str = CONVERSIONS_DAG_ID) -> list[dict[str, Any]]:
    """Task instances of one run of ``dag_id``: id, map index, state, try number, duration, UI link."""
    query = (
        sa.select(
            TaskInstance.task_id, TaskInstance.map_index, TaskInstance.state, TaskInstance.try_number,
            TaskInstance.start_date, TaskInstance.end_date,
        )
        .where(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id)
        .order_by(TaskInstance.task_id, TaskInstance.map_index)
    )
    return [
        {
            "task_id": row.task_id,
            "map_index": int(row.map_index),
            "state": str(row.state) if row.state else None,
            "try_number": int(row.try_number or 0),
            "duration_seconds": (
                round((row.end_date - row.start_date).total_seconds(), 3) if row.start_date and row.end_date else None
            ),
            "url": task_url(dag_id, run_id, row.task_id, int(row.map_index)),
        }
        for row in session.execute(query)
    ]


def rerun_action(run: RunInfo, tasks: list[dict[str, Any]]) -> dict[str, Any]:
    """The exact rerun of a failed partition: the tasks to clear (with links) and the CLI line.

    A scheduled (or backfill) run has a partition key, so ``airflow dags clear --partition-key``
    clears it; a manual run is rerun by triggering the same partition again. Either way in the
    run's own DAG (a day's or an hour's), and the ledger sends only what was not acknowledged.
    """
    # The failed send shards when there are (clearing them with downstream reruns the report);
    # otherwise the tasks that failed themselves, not those that only failed upstream.
    failed = [task for task in tasks if task["state"] in _FAILED_STATES]
    failed_itself = [task for task in failed if task["state"] == "failed"]
    send_failed = [task for task in failed_itself if task["task_id"] == SEND_TASK_ID]
    to_clear = send_failed or failed_itself or failed
    if run.partition_key:
        cli = (
            f"airflow dags clear {run.dag_id} --partition-key {shlex.quote(run.partition_key)} "
            "--only-failed --yes"
        )
    else:
        conf = shlex.quote(json.dumps({"partition": run.partition}))
        cli = f"airflow dags trigger {run.dag_id} --conf {conf}"
    return {
        "clear_tasks": [
            {"task_id": task["task_id"], "map_index": task["map_index"], "url": task["url"]} for task in to_clear
        ],
        "ui": "open each task below, press Clear, keep 'Downstream' ticked (or clear the whole run)",
        "cli": cli,
        "run_url": run_url(run.dag_id, run.run_id),
    }


def last_run(session: Session, dag_id: str) -> dict[str, Any] | None:
    """The newest run of a DAG: id, state, dates, link."""
    row = session.execute(
        sa.select(DagRun.run_id, DagRun.state, DagRun.start_date, DagRun.end_date)
        .where(DagRun.dag_id == dag_id)
        .order_by(DagRun.run_after.desc())
        .limit(1)
    ).first()
    if row is None:
        return None
    return {
        "run_id": row.run_id, "state": str(row.state), "start_date": _iso(row.start_date),
        "end_date": _iso(row.end_date), "url": run_url(dag_id, row.run_id),
    }
