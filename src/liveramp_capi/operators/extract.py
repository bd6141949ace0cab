"""Extract: fix the list of files that make up a partition before anything reads them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from liveramp_capi.operators.config_errors import permanent_config_errors


class ExtractPartitionOperator(BaseOperator):
    """List a partition's input files and write them to the run's manifest.

    Later steps read exactly the manifest's files, so a file that lands while the run is under
    way is not half-read by one task and missed by another: the next run of the partition
    picks it up.

    :param partition: the partition, ``YYYY-MM-DD`` or ``YYYY-MM-DDTHH`` (templated).
    :param landing_root: URL of the landing root (templated).
    :param output_root: URL of the output root (templated).
    :param allow_empty: succeed on a partition folder with no input files (default: fail, since
        a day without a single conversion usually means a broken upstream export).
    """

    template_fields: Sequence[str] = ("partition", "landing_root", "output_root")
    ui_color = "#e8f0fe"

    def __init__(
        self,
        *,
        partition: str,
        landing_root: str,
        output_root: str,
        allow_empty: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.partition = partition
        self.landing_root = landing_root
        self.output_root = output_root
        self.allow_empty = allow_empty

    def execute(self, context: Any) -> dict[str, Any]:
        from liveramp_capi.storage import PartitionStorage

        with permanent_config_errors():
            storage = PartitionStorage(self.landing_root, self.output_root, self.partition, context["run_id"])
        inputs, ignored = storage.list_inputs()
        if ignored:
            self.log.warning(
                "Partition %s: ignoring %d entries that are not *.jsonl, *.jsonl.gz, *.csv or *.csv.gz: %s",
                storage.partition,
                len(ignored),
                ", ".join(ignored[:20]),
            )
        if not inputs and not self.allow_empty:
            raise AirflowFailException(
                f"partition {storage.partition} holds no input files (*.jsonl, *.jsonl.gz, *.csv, *.csv.gz); "
                "set allow_empty=True if an empty day is expected"
            )
        manifest = {
            "partition": storage.partition,
            "files": [{"name": f.name, "size": f.size} for f in inputs],
            "ignored_files": ignored,
        }
        storage.write_json(storage.layout.manifest, manifest)
        total = sum(f.size for f in inputs)
        self.log.info("Partition %s: %d input files, %d bytes", storage.partition, len(inputs), total)
        return {"partition": storage.partition, "files": len(inputs), "bytes": total, "ignored_files": len(ignored)}
