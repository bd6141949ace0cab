"""Report: the partition's summary and failure list, written whatever happened upstream."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from liveramp_capi.operators.config_errors import permanent_config_errors


class ReportConversionsOperator(BaseOperator):
    """Write ``summary.json`` and ``failed.jsonl`` for a partition and fail unless it is complete.

    Runs after the send shards whatever their state (``trigger_rule="all_done"``), so a partial
    failure still leaves its counts. Because Airflow judges a run by its last tasks, this task
    fails when the partition is incomplete: the run shows red and a rerun picks up the rest.

    :param partition: the partition, ``YYYY-MM-DD`` (templated).
    :param landing_root: URL of the landing root (templated).
    :param output_root: URL of the output root (templated).
    """

    template_fields: Sequence[str] = ("partition", "landing_root", "output_root")
    ui_color = "#f3e8fd"

    def __init__(self, *, partition: str, landing_root: str, output_root: str, **kwargs: Any) -> None:
        kwargs.setdefault("trigger_rule", "all_done")
        super().__init__(**kwargs)
        self.partition = partition
        self.landing_root = landing_root
        self.output_root = output_root

    def execute(self, context: Any) -> dict[str, Any]:
        import json

        from liveramp_capi.domain.held import HELD_RECOVERY_FILE
        from liveramp_capi.domain.summary import build_summary
        from liveramp_capi.storage import PartitionStorage

        with permanent_config_errors():
            storage = PartitionStorage(self.landing_root, self.output_root, self.partition)
        layout = storage.layout
        validation = storage.read_json(layout.validation) if storage.exists(layout.validation) else None

        results = []
        for path in storage.iter_output_files(layout.results_dir):
            with path.open("rb") as stream:
                results.append(json.loads(stream.read()))
        # failed.jsonl is rewritten on every report so that it lists what is still failed now.
        with storage.open_output(layout.failed) as out:
            for path in storage.iter_output_files(layout.failed_dir):
                with path.open("rb") as stream:
                    out.write(stream.read())

        # envelope_expired.jsonl: events held back at send time because their envelope expired.
        with storage.open_output(layout.envelope_expired) as out:
            for path in storage.iter_output_files(layout.expired_dir):
                with path.open("rb") as stream:
                    out.write(stream.read())

        summary = build_summary(storage.partition, validation, results, run_id=context.get("run_id"))
        # Conversions of earlier partitions won back (or lost) by this run's recover_held task.
        if storage.exists(HELD_RECOVERY_FILE):
            summary["held_conversions"] = storage.read_json(HELD_RECOVERY_FILE)
        storage.write_json(layout.summary, summary)
        self.log.info("Partition %s summary: %s", storage.partition, json.dumps(summary, sort_keys=True))

        if summary["status"] != "complete":
            raise AirflowFailException(
                f"partition {storage.partition} is {summary['status'].replace('_', ' ')}: "
                f"{summary.get('failed_events', 0)} events failed, {summary.get('pending_events', 0)} not sent; "
                f"see {layout.folder}/{layout.summary} and {layout.failed}"
            )
        broken = [name for name, ok in summary["checks"].items() if not ok]
        if broken:
            raise AirflowFailException(f"partition {storage.partition}: counts do not add up ({', '.join(broken)})")
        return {k: summary[k] for k in ("partition", "status", "read", "valid", "rejected", "duplicates",
                                         "delivered_events", "failed_events")}
