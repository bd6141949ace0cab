"""Shape a validated record into the event LiveRamp receives.

Input records may carry pipeline-only fields (``session_id``, ``user_key``,
``envelope_issued_at``, ``consent``, ``client_ip``): the schema marks them with
``"x-pipeline-only": true`` and this module derives the list from there, so adding one is a
schema change only. They are split off before sending and never reach LiveRamp.
"""

from __future__ import annotations

from typing import Any

from liveramp_capi.domain.schema import load_event_schema


def pipeline_fields(schema: dict[str, Any]) -> frozenset[str]:
    """Top-level properties of ``schema`` marked ``"x-pipeline-only": true``.

    :param schema: the event schema.
    """
    properties = schema.get("properties", {})
    return frozenset(
        name
        for name, sub in properties.items()
        if isinstance(sub, dict) and sub.get("x-pipeline-only") is True
    )


#: Pipeline-only field names of the shipped schema.
PIPELINE_FIELDS: frozenset[str] = pipeline_fields(load_event_schema())


def normalize_event(event: dict[str, Any]) -> dict[str, Any]:
    """Return ``event`` in the seed's wire form; ``event`` itself is not modified.

    - ``custom_data`` given as a plain object becomes the seed's array
      ``[{"key": k, "value": v}, ...]`` in the object's order.
    - an ``event_time`` written as an integral float (``1714692283.0``, which JSON Schema counts
      as an integer) becomes an ``int`` so it is sent as Unix seconds, not as a float.

    Nothing else changes.

    :param event: a validated event (pipeline fields already removed or not).
    """
    out = dict(event)
    custom = out.get("custom_data")
    if isinstance(custom, dict):
        out["custom_data"] = [{"key": key, "value": value} for key, value in custom.items()]
    event_time = out.get("event_time")
    if isinstance(event_time, float) and event_time.is_integer():
        out["event_time"] = int(event_time)
    return out
