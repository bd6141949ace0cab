"""The orjson fast path of the JSONL reader never changes a line's outcome (issue 5)."""

from __future__ import annotations

import io
import json
import random

from liveramp_capi.domain.sources import iter_source_records
from liveramp_capi.domain.strict_json import json_violation, parse_json_fast

TRICKY_LINES: list[bytes] = [
    b'{"a": 1}',
    b'{"a":1,"a":2}',
    b'{"a": {"b": 1, "b": 2}}',
    b'{"a":1,"a" :2,"b" :3}',
    b'{"a": "x:y", "a": "z"}',
    b'{"a": "\\u003a", "a": 1, "b": ":"}',
    b'{"k\\u0061": 1, "ka": 2}',
    b'{"a": 12345678901234567890}',
    b'{"a": 10000000000000000000}',
    b'{"a": -9223372036854775809}',
    b'{"a": 9223372036854775807}',
    b'{"a": 1e400}',
    b'{"a": -1e400}',
    b'{"a": 1e-400}',
    b'{"a": NaN}',
    b'{"a": Infinity}',
    b'{"a": 1E2, "b": 1.5e3, "c": -0, "d": -0.0}',
    b'{"a": "\\ud800"}',
    b'{"a": "caf\xc3\xa9"}',
    b'{"a": "\xed\xa0\x80"}',
    b'{"a": [' + b"[" * 300 + b"]" * 300 + b"]}",
    b'{"a": ' + b"[" * 1100 + b"]" * 1100 + b"}",
    b"[1, 2]",
    b'"text"',
    b"",
    b"   ",
    b'{"a": 1} x',
    b'{"a": "tab\there"}',
    b'{"a": "\\/\\n\\"q\\":"}',
]


def _strict(line: bytes) -> object:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return "encoding"
    value, violation = json_violation(text)
    return ("violation", violation.code) if violation is not None else value


def _same(a: object, b: object) -> bool:
    # Equal values of equal types all the way down (1 == 1.0 is not good enough).
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)  # type: ignore[index]
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))  # type: ignore[arg-type]
    return a == b or (a != a and b != b)


def test_fast_parse_is_either_refused_or_identical_to_the_strict_parser() -> None:
    rng = random.Random(5)
    pieces = [b'"k"', b'"k2"', b":", b",", b"1", b"1.5", b"-0", b"1e5", b'"v:"', b"{", b"}", b"[", b"]", b" ", b"null"]
    corpus = list(TRICKY_LINES) + [b"{" + b"".join(rng.choices(pieces, k=rng.randint(1, 12))) + b"}" for _ in range(3000)]
    refused = accepted = 0
    for line in corpus:
        fast = parse_json_fast(line)
        if fast is None:
            refused += 1
            continue
        accepted += 1
        assert _same(fast, _strict(line)), line
    assert refused > 50 and accepted > 20


def test_reader_outcomes_do_not_depend_on_the_parser() -> None:
    data = b"\n".join(TRICKY_LINES) + b"\n"
    for record in iter_source_records("t.jsonl", io.BytesIO(data)):
        line = TRICKY_LINES[record.line - 1]
        strict = _strict(line)
        if record.error is not None:
            assert strict in ("encoding", ("violation", record.error.code)) or record.error.code == "not_an_object"
        else:
            assert _same(record.value, strict), line
    # The duplicate key hidden behind whitespace is still found.
    assert _strict(b'{"a":1,"a" :2,"b" :3}') == ("violation", "duplicate_key")
    assert json.loads(b'{"a": 1}') == {"a": 1}
