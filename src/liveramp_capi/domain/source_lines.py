"""Physical lines of a partition file and the :class:`SourceRecord` the readers yield.

Shared by the JSONL and CSV readers: lines are read one at a time with a length cap (a longer
line is drained in small pieces, never held whole), a UTF-8 BOM at the start is dropped, and a
truncated or corrupt gzip stream ends the file with one ``corrupt_gzip`` record.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from liveramp_capi.domain.violations import Violation

#: Raw bytes kept per record for rejected.jsonl.
MAX_RAW_BYTES = 64 * 1024
_BOM = b"\xef\xbb\xbf"
_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


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


@dataclass(slots=True)
class Line:
    number: int
    data: bytes  # with its line ending; at most MAX_RAW_BYTES when too_long
    too_long: bool


class DamagedGzip(Exception):
    """The gzip stream ended early or is corrupt."""


def physical_lines(binary: BinaryIO, max_line_bytes: int) -> Iterator[Line]:
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
                yield Line(number, kept, True)
                continue
            yield Line(number, chunk, False)
    except _GZIP_ERRORS as exc:
        raise DamagedGzip(number) from exc


def corrupt_gzip_record(name: str, after_line: int) -> SourceRecord:
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


def strip_eol(data: bytes) -> bytes:
    if data.endswith(b"\r\n"):
        return data[:-2]
    if data.endswith(b"\n"):
        return data[:-1]
    return data


def encoding_violation(exc: UnicodeDecodeError, what: str) -> Violation:
    return Violation(
        "invalid_encoding", "", f"{what} is not valid UTF-8 (byte {exc.start + 1}); files must be UTF-8"
    )
