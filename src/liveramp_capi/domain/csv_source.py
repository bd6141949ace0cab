"""Read CSV partition files (``.csv``, ``.csv.gz``) into :class:`SourceRecord` objects.

A header row is required (the first non-blank row). Cells are stripped of surrounding
whitespace and an empty cell means "absent". Quoted cells may hold commas, quotes and
newlines (RFC 4180). Rows whose cells are all empty are skipped like blank lines. Each row
becomes the same event as a JSONL line:

=====================  ===========================================================================
CSV column             event field
=====================  ===========================================================================
``event_id``           ``event_id`` (required column)
``event_type``         ``event_type`` (required column)
``event_time``         ``event_time``: digits become an integer, anything else stays a string (and
                       is rejected by the schema with a clear reason) (required column)
``event_source_url``   ``event_source_url``
``partner_id``         ``user_data.partner_id`` (required column; ``user_data`` is always present)
``idfa``, ``idfv``,    ``user_data.idfa``, ``user_data.idfv``, ``user_data.gaid``,
``gaid``,              ``user_data.att_status``
``att_status``
``app_id``,            ``app_data.app_id``, ``app_data.app_name``, ``app_data.app_version``;
``app_name``,          ``app_data`` only exists when one of them is non-empty
``app_version``
``event_manager``      ``event_manager``: comma-separated list; ``["tiktok"]`` when the column is
                       absent or the cell empty
``custom_data``        a JSON cell holding the whole ``custom_data`` in either form (array of
                       ``{"key", "value"}`` or object); entries from the columns below are
                       appended after it (an object is then converted to the array form)
``currency``,          ``custom_data`` entries ``{"key": <column>, "value": <cell>}`` in this
``value``,             order, non-empty cells only, values kept as strings (the schema accepts
``content_type``,      decimal / digit strings)
``quantity``,
``order_id``
``contents``           a JSON cell with the array of content objects, appended as the
                       ``{"key": "contents", "value": [...]}`` entry
``session_id``,        pipeline-only ``session_id``, ``user_key``, ``client_ip``
``user_key``,
``client_ip``
``envelope_issued_at`` pipeline-only ``envelope_issued_at`` (digits become an integer)
``ct``, ``cv``         pipeline-only ``consent = {"ct": <int>, "cv": ...}``
``gpp``, ``gpp_sid``   pipeline-only ``consent = {"gpp": ..., "gpp_sid": "7,8"}``
=====================  ===========================================================================

CSV problems, per row unless stated:

========================  ==============================================================
code                      when
========================  ==============================================================
``csv_missing_column``    the header lacks a required column: every data row gets it
``csv_unknown_column``    the header has a column not in the table: every data row gets it
``csv_duplicate_column``  the header names a column twice: every data row gets it
``csv_field_count``       the row has more or fewer cells than the header
``invalid_json``, ...     the ``custom_data`` or ``contents`` cell is not valid JSON
                          (same codes as JSONL; pointer ``/custom_data``)
``invalid_encoding``      a line is not UTF-8: ONE record for the rest of the file, which
                          is not read further (a CSV row cannot be re-synchronised safely)
``line_too_long``         a physical line longer than ``max_line_bytes``: same, rest of file
``invalid_csv``           the csv module gives up (e.g. a cell over 128 KiB): same
========================  ==============================================================
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from typing import Any, BinaryIO

from liveramp_capi.domain.source_lines import (
    MAX_RAW_BYTES,
    DamagedGzip,
    Line,
    SourceRecord,
    corrupt_gzip_record,
    physical_lines,
    strip_eol,
)
from liveramp_capi.domain.strict_json import json_violation
from liveramp_capi.domain.violations import Violation

CSV_REQUIRED_COLUMNS: tuple[str, ...] = ("event_id", "event_type", "event_time", "partner_id")
_CSV_TOP = ("event_id", "event_type", "event_source_url")
_CSV_USER = ("partner_id", "idfa", "idfv", "gaid", "att_status")
_CSV_APP = ("app_id", "app_name", "app_version")
_CSV_CUSTOM = ("currency", "value", "content_type", "quantity", "order_id")
_CSV_PIPELINE = ("session_id", "user_key", "client_ip")
_CSV_CONSENT = ("ct", "cv", "gpp", "gpp_sid")
CSV_COLUMNS: frozenset[str] = frozenset(
    (
        *_CSV_TOP,
        "event_time",
        *_CSV_USER,
        *_CSV_APP,
        "event_manager",
        "custom_data",
        *_CSV_CUSTOM,
        "contents",
        *_CSV_PIPELINE,
        "envelope_issued_at",
        *_CSV_CONSENT,
    )
)


class _StopFile(Exception):
    def __init__(self, line: int, raw: bytes, violation: Violation) -> None:
        super().__init__(violation.reason)
        self.line = line
        self.raw = raw
        self.violation = violation


class _RowLines:
    """Feed decoded physical lines to csv.reader while remembering each row's bytes and start."""

    def __init__(self, lines: Iterator[Line], max_line_bytes: int) -> None:
        self._lines = lines
        self._max = max_line_bytes
        self.raw = bytearray()
        self.start: int | None = None
        self.last = 0

    def take(self) -> tuple[int, bytes]:
        start, raw = self.start or self.last, bytes(strip_eol(bytes(self.raw)))
        self.raw.clear()
        self.start = None
        return start, raw

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        line = next(self._lines)  # StopIteration and DamagedGzip pass through
        self.last = line.number
        if self.start is None:
            self.start = line.number
        if len(self.raw) < MAX_RAW_BYTES:
            self.raw += line.data[: MAX_RAW_BYTES - len(self.raw)]
        if line.too_long:
            raise _StopFile(
                line.number,
                line.data,
                Violation(
                    "line_too_long",
                    "",
                    f"line {line.number} is longer than {self._max} bytes; the rest of the file was not read",
                ),
            )
        try:
            return line.data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _StopFile(
                line.number,
                line.data[:MAX_RAW_BYTES],
                Violation(
                    "invalid_encoding",
                    "",
                    f"line {line.number} is not valid UTF-8 (byte {exc.start + 1}); files must be UTF-8; "
                    "the rest of the file was not read",
                ),
            ) from None


