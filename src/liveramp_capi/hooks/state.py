"""Airflow hook for the pipeline's state database (ledger, envelope store, held conversions).

The state database is either an SQLite file (the embedded default: the connection's host is
the file path) or PostgreSQL. The hook only reads the Airflow Connection and turns database
failures into task failures; everything else lives in :mod:`liveramp_capi.state`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from sqlalchemy.engine import Engine

from liveramp_capi.domain.consent import LifetimeRule
from liveramp_capi.state.database import StateDatabaseUnavailable, connection_url, make_engine, opened
from liveramp_capi.state.envelope_store import EnvelopeStore
from liveramp_capi.state.held_store import HeldConversions
from liveramp_capi.state.ledger import DeliveryLedger


class CapiStateHook(BaseHook):
    """Connect to the CAPI pipeline's state database.

    Connection fields: ``host`` is an SQLite file path or a PostgreSQL host, ``schema`` the
    PostgreSQL database, ``login``/``password``/``port`` as usual. An ``sqlalchemy_url`` in the
    extra overrides everything. ``envelope_lifetime_rule`` in the extra chooses how envelope
    lifetimes are decided (``conservative``, the default, or ``no_california_traffic``; see
    :mod:`liveramp_capi.domain.consent`): it lives with the state database because every task
    that reads or writes the envelope store must apply the same rule.

    :param capi_state_conn_id: the Airflow connection id.
    """

    conn_name_attr = "capi_state_conn_id"
    default_conn_name = "capi_state_default"
    conn_type = "capi_state"
    hook_name = "CAPI pipeline state database"

    def __init__(self, capi_state_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.capi_state_conn_id = capi_state_conn_id
        self._engine: Engine | None = None

    def sqlalchemy_url(self) -> str:
        """Return the SQLAlchemy URL the connection describes.

        ``extra.sqlalchemy_url`` wins; otherwise the fields map as
        :func:`~liveramp_capi.state.database.connection_url` says (SQLite file or PostgreSQL).
        """
        conn = self.get_connection(self.capi_state_conn_id)
        explicit = conn.extra_dejson.get("sqlalchemy_url")
        if explicit:
            return str(explicit)
        return connection_url(self.capi_state_conn_id, conn.conn_type, conn.host, port=conn.port,
                              login=conn.login, password=conn.password, database=conn.schema)

    def get_engine(self) -> Engine:
        """Return the state database engine (created once per hook)."""
        if self._engine is None:
            self._engine = make_engine(self.sqlalchemy_url())
        return self._engine

    @contextmanager
    def opened(self, nothing_done: str) -> Iterator[None]:
        """Check that the state database answers, then fail the block's database errors alike.

        Wrap the opening of the components a task needs (``get_ledger()``...): an unreachable or
        unusable database fails the task retryably with ``state database unavailable, nothing
        <nothing_done>: ...`` (host and database named, never the password).

        :param nothing_done: what the task did not do, e.g. ``"sent"``.
        """
        try:
            with opened(self.get_engine()):
                yield
        except StateDatabaseUnavailable as err:
            raise AirflowException(f"state database unavailable, nothing {nothing_done}: {err}") from None

    def get_ledger(self) -> DeliveryLedger:
        """Return the delivery ledger, its schema created if missing."""
        ledger = DeliveryLedger(self.get_engine())
        ledger.ensure_schema()
        return ledger

    def lifetime_rule(self) -> LifetimeRule:
        """The connection's ``envelope_lifetime_rule`` (default ``conservative``).

        :raises AirflowFailException: for an unknown rule name (the message lists the accepted
            ones): retrying cannot heal a configuration error.
        """
        conn = self.get_connection(self.capi_state_conn_id)
        try:
            return LifetimeRule.parse(conn.extra_dejson.get("envelope_lifetime_rule"))
        except ValueError as err:
            raise AirflowFailException(f"connection {self.capi_state_conn_id!r}: {err}") from None

    def get_envelope_store(self) -> EnvelopeStore:
        """Return the envelope store, its schema created if missing and its lifetime rule applied."""
        store = EnvelopeStore(self.get_engine(), self.lifetime_rule())
        store.ensure_schema()
        return store

    def get_held_conversions(self) -> HeldConversions:
        """Return the held conversions table, its schema created if missing."""
        held = HeldConversions(self.get_engine())
        held.ensure_schema()
        return held

    def get_conn(self) -> Engine:
        """Return the engine (Airflow's generic accessor)."""
        return self.get_engine()
