"""Validate: every record of a partition checked, the valid ones spilled to session shards."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

#: Rough bytes of one event on disk, uncompressed, and the compression ratio of gzip on JSONL;
#: only used to choose how many shards a partition is cut into before it has been read.
_BYTES_PER_EVENT = 450
_GZIP_RATIO = 6


class ValidateConversionsOperator(BaseOperator):
    """Validate a partition's conversion records and write its session shards and rejects.

    Each record is checked against the JSON Schema in ``include/schemas/`` (``jsonschema``; a
    compiled validator does the first pass) and against what a schema can't express: a
    duplicate ``event_id`` within the partition (kept once, counted), an ``event_time`` in the
    future or older than ``max_event_age_days``. Rejected records go to
    ``<output_root>/dt=<partition>/rejected.jsonl`` with file, line, JSON pointer and reason;
    valid events go to session shards for the send step. The task fails, after writing the
    rejects, when the rejected share exceeds ``max_invalid_ratio``.

    :param partition: the partition, ``YYYY-MM-DD`` (templated).
    :param landing_root: URL of the landing root (templated).
    :param output_root: URL of the output root (templated).
    :param max_invalid_ratio: the largest share of rejected records (0..1) the partition may hold.
    :param max_event_age_days: events older than this many days are rejected (TikTok: 28).
    :param max_future_skew_seconds: how far in the future an ``event_time`` may lie (clock skew).
    :param allow_custom_events: accept ``event_type`` values beyond TikTok's standard events.
    :param reference_time: Unix seconds the age window is measured from (default: now).
    :param events_per_shard: how many events one send task handles at most (memory bound).
    :param max_line_bytes: longer input lines are rejected unread.
    """

    template_fields: Sequence[str] = (
        "partition",
        "landing_root",
        "output_root",
        "max_invalid_ratio",
        "max_event_age_days",
        "allow_custom_events",
        "reference_time",
        "events_per_shard",
    )
    ui_color = "#fef7e0"

    def __init__(
        self,
        *,
        partition: str,
        landing_root: str,
        output_root: str,
        max_invalid_ratio: float | str = 0.05,
        max_event_age_days: int | str = 28,
        max_future_skew_seconds: int = 300,
        allow_custom_events: bool | str = False,
        reference_time: int | str | None = None,
        events_per_shard: int | str = 100_000,
        max_line_bytes: int = 1_048_576,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.partition = partition
        self.landing_root = landing_root
        self.output_root = output_root
        self.max_invalid_ratio = max_invalid_ratio
        self.max_event_age_days = max_event_age_days
        self.max_future_skew_seconds = max_future_skew_seconds
        self.allow_custom_events = allow_custom_events
        self.reference_time = reference_time
        self.events_per_shard = events_per_shard
        self.max_line_bytes = max_line_bytes

    def _settings(self) -> tuple[float, int, bool, int]:
        try:
            ratio = float(self.max_invalid_ratio)
            age = int(self.max_event_age_days)
            now = int(self.reference_time) if self.reference_time not in (None, "", "None") else int(time.time())
        except (TypeError, ValueError) as err:
            raise AirflowFailException(f"invalid validation setting: {err}") from None
        if not 0 <= ratio <= 1:
            raise AirflowFailException("max_invalid_ratio must lie between 0 and 1")
        if age < 1:
            raise AirflowFailException("max_event_age_days must be at least 1")
        custom = str(self.allow_custom_events).strip().lower() in {"1", "true", "yes", "on"}
        return ratio, age, custom, now

    def execute(self, context: Any) -> list[int]:
        import orjson

        from liveramp_capi.domain.checks import DuplicateEventIds, EventTimeWindow
        from liveramp_capi.domain.partition import InvalidPartition, InvalidRoot
        from liveramp_capi.domain.schema import EventSchemaValidator
        from liveramp_capi.domain.sessions import ShardWriter, plan_shard_count, session_grouping_key
        from liveramp_capi.domain.sources import iter_source_records
        from liveramp_capi.domain.validation import (
            Accepted,
            RecordValidator,
            Rejected,
            ValidationTally,
        )
        from liveramp_capi.storage import PartitionStorage

        max_ratio, max_age_days, allow_custom, now = self._settings()
        try:
            storage = PartitionStorage(self.landing_root, self.output_root, self.partition)
        except (InvalidPartition, InvalidRoot) as err:
            raise AirflowFailException(str(err)) from None
        layout = storage.layout
        manifest = storage.read_json(layout.manifest)
        files = manifest["files"]

        estimated = sum(
            f["size"] * (_GZIP_RATIO if f["name"].lower().endswith(".gz") else 1) for f in files
        ) // _BYTES_PER_EVENT
        shard_count = plan_shard_count(max(estimated, 1), events_per_shard=int(self.events_per_shard))

        validator = RecordValidator(
            EventSchemaValidator(allow_custom_events=allow_custom),
            EventTimeWindow(now, max_age_days=max_age_days, max_future_skew_seconds=self.max_future_skew_seconds),
            DuplicateEventIds(),
        )
        tally = ValidationTally()
        # A rerun rewrites every shard: leftovers of an earlier run with another shard count
        # would otherwise be sent twice.
        storage.clear(layout.shards_dir)
        started = time.monotonic()
        with (
            storage.open_output(layout.rejected) as rejected_out,
            ShardWriter(shard_count, lambda i: storage.open_output(layout.shard(i))) as shards,
        ):
            for entry in files:
                name = entry["name"]
                with storage.open_input(name) as stream:
                    for record in iter_source_records(name, stream, max_line_bytes=self.max_line_bytes):
                        outcome = validator.check(record)
                        tally.add(outcome)
                        if isinstance(outcome, Accepted):
                            pipeline = outcome.pipeline
                            shards.write(
                                session_grouping_key(outcome.event, pipeline.get("session_id")),
                                outcome.event_time,
                                outcome.event_id,
                                pipeline.get("user_key"),
                                outcome.event,
                            )
                        elif isinstance(outcome, Rejected):
                            rejected_out.write(orjson.dumps(outcome.to_json_dict()) + b"\n")
                self.log.info("Validated %s: %d records read so far", name, tally.read)
            shard_counts = list(shards.counts)
        elapsed = time.monotonic() - started

        exceeded = tally.rejected_ratio > max_ratio
        validation = {
            **tally.to_dict(),
            "partition": storage.partition,
            "files": len(files),
            "ignored_files": manifest.get("ignored_files", []),
            "shard_count": shard_count,
            "shards": [i for i, n in enumerate(shard_counts) if n],
            "shard_events": shard_counts,
            "max_invalid_ratio": max_ratio,
            "rejected_ratio_exceeded": exceeded,
            "seconds": round(elapsed, 3),
        }
        storage.write_json(layout.validation, validation)
        self.log.info(
            "Partition %s: read %d, valid %d, rejected %d, duplicates %d in %.1f s (%d shards); rejected by reason: %s",
            storage.partition,
            tally.read,
            tally.valid,
            tally.rejected,
            tally.duplicates,
            elapsed,
            len(validation["shards"]),
            validation.get("rejected_by_code", {}),
        )
        if exceeded:
            raise AirflowFailException(
                f"{tally.rejected} of {tally.read} records rejected ({tally.rejected_ratio:.1%}), more than "
                f"max_invalid_ratio {max_ratio:.1%}: nothing was sent; see {layout.folder}/{layout.rejected}"
            )
        # The return value is what the send step maps over: the indices of non-empty shards.
        return validation["shards"]
