"""Turn a ``jsonschema`` error into a specific, privacy-safe :class:`Violation`.

Reasons never quote values under ``/user_data``, ``/consent``, ``/client_ip`` (envelopes,
device ids, consent strings, IPs); ``jsonschema``'s own messages quote values, so every
sentence here is built from the keyword, the location and the schema only. The schema's
``x-expect`` (the sentence that describes a valid value) and ``x-code`` (a specific violation
code) annotations are read here.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from typing import Any

from jsonschema.exceptions import ValidationError

from liveramp_capi.domain.violations import Violation

_MS_LOW, _MS_HIGH = 10**11, 10**14
_TYPE_WORDS = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "object": "an object",
    "array": "an array",
    "null": "null",
}


def _pointer(path: Sequence[Any]) -> str:
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in path)


def _label(path: Sequence[Any], record: Any) -> str:
    """Dotted, human-readable location: ``user_data.partner_id``, ``custom_data "value"``."""
    if not path:
        return "the record"
    parts = list(path)
    out = ""
    # In the seed's key/value form an index says little: name the entry by its key instead.
    if len(parts) >= 3 and parts[0] == "custom_data" and isinstance(parts[1], int) and parts[2] == "value":
        custom = record.get("custom_data") if isinstance(record, dict) else None
        entry = custom[parts[1]] if isinstance(custom, list) and parts[1] < len(custom) else None
        key = entry.get("key") if isinstance(entry, dict) else None
        if isinstance(key, str) and 0 < len(key) <= 100:
            out = f"custom_data {json.dumps(key)}"
            parts = parts[3:]
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _field_name(name: str) -> str:
    # Field names are not personal data, but a garbage key could be huge.
    return json.dumps(name if len(name) <= 100 else name[:100] + "...")


def _annotation(error: ValidationError, keyword: str) -> str | None:
    """The nearest ``x-expect`` / ``x-code`` annotation from the failing subschema outwards."""
    node: ValidationError | None = error
    while node is not None:
        if isinstance(node.schema, dict) and keyword in node.schema:
            return str(node.schema[keyword])
        node = node.parent
    return None


def _keyword_sentence(error: ValidationError) -> str:
    """Fallback wording from the failing keyword and its schema value, never the instance."""
    keyword, expected = error.validator, error.validator_value
    if keyword == "type":
        types = [expected] if isinstance(expected, str) else list(expected)
        return "must be " + " or ".join(_TYPE_WORDS.get(t, t) for t in types)
    if keyword == "minLength":
        return "must not be empty" if expected == 1 else f"must be at least {expected} characters long"
    if keyword == "maxLength":
        return f"must be at most {expected} characters long"
    if keyword in ("minimum", "exclusiveMinimum"):
        return f"must be {'>=' if keyword == 'minimum' else '>'} {expected}"
    if keyword in ("maximum", "exclusiveMaximum"):
        return f"must be {'<=' if keyword == 'maximum' else '<'} {expected}"
    if keyword == "minItems":
        return f"must hold at least {expected} item(s)"
    if keyword == "maxItems":
        return f"must hold at most {expected} items"
    if keyword == "maxProperties":
        return f"must hold at most {expected} keys"
    if keyword == "enum":
        if len(expected) <= 8:
            return "must be one of " + ", ".join(json.dumps(v) for v in expected)
        return "is not an allowed value"
    if keyword == "const":
        return f"must be {json.dumps(expected)}"
    if keyword == "contains":
        return "does not contain a required item"
    if keyword == "propertyNames":
        return "has a key that is empty or longer than 100 characters"
    if keyword == "format":
        return f"must be a valid {expected}"
    if keyword == "pattern":
        return "has an invalid format"
    if keyword in ("anyOf", "oneOf"):
        return "does not match any allowed form"
    if keyword == "false":
        return "is not allowed"
    return f"is invalid ({keyword})"


def _missing_field(error: ValidationError, record: Any) -> Violation:
    path = list(error.absolute_path)
    instance = error.instance if isinstance(error.instance, dict) else {}
    missing = next((name for name in error.validator_value if name not in instance), "")
    pointer = _pointer([*path, missing])
    if not path and missing == "app_data":
        return Violation(
            "missing_app_id",
            "/app_data/app_id",
            "mobile event needs app_data.app_id: user_data carries device ids (idfa/idfv/gaid)",
        )
    label = _label([*path, missing], record)
    if path == ["app_data"] and missing == "app_id":
        return Violation("missing_app_id", pointer, "app_data.app_id is required for mobile events")
    return Violation("missing_field", pointer, f"{label} is required")


def _unknown_field(error: ValidationError, record: Any) -> Violation:
    path = list(error.absolute_path)
    instance = error.instance if isinstance(error.instance, dict) else {}
    allowed = list((error.schema.get("properties") or {}).keys())
    extra = next((name for name in instance if name not in allowed), "")
    where = "top-level field" if not path else f"field in {_label(path, record)}"
    reason = f"unknown {where} {_field_name(extra)}"
    close = difflib.get_close_matches(extra, allowed, n=1) if len(extra) <= 100 else []
    if close:
        reason += f"; did you mean {json.dumps(close[0])}?"
    elif allowed:
        reason += "; allowed: " + ", ".join(allowed)
    return Violation("unknown_field", _pointer([*path, extra]), reason)


def _event_time(error: ValidationError) -> Violation | None:
    value = error.instance
    if isinstance(value, int) and not isinstance(value, bool) and _MS_LOW <= value < _MS_HIGH:
        return Violation(
            "event_time_milliseconds",
            "/event_time",
            f"event_time {value} looks like milliseconds; send Unix seconds (10 digits)",
        )
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 20:
        return Violation(
            "schema", "/event_time", f"event_time must be an integer, not the string {json.dumps(value)}"
        )
    return None


def _event_type(error: ValidationError) -> Violation:
    value = error.instance
    if not isinstance(value, str):
        return Violation("schema", "/event_type", "event_type must be a string naming a TikTok event")
    shown = json.dumps(value if len(value) <= 100 else value[:100] + "...")
    standard = error.validator_value if error.validator == "enum" else []
    if error.validator != "enum":
        return Violation(
            "invalid_event_type", "/event_type", f"event_type {shown} {_annotation(error, 'x-expect') or 'is invalid'}"
        )
    reason = f"event_type {shown} is not a TikTok standard web or app event (names are case-sensitive)"
    same_but_case = [name for name in standard if name.lower() == value.lower()]
    if same_but_case:
        reason += f"; did you mean {json.dumps(same_but_case[0])}?"
    reason += "; enable allow_custom_events to send custom events"
    return Violation("unknown_event_type", "/event_type", reason)


def violation_from_error(error: ValidationError, record: Any) -> Violation:
    """Translate one ``jsonschema`` error into a :class:`Violation`.

    :param error: the error chosen by :func:`best_match`.
    :param record: the validated record (used only for labels such as a custom_data key name).
    """
    path = list(error.absolute_path)
    pointer = _pointer(path)
    if error.validator == "required":
        return _missing_field(error, record)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        return _unknown_field(error, record)
    if path == ["event_time"]:
        special = _event_time(error)
        if special is not None:
            return special
    if path == ["event_type"]:
        return _event_type(error)
    sentence = _annotation(error, "x-expect") or _keyword_sentence(error)
    code = _annotation(error, "x-code") or "schema"
    label = _label(path, record)
    if code == "invalid_currency" and isinstance(error.instance, str) and len(error.instance) <= 16:
        # Currency codes are public reference data, so quoting the value helps and leaks nothing.
        return Violation(
            code,
            pointer,
            f'{label}: {json.dumps(error.instance)} is not an ISO 4217 currency code (e.g. "USD")',
        )
    return Violation(code, pointer, f"{label} {sentence}")
