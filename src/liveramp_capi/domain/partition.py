"""Partition names and the layout of a partition's files under the landing and output roots.

A partition is one calendar day, named ``YYYY-MM-DD``. Everything a run reads or writes is
derived from that name and two configured roots, so a name is checked strictly before any
path is built from it: nothing the user types can point a run outside its roots.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

_PARTITION_RE = re.compile(r"\A\d{4}-\d{2}-\d{2}\Z")

#: File name endings a partition may hold, longest first so ``.jsonl.gz`` wins over ``.gz``.
INPUT_SUFFIXES: tuple[str, ...] = (".jsonl.gz", ".csv.gz", ".jsonl", ".csv")

#: Storage schemes a root may use. ``file`` is the embedded default; the others work once the
#: matching fsspec package (s3fs, gcsfs, adlfs) is installed.
ALLOWED_ROOT_SCHEMES: frozenset[str] = frozenset({"file", "s3", "gs", "gcs", "abfs", "az", "memory"})


class InvalidPartition(ValueError):
    """A partition name that is not a real ``YYYY-MM-DD`` date."""


class InvalidRoot(ValueError):
    """A landing or output root that is not an absolute URL of an allowed storage scheme."""


def parse_partition(value: object) -> str:
    """Return ``value`` as a canonical partition name, or raise :class:`InvalidPartition`.

    :param value: what the user or the scheduler supplied (a param, a partition key).
    """
    text = "" if value is None else str(value).strip()
    if not _PARTITION_RE.match(text):
        # The value itself is echoed only as a length: it may be anything the user pasted.
        raise InvalidPartition(
            f"partition must be a date written YYYY-MM-DD (got a {len(text)}-character value that is not)"
        )
    try:
        dt.date.fromisoformat(text)
    except ValueError as err:
        raise InvalidPartition(f"partition {text} is not a calendar date: {err}") from None
    return text


def check_root(url: str, *, name: str) -> str:
    """Validate a storage root URL and return it without a trailing slash.

    :param url: e.g. ``file:///data/landing`` or ``s3://bucket/capi``.
    :param name: the setting it came from, for the error message.
    """
    text = (url or "").strip()
    parts = urlsplit(text)
    if parts.scheme not in ALLOWED_ROOT_SCHEMES:
        raise InvalidRoot(
            f"{name} must be a URL with one of the schemes {sorted(ALLOWED_ROOT_SCHEMES)}, "
            f"e.g. file:///data/capi (got scheme {parts.scheme!r})"
        )
    if parts.scheme == "file" and not parts.path.startswith("/"):
        raise InvalidRoot(f"{name} must be an absolute file:// URL (file:///path)")
    segments = [s for s in parts.path.split("/") if s]
    if any(s in {".", ".."} for s in segments):
        raise InvalidRoot(f"{name} must not contain '.' or '..' path segments")
    if parts.query or parts.fragment:
        raise InvalidRoot(f"{name} must not carry a query string or fragment")
    return text.rstrip("/")


def input_kind(file_name: str) -> str | None:
    """Return the matching entry of :data:`INPUT_SUFFIXES` for a file name, or ``None``."""
    lowered = file_name.lower()
    for suffix in INPUT_SUFFIXES:
        if lowered.endswith(suffix):
            return suffix
    return None


@dataclass(frozen=True, slots=True)
class PartitionLayout:
    """Relative names of everything a partition run writes under ``<output_root>/dt=<partition>/``.

    ``_work/`` holds intermediate data handed from one task to the next (the manifest, the
    session shards, per-shard results); the files beside it are the run's deliverables.
    """

    partition: str

    @property
    def folder(self) -> str:
        return f"dt={self.partition}"

    manifest = "_work/manifest.json"
    validation = "_work/validation.json"
    shards_dir = "_work/shards"
    results_dir = "_work/results"
    failed_dir = "_work/failed"
    expired_dir = "_work/envelope_expired"
    envelope_expired = "envelope_expired.jsonl"
    rejected = "rejected.jsonl"
    failed = "failed.jsonl"
    summary = "summary.json"

    @staticmethod
    def shard(index: int) -> str:
        return f"_work/shards/shard-{index:05d}.jsonl"

    @staticmethod
    def result(index: int) -> str:
        return f"_work/results/shard-{index:05d}.json"

    @staticmethod
    def failed_part(index: int) -> str:
        return f"_work/failed/shard-{index:05d}.jsonl"

    @staticmethod
    def expired_part(index: int) -> str:
        return f"_work/envelope_expired/shard-{index:05d}.jsonl"
