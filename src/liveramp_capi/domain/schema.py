"""Load the event JSON Schema and validate records against it (reasons: :mod:`schema_reasons`).

Validation runs in two tiers: ``jsonschema_rs`` answers "valid or not" (about 50x faster than
the reference implementation), and only for the few invalid records the reference
``jsonschema`` validator is run to find the most useful error. The schema annotates its
subschemas with ``x-expect`` (the sentence that describes a valid value) and ``x-code``
(a specific violation code), so the wording lives next to the rule it explains.

Reasons never quote values under ``/user_data``, ``/consent``, ``/client_ip`` (envelopes,
device ids, consent strings, IPs); ``jsonschema``'s own messages quote values, so every
sentence here is built from the keyword, the location and the schema only.
"""

from __future__ import annotations

import copy
import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import jsonschema_rs
from jsonschema.exceptions import best_match, by_relevance

from liveramp_capi.domain.schema_reasons import violation_from_error
from liveramp_capi.domain.violations import Violation

# At the same depth an unknown field explains more than the missing field it was a typo of.
_RELEVANCE = by_relevance(strong=frozenset({"additionalProperties"}))


#: The event schema ships inside the package (``liveramp_capi/schemas/``), wherever it is installed.
SCHEMA_RESOURCE = "tiktok_event.schema.json"


@functools.lru_cache(maxsize=8)
def _read_schema(path: str | None) -> dict[str, Any]:
    if path is None:
        text = resources.files("liveramp_capi.schemas").joinpath(SCHEMA_RESOURCE).read_text(encoding="utf-8")
    else:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    schema: dict[str, Any] = json.loads(text)
    return schema


def load_event_schema(path: str | Path | None = None) -> dict[str, Any]:
    """Return the event schema as a dict (a private copy: callers may modify it).

    :param path: a schema file to use instead of the packaged one (tests, experiments).
    """
    return copy.deepcopy(_read_schema(None if path is None else str(Path(path).resolve())))


def with_custom_events(schema: dict[str, Any]) -> dict[str, Any]:
    """Copy ``schema`` so that ``event_type`` accepts any custom event name.

    Custom names must match ``$defs/custom_event_type`` (``^[A-Za-z][A-Za-z0-9_]{0,99}$``); all
    standard names match it too.

    :param schema: the event schema (left unchanged).
    """
    derived = copy.deepcopy(schema)
    derived["properties"]["event_type"] = {"$ref": "#/$defs/custom_event_type"}
    return derived




