"""Where a partition's files live: the landing root (input) and the output root, on object storage.

Both roots are ``ObjectStoragePath`` URLs (``file://`` by default; ``s3://``, ``gs://`` with the
matching provider and fsspec package), so every worker of a distributed deployment sees the same
files. On object storage the part of the URL before ``@`` names the Airflow connection holding the
credentials (``s3://aws_default@bucket/prefix``); the URL itself never holds a secret.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

from airflow.sdk import ObjectStoragePath

from liveramp_capi.domain.partition import InvalidRoot, check_root, input_kind, parse_partition
from liveramp_capi.storage.layout import WORK_ROOT, PartitionLayout, RefreshLayout, run_key

#: Bytes an object-storage file buffers at once, reading ahead or writing one multipart part
#: (S3's smallest part is 5 MiB). s3fs defaults to 50 MiB, and validate holds one input and
#: every shard open together: the default would make memory grow with the partition.
OBJECT_BLOCK_BYTES = 8 * 2**20


class PartitionNotFound(FileNotFoundError):
    """The partition's folder does not exist under the landing root (yet)."""


class StorageUnreachable(InvalidRoot):
    """A storage root whose bucket does not exist or whose connection's credentials are refused."""


def check_root_reachable(url: str, *, variable: str, local_must_exist: bool = True) -> None:
    """Fail at once, naming the Variable and the connection, when a root cannot be used at all.

    On local storage the root folder must exist (unless ``local_must_exist`` is false: an output
    root is created on demand). On object storage, where folders exist only through their objects,
    the bucket must exist and the connection's credentials must be accepted; an empty prefix is a
    legitimate new feed. A storage error that may heal (network, throttling) is left to retries.

    :param url: the root URL (checked by :func:`check_root`).
    :param variable: the Variable it came from, for the message.
    :param local_must_exist: whether a ``file://`` root must already exist.
    :raises StorageUnreachable: on a missing bucket/folder or refused credentials.
    :raises AirflowNotFoundException: when the URL names a connection that is not defined.
    """
    root = ObjectStoragePath(check_root(url, name=variable))
    if root.protocol in ("", "file", "local"):
        if local_must_exist and not root.is_dir():
            raise StorageUnreachable(
                f"the folder {root.path} does not exist (Variable {variable}): check it for a typo or a missing mount"
            )
        return
    conn_id = root.conn_id
    if conn_id:
        from airflow.sdk import BaseHook

        # Providers fall back to the worker's ambient credentials for an unknown connection id;
        # a typo in the id must fail here instead of reading with some other identity.
        BaseHook.get_connection(conn_id)
    who = f"connection {conn_id!r}" if conn_id else "the worker's default credentials (no connection named in the URL)"
    try:
        root.fs.info(root.bucket)
    except FileNotFoundError:
        raise StorageUnreachable(
            f"bucket {root.bucket!r} does not exist (Variable {variable}, {root.protocol}:// through {who}): "
            "create it or fix the Variable"
        ) from None
    except PermissionError:
        # The provider's text may quote request details; the kind of refusal is enough here.
        raise StorageUnreachable(
            f"{root.protocol}:// refused {who} for bucket {root.bucket!r} (Variable {variable}): check the "
            "connection's access key and secret (or role), its endpoint_url, and its permissions on the bucket"
        ) from None


def _open(path: Any, mode: str, **options: Any) -> BinaryIO:
    """``path.open`` typed: ObjectStoragePath's own is not."""
    return cast(BinaryIO, path.open(mode, **options))


@dataclass(frozen=True, slots=True)
class InputFile:
    """One file of a partition, as listed by the extract step."""

    name: str
    size: int


