"""Validate: every record of a partition checked, the valid ones spilled to session shards."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from liveramp_capi import metrics
from liveramp_capi.operators.config_errors import permanent_config_errors, setting_number

#: Rough bytes of one event on disk, uncompressed, and the compression ratio of gzip on JSONL;
#: only used to choose how many shards a partition is cut into before it has been read.
_BYTES_PER_EVENT = 450
_GZIP_RATIO = 6
#: Envelope store rows upserted per statement batch.
_ENVELOPE_UPSERT_BATCH = 2000


class ValidateConversionsOperator(BaseOperator):
    """Validate a partition's conversion records and write its session shards and rejects.

    Each record is checked against the JSON Schema shipped in the package (``liveramp_capi/schemas/``) (``jsonschema``; a
    compiled validator does the first pass) and against what a schema can't express: a
    duplicate ``event_id`` within the partition (kept once, counted), an ``event_time`` in the
    future or older than ``max_event_age_days``. Rejected records go to
    ``<output_root>/dt=<partition>/rejected.jsonl`` with file, line, JSON pointer and reason;
    valid events go to session shards for the send step. The task fails, after writing the
    rejects, when the rejected share exceeds ``max_invalid_ratio``.

    :param partition: the partition, ``YYYY-MM-DD`` or ``YYYY-MM-DDTHH`` (templated).
    :param landing_root: URL of the landing root (templated).
    :param output_root: URL of the output root (templated).
    :param max_invalid_ratio: the largest share of rejected records (0..1) the partition may hold.
    :param max_event_age_days: events older than this many days are rejected (TikTok: 28).
    :param max_future_skew_seconds: how far in the future an ``event_time`` may lie (clock skew).
    :param allow_custom_events: accept ``event_type`` values beyond TikTok's standard events.
    :param reference_time: Unix seconds the age window is measured from (default: now).
    :param events_per_shard: how many events one send task handles at most (memory bound).
    :param max_line_bytes: longer input lines are rejected unread.
    :param capi_state_conn_id: the state database connection; accepted records with a
        ``user_key`` and an envelope are upserted into its envelope store (newer envelopes win).
    :param dry_run: write the rejects to ``dry_run/rejected.jsonl`` and leave the envelope store
        alone: the partition's newest envelopes go to the run's work folder instead (templated).
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
        "dry_run",
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
        capi_state_conn_id: str = "capi_state_default",
        dry_run: bool | str = False,
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
        self.capi_state_conn_id = capi_state_conn_id
        self.dry_run = dry_run

    def _settings(self) -> tuple[float, int, bool, int]:
        """The run's validation settings, each checked with a message naming where it comes from."""
        ratio = setting_number(self.max_invalid_ratio, float, "max_invalid_ratio", "capi_max_invalid_ratio", "0.05")
        age = setting_number(self.max_event_age_days, int, "max_event_age_days", "capi_max_event_age_days", "28")
        shard_size = setting_number(self.events_per_shard, int, "events_per_shard", "capi_events_per_shard", "100000")
        if self.reference_time in (None, "", "None"):
            now = int(time.time())
        else:
            now = setting_number(self.reference_time, int, "reference_time", None, "1764633600")
        if not 0 <= ratio <= 1:
            raise AirflowFailException(
                f"max_invalid_ratio (Variable capi_max_invalid_ratio) must lie between 0 and 1, e.g. 0.05 for 5% "
                f"(got {ratio:g})"
            )
        if age < 1:
            raise AirflowFailException("max_event_age_days (Variable capi_max_event_age_days) must be at least 1")
        if shard_size < 1:
            raise AirflowFailException("events_per_shard (Variable capi_events_per_shard) must be at least 1")
        custom = str(self.allow_custom_events).strip().lower() in {"1", "true", "yes", "on"}
        return ratio, age, custom, now

    def execute(self, context: Any) -> list[int]:
        from liveramp_capi.hooks.state import CapiStateHook
        from liveramp_capi.operators.config_errors import setting_flag
        from liveramp_capi.operators.partition_claim import holding_partition
        from liveramp_capi.storage import PartitionStorage

        max_ratio, max_age_days, allow_custom, now = self._settings()
        dry_run = setting_flag(self.dry_run, "dry_run")
        with permanent_config_errors():
            storage = PartitionStorage(self.landing_root, self.output_root, self.partition, context["run_id"])
        layout = storage.layout
        state = CapiStateHook(capi_state_conn_id=self.capi_state_conn_id)
        with permanent_config_errors(self.capi_state_conn_id), state.opened("validated"):
            envelope_store = state.get_envelope_store()
        with holding_partition(state, storage.partition, context) as claim:
            shards = self._validate(storage, envelope_store, max_ratio, max_age_days, allow_custom, now, dry_run)
            # rejected.jsonl is replaced only while this run owns the partition.
            claim.ensure_held()
            storage.publish(layout.rejected, dry_run=dry_run)
        return shards

    def _validate(
        self,
        storage: Any,
        envelope_store: Any,
        max_ratio: float,
        max_age_days: int,
        allow_custom: bool,
        now: int,
        dry_run: bool = False,
    ) -> list[int]:
        import orjson

        from liveramp_capi.domain.checks import DuplicateEventIds, EventTimeWindow
        from liveramp_capi.domain.dry_run import newest_envelopes, overlay_line
        from liveramp_capi.domain.envelopes import EnvelopeRecord
        from liveramp_capi.domain.schema import EventSchemaValidator
        from liveramp_capi.domain.sessions import ShardWriter, plan_shard_count, session_grouping_key
        from liveramp_capi.domain.sources import iter_source_records
        from liveramp_capi.domain.validation import Accepted, RecordValidator, Rejected, ValidationTally

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
        # The envelope store learns every user's newest envelope from the records; upserts are
        # batched, and a rerun leaves it as one run would (the newer issued_at wins).
        envelope_records: list[EnvelopeRecord] = []
        envelopes_upserted = 0
        # A dry run changes no store row: it keeps the newest envelope per user key for its send step.
        planned_envelopes: dict[str, EnvelopeRecord] = {}

        def store_envelopes(records: list[EnvelopeRecord]) -> int:
            if not dry_run:
                return int(envelope_store.upsert(records))
            newest_envelopes(records, planned_envelopes)
            return 0

        started = time.monotonic()
        with (
            storage.open_output(layout.draft(layout.rejected)) as rejected_out,
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
                            envelope = EnvelopeRecord.from_accepted(
                                outcome.event, pipeline, outcome.event_time, now, envelope_store.lifetime_rule
                            )
                            shards.write(
                                session_grouping_key(outcome.event, pipeline.get("session_id")),
                                outcome.event_time,
                                outcome.event_id,
                                pipeline.get("user_key"),
                                outcome.event,
                                envelope.issued_at if envelope else None,
                                envelope.expires_at if envelope else None,
                            )
                            if envelope is not None:
                                envelope_records.append(envelope)
                                if len(envelope_records) >= _ENVELOPE_UPSERT_BATCH:
                                    envelopes_upserted += store_envelopes(envelope_records)
                                    envelope_records.clear()
                        elif isinstance(outcome, Rejected):
                            rejected_out.write(orjson.dumps(outcome.to_json_dict()) + b"\n")
                self.log.info("Validated %s: %d records read so far", name, tally.read)
            shard_counts = list(shards.counts)
        if envelope_records:
            envelopes_upserted += store_envelopes(envelope_records)
        if dry_run:
            with storage.open_output(layout.envelope_overlay) as overlay_out:
                for record in planned_envelopes.values():
                    overlay_out.write(overlay_line(record) + b"\n")
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
            "envelope_store_upserts": envelopes_upserted,
            "dry_run": dry_run,
        }
        storage.write_json(layout.validation, validation)
        if not dry_run:
            metrics.validated(validation)
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
            storage.publish(layout.rejected, dry_run=dry_run)
            raise AirflowFailException(
                f"{tally.rejected} of {tally.read} records rejected ({tally.rejected_ratio:.1%}), more than "
                f"max_invalid_ratio {max_ratio:.1%}: nothing was sent; see {layout.folder}/{layout.rejected}"
            )
        # The return value is what the send step maps over: the indices of non-empty shards.
        return validation["shards"]

