"""Partition and envelope-refresh summaries on the output root, read defensively for the console.

A summary may be missing (the run has not reported yet), old (keys added later are absent) or
newer than this code (unknown keys): what is there is shown, nothing is assumed. Only numbers,
booleans and a few named text fields leave this module (:func:`redact`), so a summary that one
day carried an identifier would not put it on a page.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from airflow.sdk import ObjectStoragePath

from liveramp_capi.storage.layout import ENVELOPE_REFRESH_ROOT, PartitionLayout, RefreshLayout, run_key

#: A partition folder: a day (``dt=2026-11-20``) or an hour (``dt=2026-11-20T13``).
_PARTITION_FOLDER = re.compile(r"\Adt=(\d{4}-\d{2}-\d{2}(?:T\d{2})?)\Z", re.ASCII)
_RUN_DATE = re.compile(r"\A\d{4}-\d{2}-\d{2}\Z")
#: Text values kept by :func:`redact`; every other string is dropped (dict keys are kept: they
#: are reason codes, counter and check names).
TEXT_FIELDS = frozenset(
    {"partition", "status", "run_id", "run_date", "task_id", "state", "code", "reason", "as_of", "dag_run_id"}
)
_MAX_DEPTH = 4


def redact(value: Any, key: str | None = None, depth: int = 0) -> Any:
    """Keep numbers, booleans, None and the text of :data:`TEXT_FIELDS`; drop every other string.

    :param value: a parsed JSON value.
    :param key: the key it was found under.
    :param depth: nesting level (deeper values are dropped).
    """
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return value[:200] if key in TEXT_FIELDS else None
    if depth >= _MAX_DEPTH:
        return None
    if isinstance(value, Mapping):
        kept = {str(k)[:100]: redact(v, str(k), depth + 1) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v is not None or value.get(k) is None}
    if isinstance(value, list):
        items = [redact(item, key, depth + 1) for item in value[:500]]
        return [item for item in items if item is not None]
    return None


class OutputRoot:
    """The output root of the pipeline (``capi_output_root``), as the console reads it.

    :param url: an ``ObjectStoragePath`` URL (``file://...``, ``s3://...``).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.root = ObjectStoragePath(url)

    def _forget_listings(self) -> None:
        # Object-storage filesystems cache listings (and the sizes in them) for the process's life;
        # the console's process is long-lived, so every page asks the store again.
        self.root.fs.invalidate_cache()

    def partitions(self) -> list[str]:
        """Partitions with an output folder, newest first."""
        self._forget_listings()
        if not self.root.exists():
            return []
        found = []
        for child in self.root.iterdir():
            match = _PARTITION_FOLDER.match(child.name)
            if match:
                found.append(match.group(1))
        return sorted(found, reverse=True)

    def summary(self, partition: str) -> dict[str, Any] | None:
        """The partition's ``summary.json`` (redacted), or None when there is none (yet)."""
        path = self.root / PartitionLayout(partition).folder / PartitionLayout.summary
        return _read_json(path)

    def dry_run_summary(self, partition: str) -> dict[str, Any] | None:
        """The partition's last dry run's ``dry_run/summary.json`` (redacted), or None."""
        layout = PartitionLayout(partition)
        return _read_json(self.root / layout.folder / layout.dry_run(layout.summary))

    def shard_result(self, partition: str, map_index: int, run_id: str) -> dict[str, Any] | None:
        """The counters of run ``run_id``'s ``send`` task with ``map_index`` (redacted), with its shard number.

        ``send`` is mapped over the validation's non-empty shards, so map index ``i`` sends
        shard ``shards[i]``. Each run keeps its hand-over files in its own work folder. None when
        they are gone (a later run of the partition removed them) or not written yet.
        """
        layout = PartitionLayout(partition, run_key(run_id))
        validation = _read_json(self.root / layout.folder / layout.validation)
        shards = (validation or {}).get("shards")
        if validation is None or not isinstance(shards, list) or not 0 <= map_index < len(shards):
            return None
        shard = int(shards[map_index])
        result = _read_json(self.root / layout.folder / layout.result(shard)) or {}
        return {**result, "shard": shard, "shard_count": validation.get("shard_count")}

    def latest_refresh_summary(self) -> dict[str, Any] | None:
        """The newest envelope refresh run's ``summary.json`` (redacted), or None."""
        self._forget_listings()
        folder = self.root / ENVELOPE_REFRESH_ROOT
        if not folder.exists():
            return None
        for run_date in sorted((p.name for p in folder.iterdir() if _RUN_DATE.match(p.name)), reverse=True):
            found = _read_json(folder / run_date / RefreshLayout.summary)
            if found is not None:
                return {"run_date": run_date, **found}
        return None


def _read_json(path: ObjectStoragePath) -> dict[str, Any] | None:
    try:
        info = path.stat()
    except (FileNotFoundError, OSError):
        return None
    # Keyed by size and modification time: a rewritten summary is read again, an unchanged one
    # costs one stat (a year of partitions on a page of the chart stays cheap on object storage).
    modified = getattr(info, "st_mtime", None) or (info.get("mtime") if isinstance(info, Mapping) else None)
    size = getattr(info, "st_size", None) or (info.get("size") if isinstance(info, Mapping) else None)
    found = _parse_cached(str(path), path.protocol, str(modified), str(size))
    return copy.deepcopy(found) if found is not None else None


@lru_cache(maxsize=4096)
def _parse_cached(url: str, _protocol: Any, _modified: str, _size: str) -> dict[str, Any] | None:
    try:
        with ObjectStoragePath(url).open("rb") as stream:  # type: ignore[no-untyped-call]
            document = json.loads(stream.read())
    except (FileNotFoundError, OSError, ValueError):
        return None
    if not isinstance(document, Mapping):
        return None
    redacted: dict[str, Any] = redact(document)
    return redacted
