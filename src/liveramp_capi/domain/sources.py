"""Stream conversion records out of partition files, one :class:`SourceRecord` per record.

Files are read line by line and never loaded whole. Anything wrong with a file or a line
becomes a :class:`SourceRecord` whose ``error`` says what and where: a reader never raises
for bad content (only :class:`UnsupportedFileError` for an unknown file type, and real I/O
errors of the underlying stream pass through).

Supported files (by name): ``.jsonl``, ``.jsonl.gz``, ``.csv``, ``.csv.gz``. All must be
UTF-8; a UTF-8 BOM at the start is accepted and dropped.

``SourceRecord.line`` is the 1-based physical line where the record starts (for CSV the
header is normally line 1 and the first data row line 2; a row with quoted newlines spans
several lines and reports its first). File-level problems (``not_gzip``,
``unexpected_gzip``, ``corrupt_gzip``) have ``line = None``.

JSONL
-----
One JSON object per line. Blank or whitespace-only lines are skipped and are not records
(they still count for line numbers); a trailing newline is normal. Per line:

========================  ==============================================================
code                      when
========================  ==============================================================
``line_too_long``         the line is longer than ``max_line_bytes`` (not parsed)
``invalid_encoding``      the line is not UTF-8 (the reason gives the byte position)
``duplicate_key``         an object repeats a key (the reason names the key)
``invalid_number``        ``NaN``/``Infinity``, a float that overflows, a >4300-digit integer
``too_deeply_nested``     nesting deeper than the parser's recursion limit
``invalid_json``          any other syntax error (the reason gives line/column)
``not_an_object``         the line is valid JSON but not an object
========================  ==============================================================

CSV
---
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
import gzip
import io
import json
import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import orjson

from liveramp_capi.domain.violations import Violation

#: Raw bytes kept per record for rejected.jsonl.
MAX_RAW_BYTES = 64 * 1024
GZIP_MAGIC = b"\x1f\x8b"
_BOM = b"\xef\xbb\xbf"
_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)

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


class UnsupportedFileError(ValueError):
    """The file name has none of the supported extensions."""


@dataclass(slots=True)
class SourceRecord:
    """One record (or one unreadable stretch) of a partition file.

    :param file: file name relative to the partition.
    :param line: 1-based physical line where the record starts; None for file-level errors.
    :param value: the parsed record, when parsing succeeded.
    :param raw: the record's bytes (at most 64 KiB) for rejected.jsonl.
    :param error: why the record could not be read, else None.
    """

    file: str
    line: int | None
    value: dict[str, Any] | None
    raw: bytes
    error: Violation | None = None


class _Prefixed(io.RawIOBase):
    """A stream that replays the bytes already read for sniffing, then the rest."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._head:
            n = min(len(view), len(self._head))
            view[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._rest.read(len(view))
        if not data:
            return 0
        view[: len(data)] = data
        return len(data)


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def iter_source_records(
    name: str, stream: BinaryIO, *, max_line_bytes: int = 1_048_576
) -> Iterator[SourceRecord]:
    """Yield every record of one partition file.

    :param name: the file name relative to the partition; its extension selects the format.
    :param stream: the opened binary file (not closed here).
    :param max_line_bytes: longest accepted physical line, newline excluded.
    :raises UnsupportedFileError: for a name without a supported extension.
    """
    lower = name.lower()
    compressed = lower.endswith(".gz")
    base = lower[:-3] if compressed else lower
    if base.endswith(".jsonl"):
        reader: Callable[[str, BinaryIO, int], Iterator[SourceRecord]] = _iter_jsonl
    elif base.endswith(".csv"):
        reader = _iter_csv
    else:
        raise UnsupportedFileError(
            f"unsupported file type: {name!r}; expected .jsonl, .jsonl.gz, .csv or .csv.gz"
        )
    head = _read_exactly(stream, 2)
    if not head:
        return
    is_gzip = head == GZIP_MAGIC
    if compressed and not is_gzip:
        yield SourceRecord(
            name,
            None,
            None,
            b"",
            Violation("not_gzip", "", "file name ends in .gz but the file is not gzip data"),
        )
        return
    if not compressed and is_gzip:
        yield SourceRecord(
            name,
            None,
            None,
            b"",
            Violation("unexpected_gzip", "", "file is gzip-compressed but its name does not end in .gz"),
        )
        return
    buffered = io.BufferedReader(_Prefixed(head, stream), buffer_size=256 * 1024)
    binary: BinaryIO = gzip.GzipFile(fileobj=buffered, mode="rb") if compressed else buffered  # type: ignore[assignment]
    yield from reader(name, binary, max_line_bytes)


# ---------------------------------------------------------------------------- physical lines


@dataclass(slots=True)
class _Line:
    number: int
    data: bytes  # with its line ending; at most MAX_RAW_BYTES when too_long
    too_long: bool


class _Damaged(Exception):
    """The gzip stream ended early or is corrupt."""


def _physical_lines(binary: BinaryIO, max_line_bytes: int) -> Iterator[_Line]:
    number = 0
    try:
        while True:
            chunk = binary.readline(max_line_bytes + 1)
            if not chunk:
                return
            number += 1
            if number == 1 and chunk.startswith(_BOM):
                chunk = chunk[len(_BOM) :]
            if len(chunk) > max_line_bytes and not chunk.endswith(b"\n"):
                kept = chunk[:MAX_RAW_BYTES]
                # Drain the rest of the line in small pieces so a huge line never sits in memory.
                while chunk and not chunk.endswith(b"\n"):
                    chunk = binary.readline(64 * 1024)
                yield _Line(number, kept, True)
                continue
            yield _Line(number, chunk, False)
    except _GZIP_ERRORS as exc:
        raise _Damaged(number) from exc


def _corrupt(name: str, after_line: int) -> SourceRecord:
    where = "before the first line" if after_line == 0 else f"after line {after_line}"
    return SourceRecord(
        name,
        None,
        None,
        b"",
        Violation(
            "corrupt_gzip",
            "",
            f"gzip data is truncated or corrupt {where}; the rest of the file could not be read",
        ),
    )


def _strip_eol(data: bytes) -> bytes:
    if data.endswith(b"\r\n"):
        return data[:-2]
    if data.endswith(b"\n"):
        return data[:-1]
    return data


# ---------------------------------------------------------------------------- strict JSON


class _Refused(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            shown = key if len(key) <= 100 else key[:100] + "..."
            raise _Refused("duplicate_key", f"duplicate key {json.dumps(shown)} in a JSON object")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise _Refused("invalid_number", f"{name} is not a valid JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise _Refused("invalid_number", f"number too large: {shown}")
    return value


_DECODER = json.JSONDecoder(
    object_pairs_hook=_unique_pairs, parse_constant=_no_constant, parse_float=_finite_float
)


def parse_json_strict(text: str) -> Any:
    """Parse JSON rejecting duplicate keys, NaN/Infinity and overflowing numbers.

    :param text: the JSON text.
    :raises ValueError: with a :class:`Violation`-ready message; see :func:`json_violation`.
    """
    return _DECODER.decode(text)


def json_violation(text: str, *, what: str = "line", pointer: str = "") -> tuple[Any, Violation | None]:
    """Parse ``text`` strictly; return (value, None) or (None, violation).

    :param text: the JSON text.
    :param what: how to name the text in reasons ("line", "CSV column contents").
    :param pointer: pointer to report.
    """
    try:
        return _DECODER.decode(text), None
    except _Refused as exc:
        return None, Violation(exc.code, pointer, f"{what}: {exc.reason}")
    except RecursionError:
        return None, Violation("too_deeply_nested", pointer, f"{what}: JSON is nested too deeply")
    except json.JSONDecodeError as exc:
        # The decoder's message names a position, never the content.
        return None, Violation("invalid_json", pointer, f"{what} is not valid JSON: {exc}")
    except ValueError:
        # Only integers longer than sys.get_int_max_str_digits() get here.
        return None, Violation("invalid_number", pointer, f"{what}: integer has too many digits")


# ---------------------------------------------------------------------------- fast JSON

#: Above this many brackets a line may nest deeper than either parser allows: strict path.
_FAST_MAX_BRACKETS = 256
#: orjson turns integers beyond 64 bits into floats, the stdlib keeps them exact: a run of 19
#: digits sends the line to the strict path. (``bytes.translate`` + ``in`` is 8x faster than
#: a regular expression here.)
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGIT_RUN = b"0" * 19


def parse_json_fast(data: bytes) -> dict[str, Any] | None:
    """Parse one JSONL line with orjson; None when only :func:`json_violation` may decide.

    orjson is about 5x faster than the stdlib parser with its strict hooks, but it keeps the
    last of two duplicate keys, turns integers beyond 64 bits into floats and nests deeper.
    The result is used only when cheap checks prove the strict parser would return the very
    same object; otherwise (and for anything orjson refuses: NaN, overflow, bad UTF-8, syntax)
    the caller runs the strict parser, which gives the exact reason. So the outcome of a line
    never depends on which parser read it.

    Duplicate keys: every ``:`` of a JSON text is either a key separator or a character of a
    string. Without ``\\u`` escapes a string's colons are literal in both the input and
    orjson's output, so the input has more colons than the re-serialised value exactly when
    a key was lost, i.e. when an object repeated a key.

    :param data: the line, UTF-8, without its line ending.
    """
    if b"\\u" in data or data.count(b"{") + data.count(b"[") > _FAST_MAX_BRACKETS or _LONG_DIGIT_RUN in data.translate(
        _DIGITS_AS_ZERO
    ):
        return None
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if type(value) is not dict or data.count(b":") != orjson.dumps(value).count(b":"):
        return None
    return value


# ---------------------------------------------------------------------------- JSONL


def _encoding_violation(exc: UnicodeDecodeError, what: str) -> Violation:
    return Violation(
        "invalid_encoding", "", f"{what} is not valid UTF-8 (byte {exc.start + 1}); files must be UTF-8"
    )


def _iter_jsonl(name: str, binary: BinaryIO, max_line_bytes: int) -> Iterator[SourceRecord]:
    lines = _physical_lines(binary, max_line_bytes)
    while True:
        try:
            line = next(lines)
        except StopIteration:
            return
        except _Damaged as exc:
            yield _corrupt(name, exc.args[0])
            return
        if line.too_long:
            yield SourceRecord(
                name,
                line.number,
                None,
                line.data,
                Violation("line_too_long", "", f"line is longer than {max_line_bytes} bytes; not parsed"),
            )
            continue
        data = _strip_eol(line.data)
        raw = data[:MAX_RAW_BYTES]
        fast = parse_json_fast(data)
        if fast is not None:
            yield SourceRecord(name, line.number, fast, raw)
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield SourceRecord(name, line.number, None, raw, _encoding_violation(exc, "line"))
            continue
        if not text.strip():
            continue
        value, violation = json_violation(text)
        if violation is None and not isinstance(value, dict):
            violation = Violation(
                "not_an_object", "", f"line is a JSON {_json_type(value)}, not an object (one event per line)"
            )
        if violation is not None:
            yield SourceRecord(name, line.number, None, raw, violation)
        else:
            yield SourceRecord(name, line.number, value, raw)


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


# ---------------------------------------------------------------------------- CSV


class _StopFile(Exception):
    def __init__(self, line: int, raw: bytes, violation: Violation) -> None:
        super().__init__(violation.reason)
        self.line = line
        self.raw = raw
        self.violation = violation


class _RowLines:
    """Feed decoded physical lines to csv.reader while remembering each row's bytes and start."""

    def __init__(self, lines: Iterator[_Line], max_line_bytes: int) -> None:
        self._lines = lines
        self._max = max_line_bytes
        self.raw = bytearray()
        self.start: int | None = None
        self.last = 0

    def take(self) -> tuple[int, bytes]:
        start, raw = self.start or self.last, bytes(_strip_eol(bytes(self.raw)))
        self.raw.clear()
        self.start = None
        return start, raw

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        line = next(self._lines)  # StopIteration and _Damaged pass through
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
            "see the column table in liveramp_capi.domain.sources",
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


def _iter_csv(name: str, binary: BinaryIO, max_line_bytes: int) -> Iterator[SourceRecord]:
    feed = _RowLines(_physical_lines(binary, max_line_bytes), max_line_bytes)
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
        except _Damaged as exc:
            yield _corrupt(name, exc.args[0])
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
