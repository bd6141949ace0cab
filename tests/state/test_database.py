"""The state database's engines: URLs, SQLite pragmas and transactions, PostgreSQL options, reachability."""

from __future__ import annotations

from pathlib import Path

import pytest

from liveramp_capi.state.database import StateDatabaseUnavailable, check_reachable, make_engine, normalise_url


def test_normalise_url() -> None:
    assert normalise_url("postgresql://u:p@h/db").drivername == "postgresql+psycopg"
    assert normalise_url("postgres://u:p@h/db").drivername == "postgresql+psycopg"
    assert normalise_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"
    assert normalise_url("sqlite:////tmp/x.db").drivername == "sqlite"


def test_sqlite_engine_pragmas(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/state.db")
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    check_reachable(engine)
    engine.dispose()


def test_sqlite_transactions_roll_back(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/state.db")
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    with pytest.raises(RuntimeError), engine.begin() as connection:
        connection.exec_driver_sql("INSERT INTO t VALUES (1)")
        raise RuntimeError
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT count(*) FROM t").scalar() == 0
    engine.dispose()


def test_postgres_engine_options() -> None:
    engine = make_engine("postgresql://postgres@127.0.0.1:5432/test")
    assert engine.dialect.driver == "psycopg"
    assert engine.pool._pre_ping  # type: ignore[attr-defined]
    engine.dispose()


def test_unreachable_database_message_has_no_password() -> None:
    engine = make_engine(
        "postgresql://capi_user:s3cr3t-Pa55@127.0.0.1:1/ledgerdb", connect_args={"connect_timeout": 2}
    )
    with pytest.raises(StateDatabaseUnavailable) as caught:
        check_reachable(engine)
    message = str(caught.value)
    assert "s3cr3t-Pa55" not in message and "s3cr3t-Pa55" not in repr(caught.value.__cause__)
    assert "ledgerdb" in message and "127.0.0.1:1" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    engine.dispose()


def test_unreachable_sqlite_path(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/missing-dir/state.db")
    with pytest.raises(StateDatabaseUnavailable, match="missing-dir"):
        check_reachable(engine)
    engine.dispose()
