"""The one place that knows where a run's files live under the output root.

A conversions run writes under ``<output_root>/dt=<partition>/``; an envelope refresh run under
``<output_root>/envelope_refresh/<date>/``. Every reader and writer (pipeline, operators,
console) takes its names from here, so the layout can change in one place. Plain Python: no
Airflow, no I/O.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

#: The folder of a partition's output that holds what a dry run wrote (never the real deliverables).
DRY_RUN_DIR = "dry_run"
#: The folder under a partition's output that holds each run's work, one folder per run.
WORK_ROOT = "_work"
#: Counts of a recover_held pass (held conversions won back or lost), beside the run's other results.
HELD_RECOVERY = "held_recovery.json"
#: The folder under the output root that holds the envelope refresh runs, one folder per date.
ENVELOPE_REFRESH_ROOT = "envelope_refresh"
_UNSAFE_RE = re.compile(r"[^A-Za-z0-9._-]+")


def partition_folder(partition: str) -> str:
    """The folder of a (checked) partition under the landing and the output root: ``dt=<partition>``."""
    return f"dt={partition}"


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
        return partition_folder(self.partition)

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

    @property
    def held_recovery(self) -> str:
        """What this run's recover_held pass won back or lost."""
        return self.work(HELD_RECOVERY)


@dataclass(frozen=True, slots=True)
class RefreshLayout:
    """Relative names of what an envelope refresh run writes under ``<output_root>/envelope_refresh/<date>/``.

    :param run_date: the run's date, ``YYYY-MM-DD`` (checked by the caller).
    """

    run_date: str

    plan = f"{WORK_ROOT}/plan.json"
    slices_dir = f"{WORK_ROOT}/slices"
    summary = "summary.json"
    held_recovery = HELD_RECOVERY

    @property
    def folder(self) -> str:
        return f"{ENVELOPE_REFRESH_ROOT}/{self.run_date}"

    def slice_result(self, index: int) -> str:
        """One slice task's counters."""
        return f"{self.slices_dir}/slice-{index:05d}.json"
