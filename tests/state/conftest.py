"""Fixtures for the state database tests: an empty state database on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from liveramp_capi.state.database import make_engine

#: SQLite always; PostgreSQL when it runs on 127.0.0.1:5432 (skipped otherwise).
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(scope="module")
def pg_url(pg_database_factory: Callable[[], str]) -> str:
    """One throw-away PostgreSQL database for a test module (dropped at the end of the session)."""
    return pg_database_factory()


@pytest.fixture(params=BACKENDS)
def state_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An empty state database: an SQLite file, or the module's PostgreSQL database emptied."""
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'state.db'}")
    else:
        engine = make_engine(request.getfixturevalue("pg_url"))
        with engine.begin() as connection:
            names = connection.execute(
                sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename LIKE 'capi_%'")
            ).scalars().all()
            for name in names:
                connection.exec_driver_sql(f'DROP TABLE IF EXISTS "{name}" CASCADE')
    yield engine
    engine.dispose()
