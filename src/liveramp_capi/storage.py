"""Where a partition's files live: the landing root (input) and the output root, on object storage.

Both roots are ``ObjectStoragePath`` URLs (``file://`` by default; ``s3://``, ``gs://`` with the
matching fsspec package), so every worker of a distributed deployment sees the same files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from airflow.sdk import ObjectStoragePath

from liveramp_capi.domain.partition import (
    WORK_ROOT,
    PartitionLayout,
    check_root,
    input_kind,
    parse_partition,
    run_key,
)


class PartitionNotFound(FileNotFoundError):
    """The partition's folder does not exist under the landing root (yet)."""


@dataclass(frozen=True, slots=True)
class InputFile:
    """One file of a partition, as listed by the extract step."""

    name: str
    size: int


class PartitionStorage:
    """The input folder and output folder of one partition.

    :param landing_root: URL of the landing root (``<landing_root>/dt=<partition>/`` holds the input).
    :param output_root: URL of the output root (``<output_root>/dt=<partition>/`` receives results).
    :param partition: the partition name, ``YYYY-MM-DD`` or ``YYYY-MM-DDTHH``; checked again here.
    :param run_id: the Airflow run whose work folder (``_work/<run>/``) this storage writes.
    """

    def __init__(self, landing_root: str, output_root: str, partition: str, run_id: str | None = None) -> None:
        self.partition = parse_partition(partition)
        self.layout = PartitionLayout(self.partition, run_key(run_id) if run_id else "")
        self.input_dir = ObjectStoragePath(check_root(landing_root, name="capi_landing_root")) / self.layout.folder
        self.output_dir = ObjectStoragePath(check_root(output_root, name="capi_output_root")) / self.layout.folder

    # -- input -----------------------------------------------------------------------------
    def list_inputs(self) -> tuple[list[InputFile], list[str]]:
        """Return the partition's input files (sorted by name) and the names of files it ignores.

        :raises PartitionNotFound: when the partition folder does not exist.
        """
        if not self.input_dir.exists():
            raise PartitionNotFound(f"partition folder {self.layout.folder} does not exist under the landing root")
        inputs: list[InputFile] = []
        ignored: list[str] = []
        for child in self.input_dir.iterdir():
            if not child.is_file():
                ignored.append(child.name + "/")
            elif input_kind(child.name) is None:
                ignored.append(child.name)
            else:
                inputs.append(InputFile(child.name, child.stat().st_size))
        inputs.sort(key=lambda f: f.name)
        ignored.sort()
        return inputs, ignored

    def open_input(self, name: str) -> IO[bytes]:
        """Open one input file of the partition for binary streaming."""
        if "/" in name or name in {"", ".", ".."}:
            raise ValueError("input file names are plain names inside the partition folder")
        return (self.input_dir / name).open("rb")

    # -- output ----------------------------------------------------------------------------
    def output(self, relative: str) -> ObjectStoragePath:
        """Path of one output file, its parent folder created."""
        path = self.output_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def open_output(self, relative: str) -> IO[bytes]:
        """Open an output file for binary writing (replacing it)."""
        return self.output(relative).open("wb")

    def write_json(self, relative: str, value: Any) -> None:
        with self.open_output(relative) as stream:
            stream.write(json.dumps(value, indent=2, sort_keys=True).encode() + b"\n")

    def read_json(self, relative: str) -> Any:
        with (self.output_dir / relative).open("rb") as stream:
            return json.loads(stream.read())

    def exists(self, relative: str) -> bool:
        return (self.output_dir / relative).exists()

    def iter_output_files(self, relative_dir: str) -> Iterator[ObjectStoragePath]:
        """Files directly under an output folder, sorted by name; nothing when it does not exist."""
        folder = self.output_dir / relative_dir
        if not folder.exists():
            return iter(())
        return iter(sorted((p for p in folder.iterdir() if p.is_file()), key=lambda p: p.name))

    def publish(self, deliverable: str, *, dry_run: bool = False) -> None:
        """Move this run's draft of a deliverable into place, replacing the one there.

        Only the run holding the partition's claim calls this, so deliverables of two runs never
        interleave; on local storage the move is an atomic rename. A dry run's deliverable goes
        to ``dry_run/<deliverable>``, never over the real one.
        """
        draft = self.output_dir / self.layout.draft(deliverable)
        target = self.output(self.layout.dry_run(deliverable)) if dry_run else self.output_dir / deliverable
        if target.exists():
            target.unlink()
        draft.rename(target)

    def remove_other_runs(self) -> list[str]:
        """Delete other runs' work of this partition, keeping each run's ``summary.json``; return their names.

        Called by a run that has just claimed the partition: no other run may still use them.
        Their summaries stay as the record of what each run did (a few KB a run).
        """
        work = self.output_dir / WORK_ROOT
        if not work.exists():
            return []
        removed = []
        for child in work.iterdir():
            # Anything else under _work/ is another run's, or the flat layout of an older version.
            if child.name == self.layout.run:
                continue
            if not child.is_dir():
                child.unlink()
            else:
                for entry in child.iterdir():
                    if entry.name == self.layout.summary:
                        continue
                    if entry.is_dir():
                        entry.fs.rm(entry.path, recursive=True)
                    else:
                        entry.unlink()
            removed.append(child.name)
        return sorted(removed)

    def clear(self, relative_dir: str) -> None:
        """Remove an output folder's files, so a rerun never mixes with an earlier run's leftovers."""
        for path in self.iter_output_files(relative_dir):
            path.unlink()
