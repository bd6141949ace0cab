"""
### TikTok conversions through LiveRamp's ATS Conversions API adapter

One run per daily **partition** `dt=YYYY-MM-DD` of conversion files under the Variable
`capi_landing_root`. Each event carries an ATS identity envelope (`user_data.partner_id`)
instead of personal data.

| task | what it does |
|---|---|
| `wait_for_partition` | waits, in the triggerer (no worker slot held), for `dt=YYYY-MM-DD/_SUCCESS`, the marker the export writes last; fails after `capi_partition_wait_minutes` (360) with a clear message |
| `claim_partition` | claims the partition for this run in the state database (a lease with heartbeat and expiry); while another run of the same partition works, waits up to `capi_partition_claim_wait_minutes` (60), then fails naming that run |
| `extract` | lists the partition's `*.jsonl`, `*.jsonl.gz`, `*.csv`, `*.csv.gz` files into the run's manifest |
| `validate` | checks every record (JSON Schema, duplicate `event_id`, 28-day window); rejects go to `rejected.jsonl` with file, line, pointer and reason; valid events are spilled to session shards |
| `send` | one mapped task per shard: sessions -> batches -> LiveRamp, many requests in flight; the delivery ledger makes reruns send only what was not acknowledged; events whose every envelope expired are held (`envelope_expired.jsonl`) |
| `recover_held` | delivers, exactly once, conversions held by earlier partitions whose user key now has a live envelope (this partition may have brought it); held events past the attribution window become lost |
| `report` | runs whatever happened upstream; writes this run's `summary.json` (and `failed.jsonl`, `envelope_expired.jsonl`) under `capi_output_root`, releases the claim, and fails unless this run's partition is delivered |

Every task writes into the run's own work folder (`dt=.../_work/<run>/`); the partition's files
are moved into place only by the run that owns the partition, so two runs never mix output.


**Rerun a failed partition**: clear the failed tasks (UI) or
`airflow dags clear tiktok_conversions --partition-key YYYY-MM-DD`. **Manual run**: trigger
with the param `partition` set to `YYYY-MM-DD`.

**Alerts**: a failed run calls `default_failure_notifier()` (log-only unless
`CAPI_FAILURE_NOTIFIER` names another notifier); a run not finished
`CAPI_PARTITION_DEADLINE_MINUTES` (opt-in, e.g. 360) after it was queued raises a deadline alert.
"""

from __future__ import annotations

import datetime as dt
import os

from airflow.sdk import DAG, CronPartitionTimetable, Param

from liveramp_capi.notifiers import default_failure_notifier, partition_deadline_alert
from liveramp_capi.operators.claim import ClaimPartitionOperator
from liveramp_capi.operators.extract import ExtractPartitionOperator
from liveramp_capi.operators.recover import RecoverHeldConversionsOperator
from liveramp_capi.operators.report import ReportConversionsOperator
from liveramp_capi.operators.send import SendConversionsOperator
from liveramp_capi.operators.validate import ValidateConversionsOperator
from liveramp_capi.sensors import PartitionReadySensor

_AIRFLOW_HOME = os.environ.get("AIRFLOW_HOME", os.path.expanduser("~/airflow"))
# Manual runs name their partition; scheduled runs get it from the partition timetable; a
# run made without either falls back to its logical date.
PARTITION = "{{ params.partition or partition_key or ds }}"
LANDING_ROOT = "{{ var.value.get('capi_landing_root', '" + f"file://{_AIRFLOW_HOME}/capi/landing" + "') }}"
OUTPUT_ROOT = "{{ var.value.get('capi_output_root', '" + f"file://{_AIRFLOW_HOME}/capi/output" + "') }}"