def _dispatch_form(node: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The ``anyOf`` equivalent of ``node["allOf"]`` when it is a key-dispatch table, else None.

    The schema types ``custom_data`` entries with one ``if``/``then`` per known key
    (``if key == "currency" then value is a currency``, ...) plus a last ``if key is none of
    those then value is a scalar``. ``jsonschema_rs`` evaluates all thirteen conditions of
    every entry and that alone costs about 60% of a record's validation. When the conditions
    are mutually exclusive and exhaustive (distinct ``const`` values of one required property,
    and a ``not``/``enum`` of exactly those values), "all of (if C_i then T_i)" is the same set
    of instances as "any of (C_i and T_i)", and ``anyOf`` stops at the first branch that holds.

    :param node: a subschema holding ``allOf``.
    """
    items = node.get("allOf")
    if not isinstance(items, list) or len(items) < 2:
        return None
    prop: str | None = None
    constants: list[Any] = []
    rest: set[str] | None = None
    branches: list[dict[str, Any]] = []
    for item in items:
        if not isinstance(item, dict) or set(item) != {"if", "then"}:
            return None
        cond, then = item["if"], item["then"]
        if not (isinstance(cond, dict) and set(cond) == {"properties", "required"}):
            return None
        props = cond["properties"]
        if not (isinstance(props, dict) and len(props) == 1 and cond["required"] == list(props)):
            return None
        name, test = next(iter(props.items()))
        if prop is None:
            prop = name
        if name != prop or not isinstance(test, dict):
            return None
        if set(test) == {"const"} and isinstance(test["const"], str):
            constants.append(test["const"])
        elif set(test) == {"not"} and isinstance(test["not"], dict) and set(test["not"]) == {"enum"}:
            if rest is not None or not all(isinstance(v, str) for v in test["not"]["enum"]):
                return None
            rest = set(test["not"]["enum"])
        else:
            return None
        if not (isinstance(then, dict) and set(then) == {"properties"} and isinstance(then["properties"], dict)):
            return None
        if prop in then["properties"]:
            return None
        branches.append({"properties": {prop: test, **then["properties"]}})
    # Exclusive: distinct constants; exhaustive: the last branch takes every other string.
    # The property must be a required string, or a missing/non-string one could satisfy
    # the anyOf where the allOf differs (it is then invalid either way, through these).
    node_props = node.get("properties")
    prop_schema = node_props.get(prop) if isinstance(node_props, dict) else None
    if (
        rest is None
        or len(set(constants)) != len(constants)
        or rest != set(constants)
        or prop not in (node.get("required") or [])
        or not isinstance(prop_schema, dict)
        or prop_schema.get("type") != "string"
    ):
        return None
    return branches


def fast_schema(schema: Any) -> Any:
    """Return a copy of ``schema`` for the first-pass ``jsonschema_rs`` validator.

    It accepts exactly the same instances as ``schema`` (the differential test in
    ``tests/domain/test_schema.py`` checks it); only key-dispatch tables are rewritten (see
    :func:`_dispatch_form`). The reference validator, and every message, keep the original.

    :param schema: the event schema or any subschema.
    """
    if isinstance(schema, list):
        return [fast_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: fast_schema(value) for key, value in schema.items()}
    branches = _dispatch_form(schema)
    if branches is not None:
        del out["allOf"]
        out["anyOf"] = fast_schema(branches)
    return out


class EventSchemaValidator:
    """Validate input records against the event schema.

    :param schema: the event schema; default :func:`load_event_schema`.
    :param allow_custom_events: accept any ``event_type`` matching
        ``^[A-Za-z][A-Za-z0-9_]{0,99}$`` instead of only TikTok's standard events.
    """

    def __init__(self, schema: dict[str, Any] | None = None, *, allow_custom_events: bool = False) -> None:
        base = schema if schema is not None else load_event_schema()
        self.schema: dict[str, Any] = with_custom_events(base) if allow_custom_events else base
        self.allow_custom_events = allow_custom_events
        self._fast = jsonschema_rs.Draft202012Validator(fast_schema(self.schema), validate_formats=True)
        self._reference = jsonschema.Draft202012Validator(
            self.schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
        )
        self._pruned: dict[frozenset[Any], Any] = {}

    def validate(self, record: dict[str, Any]) -> Violation | None:
        """Return the most useful violation of ``record``, or None when it is valid.

        The violation is the reference validator's (see :meth:`validate_reference`), found
        faster: the compiled validator names the top-level fields that hold errors, and the
        reference validator skips the others (they hold no error for it either: the two agree,
        which the differential test checks). Every root keyword still sees the whole record,
        and the remaining errors come in the same order, so ``best_match`` picks the same one.

        :param record: one parsed input record.
        """
        try:
            if self._fast.is_valid(record):
                return None
            culprits = frozenset(
                error.instance_path[0] for error in self._fast.iter_errors(record) if error.instance_path
            )
        except (ValueError, OverflowError, RecursionError):
            # Values the Rust side cannot represent fall back to the reference validator.
            return self.validate_reference(record)
        reference = self._pruned_reference(culprits)
        if reference is not None:
            try:
                error = best_match(reference.iter_errors(record), key=_RELEVANCE)
            except RecursionError:
                return Violation("too_deeply_nested", "", "record is nested too deeply to validate")
            if error is not None:
                return violation_from_error(error, record)
        return self.validate_reference(record)

    def _pruned_reference(self, culprits: frozenset[Any]) -> jsonschema.protocols.Validator | None:
        """A reference validator whose top-level properties outside ``culprits`` accept anything.

        Cached per set of culprit fields (a handful occur in practice); None when the cache is
        full, and the caller then uses the whole reference validator.

        :param culprits: top-level field names holding errors.
        """
        reference = self._pruned.get(culprits)
        if reference is None and len(self._pruned) < 64:
            schema = dict(self.schema)
            schema["properties"] = {
                name: (sub if name in culprits else True) for name, sub in self.schema["properties"].items()
            }
            reference = jsonschema.Draft202012Validator(
                schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
            )
            self._pruned[culprits] = reference
        return reference

    def validate_reference(self, record: dict[str, Any]) -> Violation | None:
        """Like :meth:`validate` but with the reference ``jsonschema`` validator only.

        :param record: one parsed input record.
        """
        try:
            error = best_match(self._reference.iter_errors(record), key=_RELEVANCE)
        except RecursionError:
            return Violation("too_deeply_nested", "", "record is nested too deeply to validate")
        if error is None:
            return None
        return violation_from_error(error, record)
