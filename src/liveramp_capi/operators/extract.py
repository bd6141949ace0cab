"""Extract: adapter of :func:`liveramp_capi.pipeline.extract.extract_partition`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from liveramp_capi.operators.config_errors import permanent_config_errors, step_failures


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
        from liveramp_capi.pipeline.extract import extract_partition
        from liveramp_capi.storage import PartitionStorage

        with permanent_config_errors():
            storage = PartitionStorage(self.landing_root, self.output_root, self.partition, context["run_id"])
        with step_failures():
            return extract_partition(storage, allow_empty=self.allow_empty).brief()
