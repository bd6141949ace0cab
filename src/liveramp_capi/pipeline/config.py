"""The pipelines' settings: one table of names, Variables and defaults; typed configs parsed from it.

Each setting is read from an Airflow Variable when its task runs (the DAG files pass the
templates :func:`templated` and :func:`templates` build, never reading a Variable while parsed).
A DAG's config is made of one section per step (:class:`ClaimConfig`, :class:`ValidateConfig`,
:class:`RecoverConfig` for the conversions DAGs; :class:`RefreshPlanConfig`,
:class:`RecoverConfig`, :class:`RefreshReportConfig` for the envelope refresh). Each task parses
its own section, so a malformed value fails the task that reads it, at once, with a
:class:`SettingError` naming the setting and its Variable. Plain Python: no Airflow import.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, Self

from liveramp_capi.domain.consent import DEFAULT_REFRESH_REMAINING_SHARE
from liveramp_capi.domain.partition import MIXED_GRANULARITY_VARIABLE

_AIRFLOW_HOME = os.environ.get("AIRFLOW_HOME", os.path.expanduser("~/airflow"))


class SettingError(ValueError):
    """A setting the user must fix; no retry can heal it. The message names the setting and its Variable."""


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: the Variable it is read from, its default, and what a valid value is.

    :param variable: the Airflow Variable, or None for an operator argument only.
    :param default: the value when the Variable is not set, as the Variable would hold it.
    :param kind: ``int``, ``float``, ``flag`` or ``text``.
    :param minimum: the smallest valid number.
    :param maximum: the largest valid number.
    :param example: a valid value, for the message.
    """

    variable: str | None
    default: str
    kind: Literal["int", "float", "flag", "text"] = "text"
    minimum: float = 0
    maximum: float = math.inf
    example: str = ""


#: Every setting of the pipelines, by the name the configs and operators use. The only place
#: defaults are written.
SETTINGS: dict[str, Setting] = {
    "landing_root": Setting("capi_landing_root", f"file://{_AIRFLOW_HOME}/capi/landing"),
    "output_root": Setting("capi_output_root", f"file://{_AIRFLOW_HOME}/capi/output"),
    "partition_wait_minutes": Setting("capi_partition_wait_minutes", "360", "float", example="360"),
    "hourly_partition_wait_minutes": Setting("capi_hourly_partition_wait_minutes", "90", "float", example="90"),
    "partition_poll_seconds": Setting("capi_partition_poll_seconds", "60", "float", example="60"),
    "wait_minutes": Setting("capi_partition_claim_wait_minutes", "60", "float", example="60"),
    "poll_seconds": Setting("capi_partition_claim_poll_seconds", "15", "float", 0.1, example="15"),
    "allow_mixed_granularity": Setting(MIXED_GRANULARITY_VARIABLE, "false", "flag"),
    "max_invalid_ratio": Setting("capi_max_invalid_ratio", "0.05", "float", 0, 1, "0.05"),
    "max_event_age_days": Setting("capi_max_event_age_days", "28", "int", 1, example="28"),
    "allow_custom_events": Setting("capi_allow_custom_events", "false", "flag"),
    # Smaller shards spread one partition over more workers (and bound each task's memory).
    "events_per_shard": Setting("capi_events_per_shard", "100000", "int", 1, example="100000"),
    "reference_time": Setting(None, "", "int", example="1764633600"),
    "dry_run": Setting(None, "false", "flag"),
    "remaining_share": Setting(
        "capi_envelope_refresh_remaining_share", repr(DEFAULT_REFRESH_REMAINING_SHARE), "float", 0.01, 0.99, "0.33"
    ),
    "slices": Setting("capi_envelope_refresh_slices", "0", "int", 0, 1024, "0"),
    "max_failure_ratio": Setting("capi_envelope_refresh_max_failure_ratio", "0.1", "float", 0, 1, "0.1"),
}

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off", "none"})


def templated(name: str) -> str:
    """The Jinja template of a setting: its Variable, or its default when the Variable is not set.

    Rendered when a task runs, never at DAG-parse time (no metadata DB access while parsing).
    """
    setting = SETTINGS[name]
    assert setting.variable is not None, f"{name} is not read from a Variable"
    return "{{ var.value.get('" + setting.variable + "', '" + setting.default + "') }}"


def templates(section: Any) -> dict[str, Any]:
    """The templates of a config section's settings read from Variables, as its operator's arguments.

    :param section: a config class of this module, e.g. :class:`ValidateConfig`.
    """
    return {
        name: templated(name)
        for name in (field.name for field in fields(section))
        if name in SETTINGS and SETTINGS[name].variable is not None
    }


