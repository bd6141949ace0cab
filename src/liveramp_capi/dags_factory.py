"""The conversions DAG, built once for each partition granularity (a day or an hour).

``dags/tiktok_conversions.py`` and ``dags/tiktok_conversions_hourly.py`` are one call each: the
two DAGs run the same tasks, differing only in their partition names (``YYYY-MM-DD`` or
``YYYY-MM-DDTHH``), their schedule and the Variables that bound their waits.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from airflow.sdk import DAG, CronPartitionTimetable, Param

from liveramp_capi.domain.partition import DAILY, HOURLY, KEY_FORMATS
from liveramp_capi.notifiers import default_failure_notifier, partition_deadline_alert
from liveramp_capi.operators.claim import ClaimPartitionOperator
from liveramp_capi.operators.extract import ExtractPartitionOperator
from liveramp_capi.operators.recover import RecoverHeldConversionsOperator
from liveramp_capi.operators.report import ReportConversionsOperator
from liveramp_capi.operators.send import SendConversionsOperator
from liveramp_capi.operators.validate import ValidateConversionsOperator
from liveramp_capi.pipeline.config import ClaimConfig, RecoverConfig, ValidateConfig, templated, templates
from liveramp_capi.sensors import PartitionReadySensor


@dataclass(frozen=True, slots=True)
class Granularity:
    """What differs between the daily and the hourly conversions DAG.

    :param name: :data:`~liveramp_capi.domain.partition.DAILY` or ``HOURLY``.
    :param cron: when a run starts; its partition is the one of the previous cron tick.
    :param param_pattern: the ``partition`` param's pattern.
    :param param_example: the ``partition`` param's format, for its description.
    :param logical_key: the partition of a run made without a param or partition key.
    :param wait_setting: the setting (:data:`~liveramp_capi.pipeline.config.SETTINGS`) bounding the ``_SUCCESS`` wait.
    :param deadline_env: the environment variable of the deadline alert.
    :param description: the DAG's one-line description.
    """

    name: str
    cron: str
    param_pattern: str
    param_example: str
    logical_key: str
    wait_setting: str
    deadline_env: str
    description: str


GRANULARITIES: dict[str, Granularity] = {
    DAILY: Granularity(
        DAILY,
        # 03:00 UTC each day, for the day before: the key of the run of 2026-11-21 is 2026-11-20.
        "0 3 * * *",
        r"^\d{4}-\d{2}-\d{2}$",
        "YYYY-MM-DD",
        "ds",
        "partition_wait_minutes",
        "CAPI_PARTITION_DEADLINE_MINUTES",
        "Deliver a day's conversions to TikTok through LiveRamp's ATS CAPI adapter",
    ),
    HOURLY: Granularity(
        HOURLY,
        # 15 minutes past each hour, for the hour before: the run of 14:15 UTC takes ...T13.
        "15 * * * *",
        r"^\d{4}-\d{2}-\d{2}T\d{2}$",
        "YYYY-MM-DDTHH (UTC)",
        "ts[:13]",
        "hourly_partition_wait_minutes",
        "CAPI_HOURLY_PARTITION_DEADLINE_MINUTES",
        "Deliver an hour's conversions to TikTok through LiveRamp's ATS CAPI adapter",
    ),
}

LANDING_ROOT = templated("landing_root")
OUTPUT_ROOT = templated("output_root")
DRY_RUN = "{{ params.dry_run }}"


def retrying_tasks(first_delay_minutes: int, max_delay_minutes: int) -> dict[str, Any]:
    """The DAGs' ``default_args``: two retries, the delay doubling from the first up to the cap.

    :param first_delay_minutes: the delay before the first retry.
    :param max_delay_minutes: the longest delay.
    """
    return {
        "owner": "data-engineering",
        "retries": 2,
        "retry_delay": dt.timedelta(minutes=first_delay_minutes),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": dt.timedelta(minutes=max_delay_minutes),
    }


def build_conversions_dag(dag_id: str, granularity: str, doc_md: str) -> DAG:
    """The conversions DAG for one partition granularity.

    :param dag_id: the DAG id.
    :param granularity: ``daily`` or ``hourly``.
    :param doc_md: the DAG's documentation (the DAG file's docstring).
    """
    kind = GRANULARITIES[granularity]
    # Manual runs name their partition; scheduled runs get it from the partition timetable; a
    # run made without either falls back to its logical date.
    partition = "{{ params.partition or partition_key or " + kind.logical_key + " }}"
    with DAG(
        dag_id=dag_id,
        description=kind.description,
        doc_md=doc_md,
        schedule=CronPartitionTimetable(kind.cron, timezone="UTC", run_offset=-1, key_format=KEY_FORMATS[granularity]),
        start_date=dt.datetime(2026, 11, 1, tzinfo=dt.UTC),
        catchup=False,
        # Two runs at once serve a backfill (different partitions in parallel). Two runs of the SAME
        # partition (a manual trigger beside the scheduled run) are serialised by claim_partition.
        max_active_runs=2,
        tags=["tiktok", "liveramp", "conversions", granularity],
        # A failed partition reaches a human through a pluggable notifier; a late one through a deadline.
        on_failure_callback=default_failure_notifier("partition failed"),
        deadline=partition_deadline_alert(env=kind.deadline_env),
        params={
            "partition": Param(
                None,
                type=["null", "string"],
                pattern=kind.param_pattern,
                title="Partition",
                description=f"Partition to (re)process, {kind.param_example}. Empty: the scheduled partition.",
            ),
            "dry_run": Param(
                False,
                type="boolean",
                title="Dry run",
                description="Validate and plan batches exactly as a real run, write the plan and rejects under "
                "dry_run/ in the partition's output, send nothing and change no state.",
            ),
        },
        default_args=retrying_tasks(first_delay_minutes=2, max_delay_minutes=20),
    ) as dag:
        wait_for_partition = PartitionReadySensor(
            task_id="wait_for_partition",
            partition=partition,
            landing_root=LANDING_ROOT,
            max_wait_minutes=templated(kind.wait_setting),
            poll_seconds=templated("partition_poll_seconds"),
            # Waiting is not failing: the sensor's own timeout is the limit, not retries.
            retries=1,
        )
        # A dry run claims the partition too: it reads the ledger and the held table, which a
        # real run of the same partition would be changing under it.
        claim_partition = ClaimPartitionOperator(
            task_id="claim_partition",
            partition=partition,
            output_root=OUTPUT_ROOT,
            **templates(ClaimConfig),
            dry_run=DRY_RUN,
        )
        extract = ExtractPartitionOperator(
            task_id="extract", partition=partition, landing_root=LANDING_ROOT, output_root=OUTPUT_ROOT
        )
        validate = ValidateConversionsOperator(
            task_id="validate",
            partition=partition,
            landing_root=LANDING_ROOT,
            output_root=OUTPUT_ROOT,
            **templates(ValidateConfig),
            dry_run=DRY_RUN,
        )
        send = SendConversionsOperator.partial(
            task_id="send",
            partition=partition,
            output_root=OUTPUT_ROOT,
            dry_run=DRY_RUN,
            map_index_template="shard {{ task.shard }}",
        ).expand(shard=validate.output)
        recover_held = RecoverHeldConversionsOperator(
            task_id="recover_held",
            output_root=OUTPUT_ROOT,
            partition=partition,
            **templates(RecoverConfig),
            dry_run=DRY_RUN,
            # After send: this partition's own events go out first, and held ones of earlier
            # partitions whose user came back with a fresh envelope right after.
            trigger_rule="all_done",
        )
        report = ReportConversionsOperator(task_id="report", partition=partition, output_root=OUTPUT_ROOT, dry_run=DRY_RUN)

        wait_for_partition >> claim_partition >> extract >> validate >> send >> recover_held >> report
    return dag
