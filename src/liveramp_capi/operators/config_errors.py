"""Configuration the user must fix fails a task at once, without spending its retries."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException


@contextmanager
def permanent_config_errors(*settings_of: str) -> Iterator[None]:
    """Turn configuration errors no retry can heal into :class:`AirflowFailException`.

    Always: an invalid partition name or storage root, and a connection that is not defined.
    With ``settings_of`` (connection ids whose settings the block parses), also a ``ValueError``
    raised while parsing them, prefixed with the connection it came from. The messages never hold
    more than the checks wrote (no secret, no URL with a configuration ID).

    :param settings_of: connection ids whose malformed fields the block may report as ``ValueError``.
    """
    from liveramp_capi.domain.partition import InvalidPartition, InvalidRoot

    try:
        yield
    except (InvalidPartition, InvalidRoot) as err:
        raise AirflowFailException(str(err)) from None
    except AirflowNotFoundException as err:
        raise AirflowFailException(
            f"{err}: create it in Admin > Connections (or as an AIRFLOW_CONN_... variable or in a secrets "
            "backend), then clear this task; see the README's Configuration section"
        ) from None
    except ValueError as err:
        if not settings_of:
            raise
        raise AirflowFailException(
            f"connection {' / '.join(settings_of)} is not usable: {err}. Fix it in Admin > Connections, "
            "then clear this task"
        ) from None


def setting_number(value: Any, kind: type, name: str, variable: str | None, example: str, *, minimum: float = 0) -> Any:
    """``value`` as an int or float of at least ``minimum``, or a failure naming the setting and its Variable.

    :param value: the rendered setting.
    :param kind: ``int`` or ``float``.
    :param name: the operator argument it came from.
    :param variable: the Airflow Variable behind it, if any.
    :param example: a valid value for the message.
    :param minimum: the smallest acceptable value.
    """
    try:
        number = kind(str(value).strip())
        valid = number >= minimum
    except (TypeError, ValueError):
        valid = False
    if not valid:
        source = f"{name} (Variable {variable})" if variable else name
        raise AirflowFailException(
            f"{source} must be {'a whole number' if kind is int else 'a number'} of at least {minimum:g}, "
            f"e.g. {example} (got {str(value)[:20]!r}); fix it under Admin > Variables, then clear this task"
        )
    return number


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off", "none"})


def setting_flag(value: Any, name: str) -> bool:
    """``value`` (a rendered param such as ``True``) as a bool, or a failure naming the setting.

    :param value: the rendered setting.
    :param name: the param or argument it came from.
    """
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise AirflowFailException(f"{name} must be true or false (got {str(value)[:20]!r})")