def _source(name: str) -> str:
    variable = SETTINGS[name].variable if name in SETTINGS else None
    return f"{name} (Variable {variable})" if variable else name


def number(
    name: str,
    value: Any,
    kind: type[int] | type[float] | None = None,
    *,
    minimum: float | None = None,
    example: str | None = None,
) -> Any:
    """``value`` as the setting's number within its bounds, or a :class:`SettingError` naming it.

    :param name: the setting (a key of :data:`SETTINGS`, or any argument name with ``kind``).
    :param value: the rendered value; None or ``""`` takes the setting's default.
    :param kind: ``int`` or ``float`` for a name outside the table.
    :param minimum: overrides the table's minimum.
    :param example: overrides the table's example.
    """
    setting = SETTINGS.get(name, Setting(None, "", "int" if kind is int else "float"))
    minimum = setting.minimum if minimum is None else minimum
    maximum = setting.maximum
    example = setting.example if example is None else example
    cast: type[int] | type[float] = kind or (int if setting.kind == "int" else float)
    text = setting.default if value is None or str(value).strip() in ("", "None") else str(value).strip()
    try:
        result = cast(text)
        valid = math.isfinite(result) and minimum <= result <= maximum
    except (TypeError, ValueError):
        valid = False
    if not valid:
        what = "a whole number" if cast is int else "a number"
        span = f"between {minimum:g} and {maximum:g}" if math.isfinite(maximum) else f"of at least {minimum:g}"
        fix = "; fix it under Admin > Variables, then clear this task" if setting.variable else ""
        raise SettingError(f"{_source(name)} must be {what} {span}, e.g. {example} (got {str(value)[:20]!r}){fix}")
    return result


def flag(name: str, value: Any) -> bool:
    """``value`` (a rendered param such as ``True``) as a bool, or a :class:`SettingError` naming the setting."""
    default = SETTINGS[name].default if name in SETTINGS else "false"
    text = (default if value is None else str(value)).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise SettingError(f"{_source(name)} must be true or false (got {str(value)[:20]!r})")


class _Section:
    """A config section: parsed from the rendered operator arguments, one field per setting."""

    __slots__ = ()

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> Self:
        """The section from ``raw`` (field name to rendered value); missing values take their defaults.

        :raises SettingError: naming the first malformed setting and its Variable.
        """
        values: dict[str, Any] = {}
        for field in fields(cls):  # type: ignore[arg-type]
            given = raw.get(field.name)
            setting = SETTINGS.get(field.name)
            if setting is None:
                # A tuning argument of the operator, not a Variable: the field's default unless given.
                if given is not None:
                    values[field.name] = int(given)
            elif setting.kind == "flag":
                values[field.name] = flag(field.name, given)
            elif setting.default or given not in (None, "", "None"):
                values[field.name] = number(field.name, given)
        return cls(**values)


@dataclass(frozen=True, slots=True)
class ClaimConfig(_Section):
    """How long ``claim_partition`` waits while another run holds the partition."""

    wait_minutes: float
    poll_seconds: float
    dry_run: bool = False
    allow_mixed_granularity: bool = False

    @property
    def wait_seconds(self) -> float:
        return self.wait_minutes * 60


@dataclass(frozen=True, slots=True)
class ValidateConfig(_Section):
    """What the validate step accepts and how it cuts the partition into shards.

    :param reference_time: Unix seconds the age window is measured from (None: when validation starts).
    """

    max_invalid_ratio: float
    max_event_age_days: int
    allow_custom_events: bool
    events_per_shard: int
    reference_time: int | None = None
    dry_run: bool = False
    max_future_skew_seconds: int = 300
    max_line_bytes: int = 1_048_576


@dataclass(frozen=True, slots=True)
class RecoverConfig(_Section):
    """The attribution window of held conversions (older ones are lost)."""

    max_event_age_days: int
    dry_run: bool = False


@dataclass(frozen=True, slots=True)
class RefreshPlanConfig(_Section):
    """How the envelope refresh selects due rows and splits them into slices.

    :param slices: 0 chooses from the due count (``rows_per_slice``, at most ``max_slices``).
    """

    remaining_share: float
    slices: int
    rows_per_slice: int = 50_000
    max_slices: int = 64


@dataclass(frozen=True, slots=True)
class RefreshReportConfig(_Section):
    """The largest share of failed envelope refreshes a run may end with."""

    max_failure_ratio: float
