"""The state database as the operators open it: unreachable is a transient failure, undefined a permanent one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from liveramp_capi.hooks.state import CapiStateHook
from liveramp_capi.operators.config_errors import permanent_config_errors


@contextmanager
def state_database(conn_id: str, nothing_done: str) -> Iterator[CapiStateHook]:
    """The state database's hook, checked reachable; the block opens the stores it needs.

    :param conn_id: the state database connection.
    :param nothing_done: what the task did not do, for the failure message (``sent``: ``state
        database unavailable, nothing sent: ...``).
    :raises AirflowException: when the database is unreachable or unusable (a retry may heal it).
    :raises AirflowFailException: when the connection is undefined or malformed.
    """
    hook = CapiStateHook(capi_state_conn_id=conn_id)
    with permanent_config_errors(conn_id), hook.opened(nothing_done):
        yield hook
