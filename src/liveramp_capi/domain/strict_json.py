"""Strict JSON for partition records: duplicate keys, NaN/Infinity and overflowing numbers are
refused with a :class:`Violation` naming the problem (never the content); orjson reads the lines
it provably reads the same way, for speed."""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

from liveramp_capi.domain.violations import Violation


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


def json_type(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"
