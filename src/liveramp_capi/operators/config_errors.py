"""Configuration the user must fix fails a task at once, without spending its retries."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowNotFoundException

from liveramp_capi.pipeline import config
from liveramp_capi.pipeline.errors import PermanentStepFailure, StepFailed


@contextmanager
def permanent_config_errors(*settings_of: str) -> Iterator[None]:
    """Turn configuration errors no retry can heal into :class:`AirflowFailException`.

    Always: a malformed setting (:class:`~liveramp_capi.pipeline.config.SettingError`), an invalid
    partition name or storage root, and a connection that is not defined. With ``settings_of``
    (connection ids whose settings the block parses), also a ``ValueError`` raised while parsing
    them, prefixed with the connection it came from. The messages never hold more than the checks
    wrote (no secret, no URL with a configuration ID).

    :param settings_of: connection ids whose malformed fields the block may report as ``ValueError``.
    """
    from liveramp_capi.domain.partition import InvalidPartition, InvalidRoot

    try:
        yield
    except (config.SettingError, InvalidPartition, InvalidRoot) as err:
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


@contextmanager
def step_failures() -> Iterator[None]:
    """A pipeline step's failure as Airflow's: permanent ones spend no retry."""
    try:
        yield
    except PermanentStepFailure as err:
        raise AirflowFailException(str(err)) from None
    except StepFailed as err:
        raise AirflowException(str(err)) from None


def setting_flag(value: Any, name: str) -> bool:
    """``value`` (a rendered param such as ``True``) as a bool, or a failure naming the setting.

    Kept for adapters that parse a lone flag outside a config section.

    :param value: the rendered setting.
    :param name: the param or argument it came from.
    """
    with permanent_config_errors():
        return config.flag(name, value)
