"""
### Keep ATS identity envelopes alive: the daily envelope refresh

ATS envelopes expire 30 days after they were issued, 15 days for California. Nothing in a
record tells a Californian apart, so the store gives 15 days unless the consent proves another
jurisdiction (TCF v2, or GPP sections naming only non-Californian jurisdictions); see the
README for the `envelope_lifetime_rule` override. The conversions pipeline keeps the newest
envelope of every advertiser user key in the envelope store (`capi_envelope_store` in the state
database, connection `capi_state_default`); this DAG refreshes each envelope once at most
`capi_envelope_refresh_remaining_share` (default a third) of its own lifetime is left, through
LiveRamp's envelope refresh API (connection `liveramp_envelope_default`: base URL, extra `pid`
and `origin`), so offline conversions sent weeks later still carry a live envelope.

| task | what it does |
|---|---|
| `plan` | marks expired rows (counted by the state they were found in), counts the rows due, splits them into slices by a stable hash of the user key |
| `refresh` | one mapped task per slice: pages through its rows, many requests in flight, retries with backoff and `Retry-After`, a rate ceiling; stores each new envelope, or the failure reason (the old envelope is kept) |
| `recover_held` | delivers conversions held back for an expired envelope whose user key now has a live one (exactly once, through the ledger); marks those past the attribution window lost |
| `report` | writes `<capi_output_root>/envelope_refresh/<date>/summary.json` (selected, refreshed, failed by reason, skipped for consent, expired when found, held conversions recovered/lost) and fails above `capi_envelope_refresh_max_failure_ratio` (default 0.1) |

Rows without consent are never sent; they are counted as *skipped for consent*. A rerun of the
day refreshes only what is still due. Only counts are logged.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import DAG

from liveramp_capi.dags_factory import OUTPUT_ROOT, retrying_tasks
from liveramp_capi.notifiers import default_failure_notifier
from liveramp_capi.operators.recover import RecoverHeldConversionsOperator
from liveramp_capi.operators.refresh import (
    PlanEnvelopeRefreshOperator,
    RefreshEnvelopesOperator,
    ReportEnvelopeRefreshOperator,
)
from liveramp_capi.pipeline.config import RecoverConfig, RefreshPlanConfig, RefreshReportConfig, templates

RUN_DATE = "{{ ds }}"

with DAG(
    dag_id="ats_envelope_refresh",
    description="Refresh ATS identity envelopes before they expire",
    doc_md=__doc__,
    # Daily, after the conversions run (03:00 UTC) has upserted the day's envelopes.
    schedule="30 5 * * *",
    start_date=dt.datetime(2026, 11, 1, tzinfo=dt.UTC),
    catchup=False,
    # Two runs at once would refresh the same rows twice.
    max_active_runs=1,
    tags=["liveramp", "ats", "envelopes"],
    on_failure_callback=default_failure_notifier("envelope refresh failed"),
    default_args=retrying_tasks(first_delay_minutes=5, max_delay_minutes=30),
) as dag:
    plan = PlanEnvelopeRefreshOperator(
        task_id="plan",
        run_date=RUN_DATE,
        output_root=OUTPUT_ROOT,
        **templates(RefreshPlanConfig),
    )
    refresh = RefreshEnvelopesOperator.partial(
        task_id="refresh",
        run_date=RUN_DATE,
        output_root=OUTPUT_ROOT,
        map_index_template="slice {{ task.slice_index }}",
    ).expand_kwargs(plan.output)
    recover_held = RecoverHeldConversionsOperator(
        task_id="recover_held",
        output_root=OUTPUT_ROOT,
        run_date=RUN_DATE,
        **templates(RecoverConfig),
        # Refreshed or not, envelopes that arrived with the latest partitions can win events back.
        trigger_rule="all_done",
    )
    report = ReportEnvelopeRefreshOperator(
        task_id="report",
        run_date=RUN_DATE,
        output_root=OUTPUT_ROOT,
        **templates(RefreshReportConfig),
    )

    plan >> refresh >> recover_held >> report
