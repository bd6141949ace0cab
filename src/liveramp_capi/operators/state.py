"""The state database as the operators open it: unreachable is a transient failure, undefined a permanent one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from airflow.sdk.exceptions import AirflowException

from liveramp_capi.hooks.state import CapiStateHook
from liveramp_capi.operators.config_errors import permanent_config_errors


@contextmanager
def state_database(conn_id: str, nothing_done: str) -> Iterator[CapiStateHook]:
    """The state database's hook, checked reachable; the block opens the stores it needs.

    :param conn_id: the state database connection.
    :param nothing_done: what the failure message says was not done, e.g. ``nothing sent``.
    :raises AirflowException: when the database is unreachable (a retry may heal it).
    """
    from liveramp_capi.domain.statedb import StateDatabaseUnavailable, check_reachable

    hook = CapiStateHook(capi_state_conn_id=conn_id)
    try:
        with permanent_config_errors(conn_id):
            check_reachable(hook.get_engine())
        yield hook
    except StateDatabaseUnavailable as err:
        raise AirflowException(f"state database unavailable, {nothing_done}: {err}") from None
