"""Report: what this run did for its partition, written whatever happened upstream; green only if delivered."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from liveramp_capi.operators.config_errors import permanent_config_errors


class ReportConversionsOperator(BaseOperator):
    """Write ``summary.json`` and ``failed.jsonl`` for a partition and fail unless it is complete.

    Runs after the send shards whatever their state (``trigger_rule="all_done"``), so a partial
    failure still leaves its counts. Because Airflow judges a run by its last tasks, this task
    fails unless this run delivered the partition (every valid event acknowledged, now or by an
    earlier run, and every upstream task succeeded): the run shows red and a rerun picks up the
    rest. It reads only this run's work folder, so an earlier run's output is never presented as
    this run's work; it publishes the partition's files only while this run owns the partition,
    then releases the claim.

    :param partition: the partition, ``YYYY-MM-DD`` or ``YYYY-MM-DDTHH`` (templated).
    :param landing_root: URL of the landing root (templated).
    :param output_root: URL of the output root (templated).
    :param capi_state_conn_id: the state database connection (the partition claim).
    :param dry_run: write the dry run's ``summary.json`` and ``plan.jsonl`` under ``dry_run/``
        (the partition's real files stay as they are); green once every step has planned.
    """

    template_fields: Sequence[str] = ("partition", "landing_root", "output_root", "dry_run")
    ui_color = "#f3e8fd"

    def __init__(
        self,
        *,
        partition: str,
        landing_root: str,
        output_root: str,
        capi_state_conn_id: str = "capi_state_default",
        dry_run: bool | str = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("trigger_rule", "all_done")
        super().__init__(**kwargs)
        self.partition = partition
        self.landing_root = landing_root
        self.output_root = output_root
        self.capi_state_conn_id = capi_state_conn_id
        self.dry_run = dry_run

    def execute(self, context: Any) -> dict[str, Any]:
        from liveramp_capi.domain.dry_run import build_dry_run_summary
        from liveramp_capi.domain.held import HELD_RECOVERY_FILE
        from liveramp_capi.domain.summary import build_summary
        from liveramp_capi.hooks.state import CapiStateHook
        from liveramp_capi.operators.config_errors import setting_flag
        from liveramp_capi.operators.partition_claim import open_lease, run_owner, try_claim
        from liveramp_capi.state.lease import PartitionHeld
        from liveramp_capi.storage import PartitionStorage

        with permanent_config_errors():
            storage = PartitionStorage(self.landing_root, self.output_root, self.partition, context["run_id"])
        layout = storage.layout
        dry_run = setting_flag(self.dry_run, "dry_run")
        validation = storage.read_json(layout.validation) if storage.exists(layout.validation) else None
        results = [json.loads(path.read_bytes()) for path in storage.iter_output_files(layout.results_dir)]
        summary = (build_dry_run_summary if dry_run else build_summary)(
            storage.partition,
            validation,
            results,
            run_id=context.get("run_id"),
            unfinished_tasks=_unfinished_upstream(context, self.task_id),
        )
        # Conversions of earlier partitions won back (or lost) by this run's recover_held task.
        if storage.exists(layout.work(HELD_RECOVERY_FILE)):
            summary["held_conversions"] = storage.read_json(layout.work(HELD_RECOVERY_FILE))
        # The run's own summary is always kept in its work folder; the partition's deliverables
        # are replaced only by the run that owns the partition, never by a run that lost it.
        storage.write_json(layout.work(layout.summary), summary)
        with permanent_config_errors(self.capi_state_conn_id):
            lease = open_lease(CapiStateHook(capi_state_conn_id=self.capi_state_conn_id))
        if summary["status"] == "not_processed":
            # A run that read nothing has nothing to publish: the partition's files stay those of
            # the run that last processed it (perhaps the very run this one waited for).
            lease.release(storage.partition, run_owner(context))
            self._raise_unless_complete(storage, summary)
        try:
            try_claim(lease, storage.partition, context)
        except PartitionHeld as held:
            raise AirflowFailException(
                f"{held}; this run's summary is in {layout.folder}/{layout.work(layout.summary)} and the "
                "partition's own files were left as that run writes them"
            ) from None
        try:
            if dry_run:
                self._publish_dry_run(storage, summary)
            else:
                self._publish(storage, summary)
        finally:
            # The run is done with its partition (whatever its outcome): the next run need not wait.
            lease.release(storage.partition, run_owner(context))
        self.log.info("Partition %s summary: %s", storage.partition, json.dumps(summary, sort_keys=True))
        self._raise_unless_complete(storage, summary)
        if dry_run:
            return {k: summary.get(k) for k in ("partition", "status", "dry_run", "read", "valid", "rejected",
                                                "planned_batches", "planned_events")}
        return {
            k: summary.get(k)
            for k in ("partition", "status", "read", "valid", "rejected", "duplicates", "delivered_events",
                      "delivered_this_run", "previously_delivered_events", "failed_events")
        }

    @staticmethod
    def _publish(storage: Any, summary: dict[str, Any]) -> None:
        layout = storage.layout
        # failed.jsonl lists what is still failed after this run; envelope_expired.jsonl the events
        # held back at send time because every envelope they could use had expired.
        for deliverable, parts_dir in ((layout.failed, layout.failed_dir), (layout.envelope_expired, layout.expired_dir)):
            with storage.open_output(layout.draft(deliverable)) as out:
                for path in storage.iter_output_files(parts_dir):
                    out.write(path.read_bytes())
            storage.publish(deliverable)
        storage.write_json(layout.draft(layout.summary), summary)
        storage.publish(layout.summary)

    @staticmethod
    def _publish_dry_run(storage: Any, summary: dict[str, Any]) -> None:
        layout = storage.layout
        with storage.open_output(layout.draft(layout.plan)) as out:
            for path in storage.iter_output_files(layout.plan_dir):
                out.write(path.read_bytes())
        storage.publish(layout.plan, dry_run=True)
        storage.write_json(layout.draft(layout.summary), summary)
        storage.publish(layout.summary, dry_run=True)

    @staticmethod
    def _raise_unless_complete(storage: Any, summary: dict[str, Any]) -> None:
        layout = storage.layout
        where = f"see {layout.folder}/{layout.summary}"
        if summary["status"] == "not_processed":
            stopped = ", ".join(f"{task} {state}" for task, state in summary["unfinished_tasks"].items())
            raise AirflowFailException(
                f"partition {storage.partition} was not processed by this run ({stopped or 'validation did not run'}): "
                f"nothing was sent; this run's summary is {layout.folder}/{layout.work(layout.summary)}"
            )
        if summary.get("dry_run"):
            where = f"see {layout.folder}/{layout.dry_run(layout.summary)}"
            if summary["status"] != "planned":
                stopped = ", ".join(f"{task} {state}" for task, state in summary["unfinished_tasks"].items())
                raise AirflowFailException(
                    f"dry run of partition {storage.partition} is {summary['status'].replace('_', ' ')}"
                    + (f"; tasks not done: {stopped}" if stopped else "") + f"; {where}"
                )
        elif summary["status"] != "complete":
            stopped = ", ".join(f"{task} {state}" for task, state in summary["unfinished_tasks"].items())
            raise AirflowFailException(
                f"partition {storage.partition} is {summary['status'].replace('_', ' ')}: this run delivered "
                f"{summary.get('delivered_this_run', 0)} events ({summary.get('previously_delivered_events', 0)} "
                f"were delivered by earlier runs), {summary.get('failed_events', 0)} failed, "
                f"{summary.get('pending_events', 0)} not sent"
                + (f"; tasks not done: {stopped}" if stopped else "")
                + f"; {where} and {layout.failed}"
            )
        broken = [name for name, ok in summary["checks"].items() if not ok]
        if broken:
            raise AirflowFailException(f"partition {storage.partition}: counts do not add up ({', '.join(broken)})")


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
