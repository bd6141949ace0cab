"""Validate: every record of a partition checked, the valid ones spilled to session shards."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from liveramp_capi.domain.checks import DuplicateEventIds, EventTimeWindow
from liveramp_capi.domain.dry_run import newest_envelopes, overlay_line
from liveramp_capi.domain.envelopes import EnvelopeRecord
from liveramp_capi.domain.schema import EventSchemaValidator
from liveramp_capi.domain.sessions import ShardWriter, plan_shard_count, session_grouping_key
from liveramp_capi.domain.sources import iter_source_records
from liveramp_capi.domain.validation import Accepted, RecordValidator, Rejected, ValidationTally
from liveramp_capi.pipeline.config import ValidateConfig
from liveramp_capi.pipeline.errors import PermanentStepFailure
from liveramp_capi.pipeline.ports import Claim

if TYPE_CHECKING:
    from liveramp_capi.state.envelope_store import EnvelopeStore
    from liveramp_capi.storage import PartitionStorage

#: Rough bytes of one event on disk, uncompressed, and the compression ratio of gzip on JSONL;
#: only used to choose how many shards a partition is cut into before it has been read.
_BYTES_PER_EVENT = 450
_GZIP_RATIO = 6
#: Envelope store rows upserted per statement batch.
_ENVELOPE_UPSERT_BATCH = 2000

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ValidationResult:
    """What the validate step wrote to ``validation.json``; ``shards`` is what the send step maps over.

    :param validation: the whole ``validation.json`` (counts only).
    :param shards: the indices of the non-empty shards.
    """

    validation: dict[str, Any]
    shards: list[int]


class RejectedShareExceeded(PermanentStepFailure):
    """More records were rejected than ``max_invalid_ratio`` allows; nothing is sent.

    :param result: what was validated all the same (the rejects are written and published).
    """

    def __init__(self, message: str, result: ValidationResult) -> None:
        super().__init__(message)
        self.result = result


class _EnvelopeSink:
    """The envelope store learns every user's newest envelope from the records, in batches.

    A rerun leaves the store as one run would (the newer ``issued_at`` wins). A dry run changes no
    row: it keeps the newest envelope per user key for its send step instead.
    """

    def __init__(self, store: EnvelopeStore, dry_run: bool) -> None:
        self.store, self.dry_run = store, dry_run
        self.pending: list[EnvelopeRecord] = []
        self.planned: dict[str, EnvelopeRecord] = {}
        self.upserted = 0

    def add(self, record: EnvelopeRecord) -> None:
        self.pending.append(record)
        if len(self.pending) >= _ENVELOPE_UPSERT_BATCH:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        if self.dry_run:
            newest_envelopes(self.pending, self.planned)
        else:
            self.upserted += int(self.store.upsert(self.pending))
        self.pending.clear()


def validate_partition(
    config: ValidateConfig, storage: PartitionStorage, envelope_store: EnvelopeStore, claim: Claim
) -> ValidationResult:
    """Check every record of the manifest's files; write rejects, session shards and ``validation.json``.

    Rejected records go to ``rejected.jsonl`` (published while this run holds the claim) with
    file, line, JSON pointer and reason; valid events go to session shards for the send step.

    :raises RejectedShareExceeded: after writing the rejects, above ``max_invalid_ratio``.
    """
    layout = storage.layout
    manifest = storage.read_json(layout.manifest)
    files = manifest["files"]
    estimated = sum(
        f["size"] * (_GZIP_RATIO if f["name"].lower().endswith(".gz") else 1) for f in files
    ) // _BYTES_PER_EVENT
    shard_count = plan_shard_count(max(estimated, 1), events_per_shard=config.events_per_shard)
    now = int(time.time()) if config.reference_time is None else config.reference_time
    validator = RecordValidator(
        EventSchemaValidator(allow_custom_events=config.allow_custom_events),
        EventTimeWindow(now, max_age_days=config.max_event_age_days,
                        max_future_skew_seconds=config.max_future_skew_seconds),
        DuplicateEventIds(),
    )
    tally = ValidationTally()
    # A rerun rewrites every shard: leftovers of an earlier run with another shard count
    # would otherwise be sent twice.
    storage.clear(layout.shards_dir)
    envelopes = _EnvelopeSink(envelope_store, config.dry_run)
    started = time.monotonic()
    with (
        storage.open_output(layout.draft(layout.rejected)) as rejected_out,
        ShardWriter(shard_count, lambda i: storage.open_output(layout.shard(i))) as shards,
    ):
        for entry in files:
            name = entry["name"]
            with storage.open_input(name) as stream:
                for record in iter_source_records(name, stream, max_line_bytes=config.max_line_bytes):
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
                            envelopes.add(envelope)
                    elif isinstance(outcome, Rejected):
                        rejected_out.write(orjson.dumps(outcome.to_json_dict()) + b"\n")
            _LOG.info("Validated %s: %d records read so far", name, tally.read)
        shard_counts = list(shards.counts)
    envelopes.flush()
    if config.dry_run:
        with storage.open_output(layout.envelope_overlay) as overlay_out:
            for planned in envelopes.planned.values():
                overlay_out.write(overlay_line(planned) + b"\n")
    elapsed = time.monotonic() - started

    exceeded = tally.rejected_ratio > config.max_invalid_ratio
    validation = {
        **tally.to_dict(),
        "partition": storage.partition,
        "files": len(files),
        "ignored_files": manifest.get("ignored_files", []),
        "shard_count": shard_count,
        "shards": [i for i, n in enumerate(shard_counts) if n],
        "shard_events": shard_counts,
        "max_invalid_ratio": config.max_invalid_ratio,
        "rejected_ratio_exceeded": exceeded,
        "seconds": round(elapsed, 3),
        "envelope_store_upserts": envelopes.upserted,
        "dry_run": config.dry_run,
    }
    storage.write_json(layout.validation, validation)
    _LOG.info(
        "Partition %s: read %d, valid %d, rejected %d, duplicates %d in %.1f s (%d shards); rejected by reason: %s",
        storage.partition, tally.read, tally.valid, tally.rejected, tally.duplicates, elapsed,
        len(validation["shards"]), validation.get("rejected_by_code", {}),
    )
    # rejected.jsonl is replaced only while this run owns the partition.
    claim.ensure_held()
    storage.publish(layout.rejected, dry_run=config.dry_run)
    result = ValidationResult(validation, list(validation["shards"]))
    if exceeded:
        raise RejectedShareExceeded(
            f"{tally.rejected} of {tally.read} records rejected ({tally.rejected_ratio:.1%}), more than "
            f"max_invalid_ratio {config.max_invalid_ratio:.1%}: nothing was sent; see {layout.folder}/{layout.rejected}",
            result,
        )
    return result