class OutputFolder:
    """One folder under the output root: what a run writes, reads back and replaces.

    :param output_root: URL of the output root (checked; names the Variable ``capi_output_root``).
    :param folder: the folder under it, from :mod:`liveramp_capi.storage.layout`.
    """

    def __init__(self, output_root: str, folder: str) -> None:
        self.output_dir = ObjectStoragePath(check_root(output_root, name="capi_output_root")) / folder

    def output(self, relative: str) -> ObjectStoragePath:
        """Path of one output file, its parent folder created."""
        path = self.output_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def open_output(self, relative: str) -> BinaryIO:
        """Open an output file for binary writing (replacing it)."""
        return _open(self.output(relative), "wb", block_size=OBJECT_BLOCK_BYTES)

    def open_read(self, relative: str) -> BinaryIO:
        """Open an output file for binary reading."""
        return _open(self.output_dir / relative, "rb")

    def write_json(self, relative: str, value: Any) -> None:
        with self.open_output(relative) as stream:
            stream.write(json.dumps(value, indent=2, sort_keys=True).encode() + b"\n")

    def read_json(self, relative: str) -> Any:
        with self.open_read(relative) as stream:
            return json.loads(stream.read())

    def read_json_if_exists(self, relative: str) -> Any:
        """The JSON file's value, or None when it does not exist."""
        return self.read_json(relative) if self.exists(relative) else None

    def exists(self, relative: str) -> bool:
        return bool((self.output_dir / relative).exists())

    def remove(self, *relatives: str) -> None:
        """Delete these output files where they exist."""
        for relative in relatives:
            path = self.output_dir / relative
            if path.exists():
                path.unlink()

    def iter_output_files(self, relative_dir: str) -> Iterator[ObjectStoragePath]:
        """Files directly under an output folder, sorted by name; nothing when it does not exist."""
        folder = self.output_dir / relative_dir
        if not folder.exists():
            return iter(())
        return iter(sorted((p for p in folder.iterdir() if p.is_file()), key=lambda p: p.name))

    def concatenate(self, relative_dir: str, target: str) -> None:
        """Write the files under ``relative_dir``, in name order, into one output file."""
        with self.open_output(target) as out:
            for path in self.iter_output_files(relative_dir):
                out.write(path.read_bytes())

    def clear(self, relative_dir: str) -> None:
        """Remove an output folder's files, so a rerun never mixes with an earlier run's leftovers."""
        for path in self.iter_output_files(relative_dir):
            path.unlink()


class RefreshFolder(OutputFolder):
    """``<output_root>/envelope_refresh/<run_date>/``: what one envelope refresh run writes.

    :param output_root: URL of the output root.
    :param run_date: the run's date, ``YYYY-MM-DD``; checked here.
    """

    def __init__(self, output_root: str, run_date: str) -> None:
        self.layout = RefreshLayout(parse_partition(run_date))
        self.run_date = self.layout.run_date
        super().__init__(output_root, self.layout.folder)


class PartitionStorage(OutputFolder):
    """The output folder of one partition, and its input folder when the step reads the input.

    :param landing_root: URL of the landing root (``<landing_root>/dt=<partition>/`` holds the
        input); None for the steps that read only what earlier steps wrote.
    :param output_root: URL of the output root (``<output_root>/dt=<partition>/`` receives results).
    :param partition: the partition name, ``YYYY-MM-DD`` or ``YYYY-MM-DDTHH``; checked again here.
    :param run_id: the Airflow run whose work folder (``_work/<run>/``) this storage writes.
    """

    def __init__(self, landing_root: str | None, output_root: str, partition: str, run_id: str | None = None) -> None:
        self.partition = parse_partition(partition)
        self.layout = PartitionLayout(self.partition, run_key(run_id) if run_id else "")
        super().__init__(output_root, self.layout.folder)
        self._input_dir = (
            None
            if landing_root is None
            else ObjectStoragePath(check_root(landing_root, name="capi_landing_root")) / self.layout.folder
        )

    @property
    def input_dir(self) -> ObjectStoragePath:
        if self._input_dir is None:
            raise ValueError("this step was given no landing root: it reads only the partition's output")
        return self._input_dir

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

    def open_input(self, name: str) -> BinaryIO:
        """Open one input file of the partition for binary streaming."""
        if "/" in name or name in {"", ".", ".."}:
            raise ValueError("input file names are plain names inside the partition folder")
        return _open(self.input_dir / name, "rb", block_size=OBJECT_BLOCK_BYTES)

    # -- output ----------------------------------------------------------------------------
    def publish(self, deliverable: str, *, dry_run: bool = False) -> None:
        """Move this run's draft of a deliverable into place, replacing the one there.

        Only the run holding the partition's claim calls this, so deliverables of two runs never
        interleave. The target is replaced, never deleted first: on local storage the move is an
        atomic rename; on object storage it is a server-side copy (one object written whole, or
        not at all) then the draft's deletion, so a reader sees the old file or the new one and a
        publish cut short leaves at worst a draft behind in the run's work folder. A dry run's
        deliverable goes to ``dry_run/<deliverable>``, never over the real one.
        """
        draft = self.output_dir / self.layout.draft(deliverable)
        target = self.output(self.layout.dry_run(deliverable)) if dry_run else self.output_dir / deliverable
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