with DAG(
    dag_id="tiktok_conversions",
    description="Deliver a day's conversions to TikTok through LiveRamp's ATS CAPI adapter",
    doc_md=__doc__,
    # 03:00 UTC each day, for the day before: the key of the run of 2026-11-21 is 2026-11-20.
    schedule=CronPartitionTimetable("0 3 * * *", timezone="UTC", run_offset=-1, key_format="%Y-%m-%d"),
    start_date=dt.datetime(2026, 11, 1, tzinfo=dt.UTC),
    catchup=False,
    # Two runs at once serve a backfill (different partitions in parallel). Two runs of the SAME
    # partition (a manual trigger beside the scheduled run) are serialised by claim_partition.
    max_active_runs=2,
    tags=["tiktok", "liveramp", "conversions"],
    # A failed partition reaches a human through a pluggable notifier; a late one through a deadline.
    on_failure_callback=default_failure_notifier("partition failed"),
    deadline=partition_deadline_alert(),
    params={
        "partition": Param(
            None,
            type=["null", "string"],
            pattern=r"^\d{4}-\d{2}-\d{2}$",
            title="Partition",
            description="Day to (re)process, YYYY-MM-DD. Empty: the scheduled partition.",
        ),
    },
    default_args={
        "owner": "data-engineering",
        "retries": 2,
        "retry_delay": dt.timedelta(minutes=2),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": dt.timedelta(minutes=20),
    },
) as dag:
    wait_for_partition = PartitionReadySensor(
        task_id="wait_for_partition",
        partition=PARTITION,
        landing_root=LANDING_ROOT,
        max_wait_minutes="{{ var.value.get('capi_partition_wait_minutes', '360') }}",
        poll_seconds="{{ var.value.get('capi_partition_poll_seconds', '60') }}",
        # Waiting is not failing: the sensor's own timeout is the limit, not retries.
        retries=1,
    )
    claim_partition = ClaimPartitionOperator(
        task_id="claim_partition",
        partition=PARTITION,
        landing_root=LANDING_ROOT,
        output_root=OUTPUT_ROOT,
        wait_minutes="{{ var.value.get('capi_partition_claim_wait_minutes', '60') }}",
        poll_seconds="{{ var.value.get('capi_partition_claim_poll_seconds', '15') }}",
    )
    extract = ExtractPartitionOperator(
        task_id="extract", partition=PARTITION, landing_root=LANDING_ROOT, output_root=OUTPUT_ROOT
    )
    validate = ValidateConversionsOperator(
        task_id="validate",
        partition=PARTITION,
        landing_root=LANDING_ROOT,
        output_root=OUTPUT_ROOT,
        max_invalid_ratio="{{ var.value.get('capi_max_invalid_ratio', '0.05') }}",
        max_event_age_days="{{ var.value.get('capi_max_event_age_days', '28') }}",
        allow_custom_events="{{ var.value.get('capi_allow_custom_events', 'false') }}",
        # Smaller shards spread one partition over more workers (and bound each task's memory).
        events_per_shard="{{ var.value.get('capi_events_per_shard', '100000') }}",
    )
    send = SendConversionsOperator.partial(
        task_id="send",
        partition=PARTITION,
        landing_root=LANDING_ROOT,
        output_root=OUTPUT_ROOT,
        map_index_template="shard {{ task.shard }}",
    ).expand(shard=validate.output)
    recover_held = RecoverHeldConversionsOperator(
        task_id="recover_held",
        output_root=OUTPUT_ROOT,
        result_folder="dt=" + PARTITION,
        partition=PARTITION,
        max_event_age_days="{{ var.value.get('capi_max_event_age_days', '28') }}",
        # After send: this partition's own events go out first, and held ones of earlier
        # partitions whose user came back with a fresh envelope right after.
        trigger_rule="all_done",
    )
    report = ReportConversionsOperator(
        task_id="report", partition=PARTITION, landing_root=LANDING_ROOT, output_root=OUTPUT_ROOT
    )

    wait_for_partition >> claim_partition >> extract >> validate >> send >> recover_held >> report
