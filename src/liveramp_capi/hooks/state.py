"""Airflow hook for the pipeline's state database (the delivery ledger).

The state database is either an SQLite file (the embedded default: the connection's host is
the file path) or PostgreSQL. The hook only maps the Airflow Connection to a SQLAlchemy URL;
everything else lives in :mod:`liveramp_capi.domain`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowFailException
from sqlalchemy.engine import Engine

from liveramp_capi.domain.consent import LifetimeRule
from liveramp_capi.domain.envelopes import EnvelopeStore
from liveramp_capi.domain.held import HeldConversions
from liveramp_capi.domain.ledger import DeliveryLedger
from liveramp_capi.domain.statedb import make_engine

_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


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

        ``extra.sqlalchemy_url`` wins. Type ``sqlite`` maps to ``sqlite:///<host>``; types
        ``postgres``/``postgresql`` map to ``postgresql+psycopg://...``; type ``capi_state`` is
        SQLite when the host looks like a file (absolute path or ``.db`` suffix, no port) and
        PostgreSQL otherwise.
        """
        conn = self.get_connection(self.capi_state_conn_id)
        explicit = conn.extra_dejson.get("sqlalchemy_url")
        if explicit:
            return str(explicit)
        conn_type = (conn.conn_type or "").lower()
        host = conn.host or ""
        if conn_type == "sqlite" or (
            conn_type in ("capi_state", "")
            and not conn.port
            and (host.startswith("/") or host.endswith(_SQLITE_SUFFIXES))
        ):
            if not host:
                raise ValueError(f"connection {self.capi_state_conn_id!r} names no SQLite file path (host)")
            return f"sqlite:///{host}"
        if conn_type in ("postgres", "postgresql", "capi_state", ""):
            if not host:
                raise ValueError(f"connection {self.capi_state_conn_id!r} names no database host")
            credentials = ""
            if conn.login:
                credentials = quote(conn.login, safe="")
                if conn.password:
                    credentials += ":" + quote(conn.password, safe="")
                credentials += "@"
            port = f":{conn.port}" if conn.port else ""
            database = quote(conn.schema or "", safe="")
            return f"postgresql+psycopg://{credentials}{host}{port}/{database}"
        raise ValueError(
            f"connection {self.capi_state_conn_id!r} has type {conn_type!r}; expected capi_state, sqlite or postgres"
        )

    def get_engine(self) -> Engine:
        """Return the state database engine (created once per hook)."""
        if self._engine is None:
            self._engine = make_engine(self.sqlalchemy_url())
        return self._engine

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
