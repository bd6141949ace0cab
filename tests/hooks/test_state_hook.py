"""CapiStateHook against connections defined in ``AIRFLOW_CONN_*`` environment variables.

Outside a task (no supervisor comms, no ``_AIRFLOW_PROCESS_CONTEXT``), Airflow 3.3's task SDK
resolves connections through its fallback secrets chain, which starts with the environment
variables backend: ``BaseHook.get_connection`` then works without a task context or a
metadata database, and reads the variable anew on every call.
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from liveramp_capi.domain.ledger import DeliveryLedger
from liveramp_capi.domain.statedb import check_reachable
from liveramp_capi.hooks.state import CapiStateHook

ENV = "AIRFLOW_CONN_CAPI_STATE_DEFAULT"
PG = {"conn_type": "postgres", "host": "127.0.0.1", "port": 5432, "login": "postgres", "schema": "test"}


def set_conn(monkeypatch: pytest.MonkeyPatch, **fields: object) -> None:
    monkeypatch.setenv(ENV, json.dumps(fields))


def pg_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


needs_pg = pytest.mark.skipif(not pg_reachable(), reason="PostgreSQL is unreachable on 127.0.0.1:5432")


@pytest.fixture
def scratch_pg_database() -> Iterator[str]:
    """A throw-away PostgreSQL database, so the hook's schema creation touches nothing shared."""
    admin = sa.create_engine(
        "postgresql+psycopg://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT"
    )
    name = f"capi_hooktest_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def test_hook_metadata() -> None:
    assert CapiStateHook.conn_name_attr == "capi_state_conn_id"
    assert CapiStateHook.default_conn_name == "capi_state_default"
    assert CapiStateHook.conn_type == "capi_state"
    assert CapiStateHook.hook_name == "CAPI pipeline state database"


def test_sqlite_connection(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    set_conn(monkeypatch, conn_type="sqlite", host=str(path))
    hook = CapiStateHook()
    assert hook.sqlalchemy_url() == f"sqlite:///{path}"
    engine = hook.get_engine()
    assert hook.get_engine() is engine  # cached
    assert hook.get_conn() is engine
    ledger = hook.get_ledger()
    assert isinstance(ledger, DeliveryLedger)
    assert "capi_delivery_ledger" in sa.inspect(engine).get_table_names()
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()


@pytest.mark.parametrize(
    "host", ["/var/lib/capi/state.db", "/var/lib/capi/state", "relative/state.db", "state.sqlite3"]
)
def test_capi_state_type_with_a_file_is_sqlite(monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    set_conn(monkeypatch, conn_type="capi_state", host=host)
    assert CapiStateHook().sqlalchemy_url() == f"sqlite:///{host}"


def test_capi_state_type_with_a_port_is_postgres(monkeypatch: pytest.MonkeyPatch) -> None:
    set_conn(
        monkeypatch,
        conn_type="capi_state",
        host="db.internal",
        port=5433,
        login="capi",
        password="pw",
        schema="ledger",
    )
    assert CapiStateHook().sqlalchemy_url() == "postgresql+psycopg://capi:pw@db.internal:5433/ledger"


def test_capi_state_type_with_a_hostname_is_postgres(monkeypatch: pytest.MonkeyPatch) -> None:
    set_conn(monkeypatch, conn_type="capi_state", host="db.internal", schema="ledger")
    assert CapiStateHook().sqlalchemy_url() == "postgresql+psycopg://db.internal/ledger"


def test_postgres_url_quotes_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    set_conn(
        monkeypatch,
        conn_type="postgresql",
        host="h",
        port=5432,
        login="us@er",
        password="p:w/@%?#",
        schema="db",
    )
    url = CapiStateHook().sqlalchemy_url()
    parsed = sa.engine.make_url(url)
    assert (parsed.username, parsed.password, parsed.host, parsed.port, parsed.database) == (
        "us@er",
        "p:w/@%?#",
        "h",
        5432,
        "db",
    )


def test_extra_sqlalchemy_url_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    explicit = f"sqlite:///{tmp_path}/explicit.db"
    set_conn(monkeypatch, conn_type="postgres", host="ignored", port=1, extra={"sqlalchemy_url": explicit})
    assert CapiStateHook().sqlalchemy_url() == explicit


def test_custom_conn_id(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_OTHER_STATE", json.dumps({"conn_type": "sqlite", "host": f"{tmp_path}/o.db"})
    )
    assert CapiStateHook(capi_state_conn_id="other_state").sqlalchemy_url() == f"sqlite:///{tmp_path}/o.db"


@pytest.mark.parametrize(
    "fields",
    [
        {"conn_type": "http", "host": "example.com"},
        {"conn_type": "sqlite"},
        {"conn_type": "postgres", "port": 5432},
    ],
)
def test_unusable_connections(monkeypatch: pytest.MonkeyPatch, fields: dict) -> None:
    set_conn(monkeypatch, **fields)
    with pytest.raises(ValueError):
        CapiStateHook().sqlalchemy_url()


def test_missing_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(Exception, match="capi_state_default"):
        CapiStateHook().sqlalchemy_url()


@needs_pg
@pytest.mark.postgres
def test_postgres_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    set_conn(monkeypatch, **PG)
    hook = CapiStateHook()
    assert hook.sqlalchemy_url() == "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    engine = hook.get_engine()
    assert engine.dialect.driver == "psycopg"
    check_reachable(engine)
    engine.dispose()


@needs_pg
@pytest.mark.postgres
def test_postgres_ledger(monkeypatch: pytest.MonkeyPatch, scratch_pg_database: str) -> None:
    set_conn(monkeypatch, **{**PG, "schema": scratch_pg_database})
    hook = CapiStateHook()
    ledger = hook.get_ledger()
    assert ledger.dialect == "postgresql"
    assert ledger.partition_counts("2026-11-20")["acknowledged"] == {"batches": 0, "events": 0}
    hook.get_engine().dispose()


def test_envelope_lifetime_rule_comes_from_the_connection_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from liveramp_capi.domain.consent import LifetimeRule

    path = tmp_path / "state.db"
    set_conn(monkeypatch, conn_type="sqlite", host=str(path))
    store = CapiStateHook().get_envelope_store()
    assert store.lifetime_rule is LifetimeRule.CONSERVATIVE and store.applied_lifetime_rule() == "conservative"
    set_conn(monkeypatch, conn_type="sqlite", host=str(path), extra={"envelope_lifetime_rule": "no_california_traffic"})
    store = CapiStateHook().get_envelope_store()
    assert store.lifetime_rule is LifetimeRule.NO_CALIFORNIA_TRAFFIC
    assert store.applied_lifetime_rule() == "no_california_traffic"
    set_conn(monkeypatch, conn_type="sqlite", host=str(path), extra={"envelope_lifetime_rule": "forever"})
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match="envelope_lifetime_rule must be one of"):
        CapiStateHook().get_envelope_store()
    assert CapiStateHook().get_held_conversions().counts()["held"] == 0
