"""Extract: fix the list of files that make up a partition before anything reads them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from liveramp_capi.pipeline.errors import PermanentStepFailure

if TYPE_CHECKING:
    from liveramp_capi.storage import PartitionStorage

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Manifest:
    """The partition's input files as the run will read them (written as the run's ``manifest.json``)."""

    partition: str
    files: list[dict[str, Any]]
    ignored_files: list[str]

    def brief(self) -> dict[str, Any]:
        """Counts for XCom."""
        return {"partition": self.partition, "files": len(self.files),
                "bytes": sum(f["size"] for f in self.files), "ignored_files": len(self.ignored_files)}


def extract_partition(storage: PartitionStorage, *, allow_empty: bool = False) -> Manifest:
    """List the partition's input files into the run's manifest.

    Later steps read exactly the manifest's files, so a file that lands while the run is under
    way is not half-read by one task and missed by another: the next run of the partition picks it up.

    :raises PermanentStepFailure: when the partition holds no input file and ``allow_empty`` is false.
    """
    inputs, ignored = storage.list_inputs()
    if ignored:
        _LOG.warning(
            "Partition %s: ignoring %d entries that are not *.jsonl, *.jsonl.gz, *.csv or *.csv.gz: %s",
            storage.partition, len(ignored), ", ".join(ignored[:20]),
        )
    if not inputs and not allow_empty:
        raise PermanentStepFailure(
            f"partition {storage.partition} holds no input files (*.jsonl, *.jsonl.gz, *.csv, *.csv.gz); "
            "set allow_empty=True if an empty day is expected"
        )
    manifest = Manifest(storage.partition, [{"name": f.name, "size": f.size} for f in inputs], ignored)
    storage.write_json(storage.layout.manifest,
                       {"partition": manifest.partition, "files": manifest.files, "ignored_files": ignored})
    brief = manifest.brief()
    _LOG.info("Partition %s: %d input files, %d bytes", storage.partition, brief["files"], brief["bytes"])
    return manifest
