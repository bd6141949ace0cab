"""The per-record pipeline, the time window, duplicate ids, normalisation and the tally."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

from liveramp_capi.domain.checks import DuplicateEventIds, EventTimeWindow
from liveramp_capi.domain.events import normalize_event
from liveramp_capi.domain.schema import EventSchemaValidator
from liveramp_capi.domain.sources import MAX_RAW_BYTES, SourceRecord, iter_source_records
from liveramp_capi.domain.validation import (
    Accepted,
    Duplicate,
    RecordValidator,
    Rejected,
    ValidationTally,
)
from liveramp_capi.domain.violations import Violation

NOW = 1714700000  # shortly after the seed's web examples


def _validator(schema_validator: EventSchemaValidator, now: int = NOW) -> RecordValidator:
    return RecordValidator(schema_validator, EventTimeWindow(now), DuplicateEventIds())


def _source(value: dict[str, Any], line: int = 1) -> SourceRecord:
    return SourceRecord("part.jsonl", line, value, json.dumps(value).encode())


def test_event_time_window() -> None:
    window = EventTimeWindow(NOW)
    assert window.check(NOW) is None
    assert window.check(NOW + 300) is None
    assert window.check(NOW - 28 * 86400) is None
    future = window.check(NOW + 301)
    assert future.code == "event_time_future" and future.reason.startswith(
        "event_time is 301 s in the future"
    )
    old = window.check(NOW - 30 * 86400)
    assert old == Violation(
        "event_time_too_old",
        "/event_time",
        "event_time is 30 days old; TikTok accepts events up to 28 days old (max_event_age_days)",
    )
    assert EventTimeWindow(NOW, max_age_days=7).check(NOW - 8 * 86400).code == "event_time_too_old"


def test_duplicate_event_ids() -> None:
    seen = DuplicateEventIds()
    assert not seen.seen_before("a")
    assert seen.seen_before("a")
    assert not seen.seen_before("A")
    assert not seen.seen_before("\ud800")  # a lone surrogate from JSON must not crash
    assert len(seen) == 3


def test_normalize_event(app_event) -> None:
    record = app_event(
        custom_data={"currency": "EUR", "value": 1.5}, session_id="s", consent={"ct": 4, "cv": "x"}
    )
    record["event_time"] = float(record["event_time"])
    original = copy.deepcopy(record)
    normalized = normalize_event(record)
    assert normalized["custom_data"] == [{"key": "currency", "value": "EUR"}, {"key": "value", "value": 1.5}]
    assert type(normalized["event_time"]) is int
    assert record == original  # inputs untouched


def test_pipeline_order_and_outcomes(web_event, schema_validator: EventSchemaValidator) -> None:
    validator = _validator(schema_validator)
    first = validator.check(_source(web_event(session_id="s1", custom_data={"currency": "USD"})))
    assert isinstance(first, Accepted)
    assert first.pipeline == {"session_id": "s1"}
    assert first.event["custom_data"] == [{"key": "currency", "value": "USD"}]
    assert (first.event_id, first.event_time, first.file, first.line) == ("6543", 1714692420, "part.jsonl", 1)

    again = validator.check(_source(web_event(), line=2))
    assert again == Duplicate("part.jsonl", 2, "6543")

    # An invalid record with a seen id is rejected (schema before duplicate) and does not count as seen.
    invalid = validator.check(_source(web_event(event_id="new", event_type="Nope")))
    assert isinstance(invalid, Rejected) and invalid.violation.code == "unknown_event_type"
    assert invalid.event_id == "new"
    stale = validator.check(_source(web_event(event_id="new", event_time=NOW - 40 * 86400)))
    assert isinstance(stale, Rejected) and stale.violation.code == "event_time_too_old"
    assert isinstance(validator.check(_source(web_event(event_id="new"))), Accepted)

    broken = SourceRecord(
        "part.jsonl", 9, None, b"{oops", Violation("invalid_json", "", "line is not valid JSON")
    )
    outcome = validator.check(broken)
    assert isinstance(outcome, Rejected) and outcome.violation is broken.error and outcome.event_id is None


def test_rejected_json_line() -> None:
    rejected = Rejected("a.jsonl", 3, Violation("invalid_json", "", "bad"), b"\xff{x", "e1")
    assert rejected.to_json_dict() == {
        "file": "a.jsonl",
        "line": 3,
        "pointer": "",
        "code": "invalid_json",
        "reason": "bad",
        "event_id": "e1",
        "record": "\ufffd{x",
    }
    big = Rejected("a.jsonl", 1, Violation("line_too_long", "", "long"), b"x" * MAX_RAW_BYTES)
    assert big.to_json_dict()["record"].endswith("...[truncated]")
    json.dumps(big.to_json_dict())


def test_files_end_to_end_tally_and_privacy(
    tmp_path: Path, seed_events, schema_validator: EventSchemaValidator, secret_values
) -> None:
    rng = random.Random(7)
    lines: list[bytes] = []
    for _ in range(300):
        event = copy.deepcopy(rng.choice(seed_events))
        event["event_id"] = f"id-{rng.randrange(250)}"  # some repeats
        event["event_time"] = NOW + 3600 if rng.random() < 0.05 else NOW - rng.randrange(35 * 86400)
        event["client_ip"] = "203.0.113.77"
        event["consent"] = {"ct": 4, "cv": secret_values[-1]}
        roll = rng.random()
        if roll < 0.1:
            event["user_data"]["idfa"] = 12345
        elif roll < 0.2:
            event["client_ip"] = "203.0.113.777"
        elif roll < 0.25:
            event["consent"]["ct"] = 9
        elif roll < 0.3:
            event.pop("app_data", None)
            event["user_data"]["gaid"] = secret_values[4]
        lines.append(json.dumps(event).encode())
    lines += [b"{not json", b'{"a": NaN}', b"\xff\xfe", b"[]"]
    (tmp_path / "part.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    validator = _validator(schema_validator)
    tally = ValidationTally()
    rejected_lines = []
    with (tmp_path / "part.jsonl").open("rb") as stream:
        for record in iter_source_records("part.jsonl", stream):
            outcome = validator.check(record)
            tally.add(outcome)
            if isinstance(outcome, Rejected):
                rejected_lines.append(outcome.to_json_dict())
                for secret in secret_values:
                    assert secret not in outcome.violation.reason
                    assert secret not in outcome.violation.pointer

    assert tally.read == 304
    assert tally.read == tally.valid + tally.rejected + tally.duplicates
    assert tally.valid > 0 and tally.duplicates > 0 and tally.rejected > 0
    assert {"event_time_future", "event_time_too_old", "missing_app_id", "invalid_json"} <= set(
        tally.rejected_by_code
    )
    assert len(rejected_lines) == tally.rejected
    assert 0 < tally.rejected_ratio < 1


def test_tally_counts_and_dict() -> None:
    merged = ValidationTally()
    assert merged.rejected_ratio == 0.0
    merged.add(Accepted({}, {}, "a", NOW, "f", 1))
    merged.add(Rejected("f", 2, Violation("schema", "", "x"), b""))
    merged.add(Duplicate("g", 1, "a"))
    merged.add(Rejected("g", 2, Violation("schema", "", "x"), b""))
    merged.add(Rejected("g", 3, Violation("invalid_json", "", "x"), b""))
    assert merged.to_dict() == {
        "read": 5,
        "valid": 1,
        "rejected": 3,
        "duplicates": 1,
        "rejected_ratio": 0.6,
        "rejected_by_code": {"invalid_json": 1, "schema": 2},
    }
    assert merged.read == merged.valid + merged.rejected + merged.duplicates
