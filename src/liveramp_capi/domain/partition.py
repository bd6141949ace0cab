"""Partition names and the layout of a partition's files under the landing and output roots.

A partition is one calendar day, named ``YYYY-MM-DD``, or one hour of a day, named
``YYYY-MM-DDTHH`` (UTC, ``00``..``23``); its folder is ``dt=<name>`` either way, so a day's
folder and its hours' folders sit side by side under one root. Everything a run reads or writes is
derived from that name and two configured roots, so a name is checked strictly before any
path is built from it: nothing the user types can point a run outside its roots.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

_PARTITION_RE = re.compile(r"\A\d{4}-\d{2}-\d{2}(T\d{2})?\Z", re.ASCII)

#: The two partition granularities and the ``strftime`` format of their names (the partition
#: timetable's ``key_format``).
DAILY = "daily"
HOURLY = "hourly"
KEY_FORMATS: dict[str, str] = {DAILY: "%Y-%m-%d", HOURLY: "%Y-%m-%dT%H"}

#: The folder of a partition's output that holds what a dry run wrote (never the real deliverables).
DRY_RUN_DIR = "dry_run"
_UNSAFE_RE = re.compile(r"[^A-Za-z0-9._-]+")

#: The folder under a partition's output that holds each run's work, one folder per run.
WORK_ROOT = "_work"

#: File name endings a partition may hold, longest first so ``.jsonl.gz`` wins over ``.gz``.
INPUT_SUFFIXES: tuple[str, ...] = (".jsonl.gz", ".csv.gz", ".jsonl", ".csv")

#: Storage schemes a root may use. ``file`` is the embedded default; the others work once the
#: matching fsspec package (s3fs, gcsfs, adlfs) is installed.
ALLOWED_ROOT_SCHEMES: frozenset[str] = frozenset({"file", "s3", "gs", "gcs", "abfs", "az", "memory"})


class InvalidPartition(ValueError):
    """A partition name that is not a real ``YYYY-MM-DD`` date or ``YYYY-MM-DDTHH`` hour."""


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
            "partition must be a date written YYYY-MM-DD or an hour written YYYY-MM-DDTHH "
            f"(got a {len(text)}-character value that is neither)"
        )
    try:
        dt.date.fromisoformat(text[:10])
    except ValueError as err:
        raise InvalidPartition(f"partition {text[:10]} is not a calendar date: {err}") from None
    if partition_granularity(text) == HOURLY and int(text[11:]) > 23:
        raise InvalidPartition(f"partition of {text[:10]}: the hour must lie between 00 and 23")
    return text


def partition_granularity(name: str) -> str:
    """:data:`HOURLY` for an hour's name (``YYYY-MM-DDTHH``), else :data:`DAILY`."""
    return HOURLY if "T" in name else DAILY


def check_root(url: str, *, name: str) -> str:
    """Validate a storage root URL and return it without a trailing slash.

    :param url: e.g. ``file:///data/landing``, ``s3://bucket/capi`` or ``s3://aws_default@bucket/capi``
        (the part before ``@`` names the Airflow connection holding the credentials).
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
    if ":" in parts.netloc.rpartition("@")[0]:
        # Only a connection id may stand before the "@" (s3://aws_default@bucket/...): a secret
        # in a Variable would be shown in the UI, the logs and every error naming the root.
        raise InvalidRoot(
            f"{name} must not carry credentials: keep them in an Airflow connection and name it in the "
            "URL instead, e.g. s3://aws_default@bucket/prefix"
        )
    return text.rstrip("/")


def input_kind(file_name: str) -> str | None:
    """Return the matching entry of :data:`INPUT_SUFFIXES` for a file name, or ``None``."""
    lowered = file_name.lower()
    for suffix in INPUT_SUFFIXES:
        if lowered.endswith(suffix):
            return suffix
    return None


def run_key(run_id: str) -> str:
    """A folder name for one Airflow run: readable, path-safe, and distinct for distinct run ids.

    :param run_id: the Airflow run id (e.g. ``manual__2026-11-20T03:00:00+00:00``).
    """
    readable = _UNSAFE_RE.sub("_", run_id).strip("._")[:80] or "run"
    digest = hashlib.blake2b(run_id.encode(), digest_size=4).hexdigest()
    return f"{readable}-{digest}"


@dataclass(frozen=True, slots=True)
class PartitionLayout:
    """Relative names of everything a partition run writes under ``<output_root>/dt=<partition>/``.

    ``_work/<run>/`` holds what one run hands from task to task (the manifest, the session
    shards, per-shard results) and drafts of its deliverables; the deliverables are moved into
    place beside ``_work/`` only by the run that holds the partition's claim. Two runs of one
    partition therefore never write into each other's files, and a reader never sees a file half
    written.

    :param partition: the partition name.
    :param run: the run's folder name (:func:`run_key`); ``""`` for the folder of no run.
    """

    partition: str
    run: str = ""

    @property
    def folder(self) -> str:
        return f"dt={self.partition}"

    @property
    def work_dir(self) -> str:
        return f"{WORK_ROOT}/{self.run}" if self.run else WORK_ROOT

    def work(self, name: str) -> str:
        """A file of this run's work folder."""
        return f"{self.work_dir}/{name}"

    @property
    def manifest(self) -> str:
        return self.work("manifest.json")

    @property
    def validation(self) -> str:
        return self.work("validation.json")

    @property
    def shards_dir(self) -> str:
        return self.work("shards")

    @property
    def results_dir(self) -> str:
        return self.work("results")

    @property
    def failed_dir(self) -> str:
        return self.work("failed")

    @property
    def expired_dir(self) -> str:
        return self.work("envelope_expired")

    @property
    def plan_dir(self) -> str:
        return self.work("plan")

    def plan_part(self, index: int) -> str:
        """A dry run's planned batches of one shard."""
        return self.work(f"plan/shard-{index:05d}.jsonl")

    @property
    def envelope_overlay(self) -> str:
        """A dry run's newest envelope per user key of the partition (what a real run would upsert)."""
        return self.work("envelope_overlay.jsonl")

    @staticmethod
    def dry_run(deliverable: str) -> str:
        """Where a dry run publishes a deliverable: beside the real ones, never over them."""
        return f"{DRY_RUN_DIR}/{deliverable}"

    def draft(self, deliverable: str) -> str:
        """Where this run writes a deliverable before it is moved into place."""
        return self.work(f"publish/{deliverable}")

    envelope_expired = "envelope_expired.jsonl"
    rejected = "rejected.jsonl"
    failed = "failed.jsonl"
    summary = "summary.json"
    plan = "plan.jsonl"

    def shard(self, index: int) -> str:
        return self.work(f"shards/shard-{index:05d}.jsonl")

    def result(self, index: int) -> str:
        return self.work(f"results/shard-{index:05d}.json")

    def failed_part(self, index: int) -> str:
        return self.work(f"failed/shard-{index:05d}.jsonl")

    def expired_part(self, index: int) -> str:
        return self.work(f"envelope_expired/shard-{index:05d}.jsonl")
