"""The per-record pipeline: source error -> schema -> event-time window -> duplicate event_id.

A duplicate is a *valid* event whose event_id was already accepted in this run: the first one
wins and later ones are counted, not rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from liveramp_capi.domain.checks import DuplicateEventIds, EventTimeWindow
from liveramp_capi.domain.events import (
    PIPELINE_FIELDS,
    normalize_event,
    pipeline_fields,
)
from liveramp_capi.domain.schema import EventSchemaValidator
from liveramp_capi.domain.source_lines import MAX_RAW_BYTES, SourceRecord
from liveramp_capi.domain.violations import Violation

TRUNCATION_MARKER = "...[truncated]"


@dataclass(slots=True)
class Accepted:
    """A valid, new event ready for delivery.

    :param event: the normalized event to send (pipeline-only fields removed).
    :param pipeline: the pipeline-only fields (session_id, user_key, consent, ...).
    :param event_id: the event's id.
    :param event_time: the event's Unix seconds.
    :param file: source file name relative to the partition.
    :param line: source line (see :class:`~liveramp_capi.domain.sources.SourceRecord`).
    """

    event: dict[str, Any]
    pipeline: dict[str, Any]
    event_id: str
    event_time: int
    file: str
    line: int | None


@dataclass(slots=True)
class Rejected:
    """A record that cannot be sent, and why.

    :param file: source file name relative to the partition.
    :param line: source line, None for file-level problems.
    :param violation: the (first, most useful) problem found.
    :param raw: the record's bytes as read.
    :param event_id: the record's event_id when it could be read (a string), else None.
    """

    file: str
    line: int | None
    violation: Violation
    raw: bytes
    event_id: str | None = None

    def to_json_dict(self) -> dict[str, Any]:
        """The rejected.jsonl line: file, line, pointer, code, reason, event_id, record.

        ``record`` is the raw text (undecodable bytes replaced), cut at 64 KiB with a marker.
        """
        raw = self.raw
        text = raw[:MAX_RAW_BYTES].decode("utf-8", errors="replace")
        if len(raw) >= MAX_RAW_BYTES:  # sources keep at most MAX_RAW_BYTES: assume it was cut
            text += TRUNCATION_MARKER
        return {
            "file": self.file,
            "line": self.line,
            "pointer": self.violation.pointer,
            "code": self.violation.code,
            "reason": self.violation.reason,
            "event_id": self.event_id,
            "record": text,
        }


@dataclass(slots=True)
class Duplicate:
    """A valid event whose event_id was already accepted in this run.

    :param file: source file name.
    :param line: source line.
    :param event_id: the repeated id.
    """

    file: str
    line: int | None
    event_id: str


Outcome = Accepted | Rejected | Duplicate


class RecordValidator:
    """Decide the fate of each :class:`SourceRecord`.

    :param schema_validator: validates record shape.
    :param window: accepted event_time range.
    :param duplicates: the run's memory of accepted event ids (shared across files of a run).
    """

    def __init__(
        self,
        schema_validator: EventSchemaValidator,
        window: EventTimeWindow,
        duplicates: DuplicateEventIds,
    ) -> None:
        self.schema_validator = schema_validator
        self.window = window
        self.duplicates = duplicates
        derived = pipeline_fields(schema_validator.schema)
        self._pipeline_fields = derived or PIPELINE_FIELDS

    def check(self, record: SourceRecord) -> Outcome:
        """Validate one record.

        :param record: a record from :func:`~liveramp_capi.domain.sources.iter_source_records`.
        """
        value = record.value
        if record.error is not None or value is None:
            unreadable = record.error or Violation("invalid_json", "", "record could not be read")
            return Rejected(record.file, record.line, unreadable, record.raw, _event_id(value))
        violation = self.schema_validator.validate(value)
        if violation is not None:
            return Rejected(record.file, record.line, violation, record.raw, _event_id(value))
        event_id: str = value["event_id"]
        event_time = int(value["event_time"])
        violation = self.window.check(event_time)
        if violation is not None:
            return Rejected(record.file, record.line, violation, record.raw, event_id)
        if self.duplicates.seen_before(event_id, value["event_type"]):
            return Duplicate(record.file, record.line, event_id)
        # Pipeline-only fields split off in one pass, normalize_event only when needed: this runs
        # a million times per partition.
        fields = self._pipeline_fields
        event: dict[str, Any] = {}
        pipeline: dict[str, Any] = {}
        for name, item in value.items():
            if name in fields:
                pipeline[name] = item
            else:
                event[name] = item
        if type(event.get("custom_data")) is dict or type(event["event_time"]) is not int:
            event = normalize_event(event)
        return Accepted(event, pipeline, event_id, event_time, record.file, record.line)


def _event_id(value: dict[str, Any] | None) -> str | None:
    if isinstance(value, dict):
        event_id = value.get("event_id")
        if isinstance(event_id, str) and len(event_id) <= 128:
            return event_id
    return None


@dataclass(slots=True)
class ValidationTally:
    """Counts of a run (or one file); ``read == valid + rejected + duplicates`` always holds.

    :param read: records seen (every :class:`Outcome`).
    :param valid: accepted events.
    :param duplicates: valid events dropped as repeats.
    :param rejected_by_code: rejected records per violation code.
    """

    read: int = 0
    valid: int = 0
    duplicates: int = 0
    rejected_by_code: dict[str, int] = field(default_factory=dict)

    @property
    def rejected(self) -> int:
        """Rejected records, all codes."""
        return sum(self.rejected_by_code.values())

    @property
    def rejected_ratio(self) -> float:
        """rejected / read, 0.0 when nothing was read."""
        return self.rejected / self.read if self.read else 0.0

    def add(self, outcome: Outcome) -> None:
        """Count one outcome.

        :param outcome: the result of :meth:`RecordValidator.check`.
        """
        self.read += 1
        if isinstance(outcome, Accepted):
            self.valid += 1
        elif isinstance(outcome, Duplicate):
            self.duplicates += 1
        else:
            code = outcome.violation.code
            self.rejected_by_code[code] = self.rejected_by_code.get(code, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready counts (codes sorted) for XCom and the run report."""
        return {
            "read": self.read,
            "valid": self.valid,
            "rejected": self.rejected,
            "duplicates": self.duplicates,
            "rejected_ratio": round(self.rejected_ratio, 6),
            "rejected_by_code": dict(sorted(self.rejected_by_code.items())),
        }
