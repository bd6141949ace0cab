"""Streaming readers: every damaged file or line becomes a SourceRecord with a clear error."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from liveramp_capi.domain.sources import (
    MAX_RAW_BYTES,
    SourceRecord,
    UnsupportedFileError,
    iter_source_records,
)

GOOD = {
    "event_manager": ["tiktok"],
    "event_id": "e1",
    "event_type": "Purchase",
    "event_time": 1714692283,
    "user_data": {"partner_id": "ENV"},
}


def _read(path: Path, **kwargs: Any) -> list[SourceRecord]:
    with path.open("rb") as stream:
        return list(iter_source_records(path.name, stream, **kwargs))


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _jsonl(*records: Any) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def _codes(records: list[SourceRecord]) -> list[str | None]:
    return [r.error.code if r.error else None for r in records]


def test_jsonl_basic_lines_blank_lines_and_bom(tmp_path: Path) -> None:
    data = b"\xef\xbb\xbf" + _jsonl(GOOD) + b"\n   \n" + _jsonl(dict(GOOD, event_id="e2"))
    records = _read(_write(tmp_path, "a.jsonl", data))
    assert [(r.line, r.value["event_id"]) for r in records] == [(1, "e1"), (4, "e2")]
    assert all(r.error is None and r.file == "a.jsonl" for r in records)
    assert records[0].raw == json.dumps(GOOD).encode()


def test_jsonl_crlf_and_missing_final_newline(tmp_path: Path) -> None:
    data = json.dumps(GOOD).encode() + b"\r\n" + json.dumps(GOOD).encode()
    records = _read(_write(tmp_path, "a.jsonl", data))
    assert _codes(records) == [None, None]


def test_empty_files_have_no_records(tmp_path: Path) -> None:
    for name in ("e.jsonl", "e.csv", "e.jsonl.gz", "e.csv.gz"):
        assert _read(_write(tmp_path, name, b"")) == []
    assert _read(_write(tmp_path, "g.jsonl.gz", gzip.compress(b""))) == []
    assert _read(_write(tmp_path, "h.csv", b"event_id,event_type,event_time,partner_id\n")) == []


def test_unsupported_extension(tmp_path: Path) -> None:
    path = _write(tmp_path, "events.json", b"{}")
    with pytest.raises(UnsupportedFileError, match="events.json"):
        _read(path)
    assert issubclass(UnsupportedFileError, ValueError)


def test_latin1_bytes_are_invalid_encoding(tmp_path: Path) -> None:
    line = json.dumps(dict(GOOD, event_id="caf\u00e9"), ensure_ascii=False).encode("latin-1")
    records = _read(_write(tmp_path, "a.jsonl", _jsonl(GOOD) + line + b"\n" + _jsonl(GOOD)))
    assert _codes(records) == [None, "invalid_encoding", None]
    bad = records[1]
    assert bad.line == 2 and bad.raw == line
    offset = line.index(b"\xe9") + 1
    assert bad.error.reason == f"line is not valid UTF-8 (byte {offset}); files must be UTF-8"


def test_gzip_roundtrip_and_truncated_gzip(tmp_path: Path) -> None:
    lines = [dict(GOOD, event_id=f"e{i}", pad="x" * 200) for i in range(2000)]
    compressed = gzip.compress(_jsonl(*lines))
    assert _codes(_read(_write(tmp_path, "ok.jsonl.gz", compressed))) == [None] * 2000
    records = _read(_write(tmp_path, "cut.jsonl.gz", compressed[: len(compressed) // 2]))
    assert records[-1].error.code == "corrupt_gzip" and records[-1].line is None
    good = records[:-1]
    assert 0 < len(good) < 2000 and all(r.error is None for r in good)
    assert f"after line {good[-1].line}" in records[-1].error.reason


def test_corrupt_gzip_body(tmp_path: Path) -> None:
    compressed = bytearray(gzip.compress(_jsonl(*[GOOD] * 50)))
    compressed[30:60] = b"\xff" * 30
    records = _read(_write(tmp_path, "bad.jsonl.gz", bytes(compressed)))
    assert records[-1].error.code == "corrupt_gzip"
    assert all(r.error is None for r in records[:-1])


def test_not_gzip_despite_extension(tmp_path: Path) -> None:
    records = _read(_write(tmp_path, "a.jsonl.gz", _jsonl(GOOD, GOOD)))
    assert _codes(records) == ["not_gzip"]
    assert records[0].line is None
    assert _codes(_read(_write(tmp_path, "a.csv.gz", b"event_id\n1\n"))) == ["not_gzip"]


def test_gzip_without_gz_extension(tmp_path: Path) -> None:
    records = _read(_write(tmp_path, "a.jsonl", gzip.compress(_jsonl(GOOD))))
    assert _codes(records) == ["unexpected_gzip"]
    assert _codes(_read(_write(tmp_path, "a.csv", gzip.compress(b"a,b\n")))) == ["unexpected_gzip"]


def test_ten_megabyte_line(tmp_path: Path) -> None:
    huge = b'{"event_id": "' + b"x" * 10_000_000 + b'"}'
    records = _read(_write(tmp_path, "a.jsonl", _jsonl(GOOD) + huge + b"\n" + _jsonl(GOOD)))
    assert _codes(records) == [None, "line_too_long", None]
    assert [r.line for r in records] == [1, 2, 3]
    assert len(records[1].raw) <= MAX_RAW_BYTES
    assert "1048576" in records[1].error.reason


def test_max_line_bytes_boundary(tmp_path: Path) -> None:
    line = json.dumps(dict(GOOD, pad="y" * 100)).encode()
    path = _write(tmp_path, "a.jsonl", line + b"\n" + line)
    assert _codes(_read(path, max_line_bytes=len(line))) == [None, None]
    assert _codes(_read(path, max_line_bytes=len(line) - 1)) == ["line_too_long", "line_too_long"]


def test_deep_nesting_and_garbage(tmp_path: Path) -> None:
    deep = b"[" * 10_000 + b"]" * 10_000
    deep_obj = b'{"a":' * 10_000 + b"1" + b"}" * 10_000
    garbage = bytes(range(256)) * 4
    data = deep + b"\n" + deep_obj + b"\n" + garbage.replace(b"\n", b"") + b"\n" + b"\x00\x01{\n"
    codes = _codes(_read(_write(tmp_path, "a.jsonl", data)))
    assert codes[:2] == ["too_deeply_nested", "too_deeply_nested"]
    assert codes[2] == "invalid_encoding"
    assert codes[3] == "invalid_json"


@pytest.mark.parametrize(
    ("line", "code", "needle"),
    [
        (b'{"event_id": NaN}', "invalid_number", "NaN"),
        (b'{"v": -Infinity}', "invalid_number", "-Infinity"),
        (b'{"v": 1e400}', "invalid_number", "number too large"),
        (b'{"v": ' + b"9" * 5000 + b"}", "invalid_number", "too many digits"),
        (b'{"event_id": "a", "event_id": "b"}', "duplicate_key", '"event_id"'),
        (b'{"user_data": {"partner_id": "x", "partner_id": "y"}}', "duplicate_key", '"partner_id"'),
        (b'{"a": 1,}', "invalid_json", "line 1 column"),
        (b"[1, 2]", "not_an_object", "array"),
        (b'"text"', "not_an_object", "string"),
        (b"null", "not_an_object", "null"),
    ],
)
def test_strict_json(tmp_path: Path, line: bytes, code: str, needle: str) -> None:
    (record,) = _read(_write(tmp_path, "a.jsonl", line + b"\n"))
    assert record.error.code == code
    assert needle in record.error.reason
    assert record.value is None and record.line == 1


def test_duplicate_key_reason_does_not_echo_values(tmp_path: Path) -> None:
    line = b'{"user_data": {"partner_id": "SECRET-ENV-1", "partner_id": "SECRET-ENV-2"}}'
    (record,) = _read(_write(tmp_path, "a.jsonl", line))
    assert "SECRET" not in record.error.reason


# ------------------------------------------------------------------ CSV

HEADER = "event_id,event_type,event_time,partner_id"


def test_csv_full_mapping(tmp_path: Path) -> None:
    header = (
        "event_id,event_type,event_time,event_source_url,partner_id,idfa,idfv,gaid,att_status,"
        "app_id,app_name,app_version,event_manager,currency,value,content_type,quantity,order_id,"
        "contents,custom_data,session_id,user_key,envelope_issued_at,ct,cv,gpp,gpp_sid,client_ip"
    )
    contents = json.dumps([{"content_id": "A1", "price": "9.99", "quantity": 1}]).replace('"', '""')
    custom = json.dumps({"coupon": "SPRING"}).replace('"', '""')
    row = (
        f"e1,Purchase,1714692283,https://shop.example/p,ENV,IDFA-1,,GAID-1,AUTHORIZED,"
        f'com.app,App,1.0,,USD,9.99,product,1,O-1,"{contents}","{custom}",s1,u1,1714600000,4,TCF,,,203.0.113.7'
    )
    (record,) = _read(_write(tmp_path, "a.csv", f"{header}\n{row}\n".encode()))
    assert record.error is None and record.line == 2
    assert record.value == {
        "event_manager": ["tiktok"],
        "event_id": "e1",
        "event_type": "Purchase",
        "event_time": 1714692283,
        "event_source_url": "https://shop.example/p",
        "user_data": {"partner_id": "ENV", "idfa": "IDFA-1", "gaid": "GAID-1", "att_status": "AUTHORIZED"},
        "app_data": {"app_id": "com.app", "app_name": "App", "app_version": "1.0"},
        "custom_data": [
            {"key": "coupon", "value": "SPRING"},
            {"key": "currency", "value": "USD"},
            {"key": "value", "value": "9.99"},
            {"key": "content_type", "value": "product"},
            {"key": "quantity", "value": "1"},
            {"key": "order_id", "value": "O-1"},
            {"key": "contents", "value": [{"content_id": "A1", "price": "9.99", "quantity": 1}]},
        ],
        "session_id": "s1",
        "user_key": "u1",
        "client_ip": "203.0.113.7",
        "envelope_issued_at": 1714600000,
        "consent": {"ct": 4, "cv": "TCF"},
    }


def test_csv_minimal_row_defaults(tmp_path: Path) -> None:
    data = f'\ufeff{HEADER},gpp,gpp_sid,event_manager\r\ne1, Purchase ,17146922830,ENV,G,"7,8","tiktok, meta"\r\n'
    (record,) = _read(_write(tmp_path, "a.csv", data.encode()))
    assert record.value == {
        "event_manager": ["tiktok", "meta"],
        "event_id": "e1",
        "event_type": "Purchase",
        "event_time": 17146922830,
        "user_data": {"partner_id": "ENV"},
        "consent": {"gpp": "G", "gpp_sid": "7,8"},
    }
    (record,) = _read(_write(tmp_path, "b.csv", f"{HEADER}\ne1,Purchase,2024-05-03,\n".encode()))
    assert record.value["event_time"] == "2024-05-03" and record.value["user_data"] == {}


def test_csv_quoted_newlines_and_line_numbers(tmp_path: Path) -> None:
    data = (
        f"{HEADER},custom_data\n"
        'e1,Purchase,1714692283,ENV,"{""description"": ""two"",\n""query"": ""lines""}"\n'
        "\n"
        "e2,Purchase,1714692283,ENV,\n"
    )
    records = _read(_write(tmp_path, "a.csv", data.encode()))
    assert [(r.line, r.error) for r in records] == [(2, None), (5, None)]
    assert records[0].value["custom_data"] == {"description": "two", "query": "lines"}
    assert records[0].raw == b'e1,Purchase,1714692283,ENV,"{""description"": ""two"",\n""query"": ""lines""}"'


def test_csv_missing_column_marks_every_row(tmp_path: Path) -> None:
    data = "event_id,event_type,event_time\ne1,Purchase,1714692283\ne2,Purchase,1714692283\n"
    records = _read(_write(tmp_path, "a.csv", data.encode()))
    assert _codes(records) == ["csv_missing_column"] * 2
    assert "partner_id" in records[0].error.reason
    assert [r.line for r in records] == [2, 3]


def test_csv_unknown_and_duplicate_columns(tmp_path: Path) -> None:
    records = _read(_write(tmp_path, "a.csv", f"{HEADER},email\ne1,Purchase,1,ENV,x@y\n".encode()))
    assert _codes(records) == ["csv_unknown_column"]
    assert '"email"' in records[0].error.reason
    records = _read(_write(tmp_path, "b.csv", f"{HEADER},event_id\ne1,Purchase,1,ENV,e2\n".encode()))
    assert _codes(records) == ["csv_duplicate_column"]


def test_csv_field_count(tmp_path: Path) -> None:
    data = f"{HEADER}\ne1,Purchase,1714692283,ENV,extra\ne2,Purchase,1714692283\ne3,Purchase,1714692283,ENV\n"
    records = _read(_write(tmp_path, "a.csv", data.encode()))
    assert _codes(records) == ["csv_field_count", "csv_field_count", None]
    assert records[0].error.reason == "row has 5 fields but the header has 4"


def test_csv_json_cells(tmp_path: Path) -> None:
    data = (
        f"{HEADER},contents,custom_data,currency\n"
        'e1,Purchase,1,ENV,"[{""content_id"": ""a""}]","[{""key"": ""k"", ""value"": 1}]",EUR\n'
        'e2,Purchase,1,ENV,"[{""content_id"": ",,\n'
        'e3,Purchase,1,ENV,,"{""a"": 1, ""a"": 2}",\n'
        'e4,Purchase,1,ENV,,"{""currency"": ""USD""}",\n'
    )
    records = _read(_write(tmp_path, "a.csv", data.encode()))
    assert _codes(records) == [None, "invalid_json", "duplicate_key", None]
    assert records[0].value["custom_data"] == [
        {"key": "k", "value": 1},
        {"key": "currency", "value": "EUR"},
        {"key": "contents", "value": [{"content_id": "a"}]},
    ]
    assert records[1].error.pointer == "/custom_data" and "contents" in records[1].error.reason
    assert records[3].value["custom_data"] == {"currency": "USD"}


def test_csv_invalid_encoding_stops_the_file(tmp_path: Path) -> None:
    data = f"{HEADER}\ne1,Purchase,1,ENV\ne2,Purchase,1,caf\u00e9\ne3,Purchase,1,ENV\n".encode("latin-1")
    records = _read(_write(tmp_path, "a.csv", data))
    assert _codes(records) == [None, "invalid_encoding"]
    assert records[1].line == 3 and "rest of the file" in records[1].error.reason


def test_csv_gzip_and_truncation(tmp_path: Path) -> None:
    rows = "".join(f"e{i},Purchase,1714692283,ENV{i:05d}\n" for i in range(5000))
    compressed = gzip.compress(f"{HEADER}\n{rows}".encode())
    assert _codes(_read(_write(tmp_path, "a.csv.gz", compressed))) == [None] * 5000
    records = _read(_write(tmp_path, "b.csv.gz", compressed[: len(compressed) // 2]))
    assert records[-1].error.code == "corrupt_gzip"
    assert all(r.error is None for r in records[:-1]) and len(records) > 1


def test_csv_huge_cell_and_long_line(tmp_path: Path) -> None:
    data = f"{HEADER}\ne1,Purchase,1,ENV\ne2,Purchase,1,{'x' * 2_000_000}\n".encode()
    records = _read(_write(tmp_path, "a.csv", data))
    assert _codes(records) == [None, "line_too_long"]
    cell = "x\n" * 70_000
    data = f'{HEADER}\ne1,Purchase,1,"{cell}"\n'.encode()
    records = _read(_write(tmp_path, "b.csv", data))
    assert _codes(records) == ["invalid_csv"]
    assert len(records[0].raw) <= MAX_RAW_BYTES
