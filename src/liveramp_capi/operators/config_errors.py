"""Configuration the user must fix fails a task at once, without spending its retries."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from airflow.sdk.exceptions import AirflowFailException


@contextmanager
def permanent_config_errors() -> Iterator[None]:
    """Turn an invalid partition name or storage root into :class:`AirflowFailException`.

    Retrying cannot heal either, and the message never holds more than the checks wrote.
    """
    from liveramp_capi.domain.partition import InvalidPartition, InvalidRoot

    try:
        yield
    except (InvalidPartition, InvalidRoot) as err:
        raise AirflowFailException(str(err)) from None
