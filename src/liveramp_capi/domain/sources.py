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

CSV files: see :mod:`liveramp_capi.domain.csv_source`.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from liveramp_capi.domain.csv_source import iter_csv
from liveramp_capi.domain.source_lines import (
    MAX_RAW_BYTES,
    DamagedGzip,
    SourceRecord,
    corrupt_gzip_record,
    encoding_violation,
    physical_lines,
    strip_eol,
)
from liveramp_capi.domain.strict_json import json_type, json_violation, parse_json_fast
from liveramp_capi.domain.violations import Violation

__all__ = ["MAX_RAW_BYTES", "SourceRecord", "UnsupportedFileError", "iter_source_records"]

GZIP_MAGIC = b"\x1f\x8b"


class UnsupportedFileError(ValueError):
    """The file name has none of the supported extensions."""


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
        reader = iter_csv
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


def _iter_jsonl(name: str, binary: BinaryIO, max_line_bytes: int) -> Iterator[SourceRecord]:
    lines = physical_lines(binary, max_line_bytes)
    while True:
        try:
            line = next(lines)
        except StopIteration:
            return
        except DamagedGzip as exc:
            yield corrupt_gzip_record(name, exc.args[0])
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
        data = strip_eol(line.data)
        raw = data[:MAX_RAW_BYTES]
        fast = parse_json_fast(data)
        if fast is not None:
            yield SourceRecord(name, line.number, fast, raw)
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield SourceRecord(name, line.number, None, raw, encoding_violation(exc, "line"))
            continue
        if not text.strip():
            continue
        value, violation = json_violation(text)
        if violation is None and not isinstance(value, dict):
            violation = Violation(
                "not_an_object", "", f"line is a JSON {json_type(value)}, not an object (one event per line)"
            )
        if violation is not None:
            yield SourceRecord(name, line.number, None, raw, violation)
        else:
            yield SourceRecord(name, line.number, value, raw)