def _header_problem(header: list[str]) -> Violation | None:
    seen: set[str] = set()
    duplicates = [col for col in header if col in seen or seen.add(col)]  # type: ignore[func-returns-value]
    if duplicates:
        return Violation("csv_duplicate_column", "", f"CSV header repeats column(s): {', '.join(duplicates)}")
    missing = [col for col in CSV_REQUIRED_COLUMNS if col not in seen]
    if missing:
        return Violation(
            "csv_missing_column", "", f"CSV header lacks required column(s): {', '.join(missing)}"
        )
    unknown = [col if len(col) <= 100 else col[:100] + "..." for col in header if col not in CSV_COLUMNS]
    if unknown:
        return Violation(
            "csv_unknown_column",
            "",
            f"CSV header has unknown column(s): {', '.join(json.dumps(c) for c in unknown)}; "
            "see the column table in liveramp_capi.domain.csv_source",
        )
    return None


def _int_if_digits(cell: str) -> int | str:
    return int(cell) if cell.isascii() and cell.isdigit() and len(cell) <= 18 else cell


def _row_to_record(cells: dict[str, str]) -> tuple[dict[str, Any] | None, Violation | None]:
    def get(col: str) -> str | None:
        return cells.get(col) or None

    record: dict[str, Any] = {}
    manager = get("event_manager")
    record["event_manager"] = (
        [part.strip() for part in manager.split(",") if part.strip()] if manager else ["tiktok"]
    )
    for col in ("event_id", "event_type"):
        if get(col) is not None:
            record[col] = get(col)
    event_time = get("event_time")
    if event_time is not None:
        record["event_time"] = _int_if_digits(event_time)
    if get("event_source_url") is not None:
        record["event_source_url"] = get("event_source_url")
    record["user_data"] = {col: get(col) for col in _CSV_USER if get(col) is not None}
    app = {col: get(col) for col in _CSV_APP if get(col) is not None}
    if app:
        record["app_data"] = app

    custom: Any = None
    cell = get("custom_data")
    if cell is not None:
        custom, violation = json_violation(cell, what="CSV column custom_data", pointer="/custom_data")
        if violation is not None:
            return None, violation
    entries: list[dict[str, Any]] = [
        {"key": col, "value": get(col)} for col in _CSV_CUSTOM if get(col) is not None
    ]
    cell = get("contents")
    if cell is not None:
        contents, violation = json_violation(cell, what="CSV column contents", pointer="/custom_data")
        if violation is not None:
            return None, violation
        entries.append({"key": "contents", "value": contents})
    if entries:
        if isinstance(custom, dict):
            custom = [{"key": key, "value": value} for key, value in custom.items()]
        if custom is None:
            custom = entries
        elif isinstance(custom, list):
            custom = [*custom, *entries]
        # Any other JSON value is left alone: the schema rejects it with a clear reason.
    if custom is not None:
        record["custom_data"] = custom

    for col in _CSV_PIPELINE:
        if get(col) is not None:
            record[col] = get(col)
    issued = get("envelope_issued_at")
    if issued is not None:
        record["envelope_issued_at"] = _int_if_digits(issued)
    consent: dict[str, Any] = {}
    for col in _CSV_CONSENT:
        value = get(col)
        if value is not None:
            consent[col] = _int_if_digits(value) if col == "ct" else value
    if consent:
        record["consent"] = consent
    return record, None


def iter_csv(name: str, binary: BinaryIO, max_line_bytes: int) -> Iterator[SourceRecord]:
    feed = _RowLines(physical_lines(binary, max_line_bytes), max_line_bytes)
    reader = csv.reader(feed)
    header: list[str] | None = None
    header_problem: Violation | None = None
    header_record: SourceRecord | None = None
    while True:
        try:
            row = next(reader)
        except StopIteration:
            # An unusable header and no data row (e.g. JSONL named .csv): report the header line
            # itself, or the file would vanish without a reason.
            if header_record is not None:
                yield header_record
            return
        except DamagedGzip as exc:
            yield corrupt_gzip_record(name, exc.args[0])
            return
        except _StopFile as exc:
            start = feed.start or exc.line
            yield SourceRecord(name, start, None, bytes(feed.raw), exc.violation)
            return
        except csv.Error as exc:
            start, raw = feed.take()
            yield SourceRecord(
                name,
                start,
                None,
                raw,
                Violation(
                    "invalid_csv",
                    "",
                    f"CSV cannot be parsed from line {start}: {exc}; the rest of the file was not read",
                ),
            )
            return
        line, raw = feed.take()
        cells = [cell.strip() for cell in row]
        if not any(cells):
            continue
        if header is None:
            header = cells
            header_problem = _header_problem(header)
            if header_problem is not None:
                header_record = SourceRecord(name, line, None, raw, header_problem)
            continue
        if header_problem is not None:
            header_record = None
            yield SourceRecord(name, line, None, raw, header_problem)
            continue
        if len(cells) != len(header):
            yield SourceRecord(
                name,
                line,
                None,
                raw,
                Violation(
                    "csv_field_count", "", f"row has {len(cells)} fields but the header has {len(header)}"
                ),
            )
            continue
        record, violation = _row_to_record(dict(zip(header, cells, strict=True)))
        yield SourceRecord(name, line, record, raw, violation)
