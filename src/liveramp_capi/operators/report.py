"""Report: what this run did for its partition, written whatever happened upstream; green only if delivered."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from liveramp_capi.operators.config_errors import permanent_config_errors, step_failures
from liveramp_capi.pipeline.config import flag


class ReportConversionsOperator(BaseOperator):
    """Write ``summary.json`` and ``failed.jsonl`` for a partition and fail unless it is complete.

    See :func:`liveramp_capi.pipeline.report.report_partition`.
    Runs after the send shards whatever their state (``trigger_rule="all_done"``), so a partial
    failure still leaves its counts. Because Airflow judges a run by its last tasks, this task
    fails unless this run delivered the partition (every valid event acknowledged, now or by an
    earlier run, and every upstream task succeeded): the run shows red and a rerun picks up the
    rest. It reads only this run's work folder, so an earlier run's output is never presented as
    this run's work; it publishes the partition's files only while this run owns the partition,
    then releases the claim.

    :param partition: the partition, ``YYYY-MM-DD`` or ``YYYY-MM-DDTHH`` (templated).
    :param output_root: URL of the output root (templated).
    :param capi_state_conn_id: the state database connection (the partition claim).
    :param dry_run: write the dry run's ``summary.json`` and ``plan.jsonl`` under ``dry_run/``
        (the partition's real files stay as they are); green once every step has planned.
    """

    template_fields: Sequence[str] = ("partition", "output_root", "dry_run_setting")
    ui_color = "#f3e8fd"

    def __init__(
        self,
        *,
        partition: str,
        output_root: str,
        capi_state_conn_id: str = "capi_state_default",
        dry_run: bool | str = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("trigger_rule", "all_done")
        super().__init__(**kwargs)
        self.partition = partition
        self.output_root = output_root
        self.capi_state_conn_id = capi_state_conn_id
        # Not ``self.dry_run``: that name is BaseOperator's dry_run() method.
        self.dry_run_setting = dry_run

    def execute(self, context: Any) -> dict[str, Any]:
        from liveramp_capi.hooks.state import CapiStateHook
        from liveramp_capi.operators.partition_claim import RunClaim, open_lease
        from liveramp_capi.pipeline.report import report_partition
        from liveramp_capi.storage import PartitionStorage

        with permanent_config_errors():
            dry_run = flag("dry_run", self.dry_run_setting)
            storage = PartitionStorage(None, self.output_root, self.partition, context["run_id"])
        with permanent_config_errors(self.capi_state_conn_id):
            lease = open_lease(CapiStateHook(capi_state_conn_id=self.capi_state_conn_id))
        unfinished = _unfinished_upstream(context, self.task_id)
        with step_failures():
            report = report_partition(
                storage, RunClaim(lease, storage.partition, context), dry_run=dry_run,
                run_id=context.get("run_id"), unfinished_tasks=unfinished,
            )
        return report.brief()


#: Task states that mean the task did what it should.
_DONE_STATES = frozenset({"success"})


def _unfinished_upstream(context: Any, report_task_id: str) -> dict[str, str]:
    """Tasks of this run, other than the report, that did not succeed: ``{task[map]: state}``.

    Asked of Airflow (the task SDK's task-state query) so that a skipped or failed step makes the
    run fail even when what it left on storage looks complete.
    """
    ti = context["ti"]
    try:
        found = ti.get_task_states(dag_id=ti.dag_id, run_ids=[context["run_id"]])
    except Exception as err:
        # The files on storage still decide; say that the task states could not be read.
        logging.getLogger(__name__).warning(
            "Could not read this run's task states (%s); judging by its files alone", type(err).__name__
        )
        return {}
    states = found.get(context["run_id"], found) if isinstance(found, dict) else {}
    return {
        str(task): str(state)
        for task, state in states.items()
        if not str(task).startswith(report_task_id) and str(state) not in _DONE_STATES
    }
