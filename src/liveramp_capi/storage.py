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

from liveramp_capi.domain.partition import PartitionLayout, check_root, input_kind, parse_partition


class PartitionNotFound(FileNotFoundError):
    """The partition's folder does not exist under the landing root (yet)."""


@dataclass(frozen=True, slots=True)
class InputFile:
    """One file of a partition, as listed by the extract step."""

    name: str
    size: int


class PartitionStorage:
    """The input folder and output folder of one partition.

    :param landing_root: URL of the landing root (``<landing_root>/dt=YYYY-MM-DD/`` holds the input).
    :param output_root: URL of the output root (``<output_root>/dt=YYYY-MM-DD/`` receives results).
    :param partition: the partition name, ``YYYY-MM-DD``; checked again here.
    """

    def __init__(self, landing_root: str, output_root: str, partition: str) -> None:
        self.partition = parse_partition(partition)
        self.layout = PartitionLayout(self.partition)
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

    def clear(self, relative_dir: str) -> None:
        """Remove an output folder's files, so a rerun never mixes with an earlier run's leftovers."""
        for path in self.iter_output_files(relative_dir):
            path.unlink()
