from __future__ import annotations

import socket
import uuid
from collections.abc import Callable, Iterator

import pytest

from capi_devtools.s3_fixture import S3Server, running_s3
from capi_devtools.standin_fixture import StandInProcess, running_standin


@pytest.fixture
def standin() -> Iterator[StandInProcess]:
    """A fresh local LiveRamp stand-in subprocess (see capi_devtools.standin_fixture)."""
    with running_standin() as handle:
        yield handle


@pytest.fixture
def s3() -> Iterator[S3Server]:
    """A fresh S3-compatible server (moto) on loopback with authentication (see capi_devtools.s3_fixture)."""
    with running_s3() as server:
        yield server


PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_ADMIN_URL = f"postgresql+psycopg://postgres@{PG_HOST}:{PG_PORT}/postgres"


def _pg_reachable() -> bool:
    try:
        with socket.create_connection((PG_HOST, PG_PORT), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def pg_database_factory() -> Iterator[Callable[[], str]]:
    """Create throw-away PostgreSQL databases; all are dropped at the end of the session."""
    import sqlalchemy as sa

    if not _pg_reachable():
        pytest.skip(f"PostgreSQL is unreachable on {PG_HOST}:{PG_PORT}")
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    created: list[str] = []

    def create() -> str:
        name = f"capi_test_{uuid.uuid4().hex[:12]}"
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        created.append(name)
        return f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{name}"

    yield create
    with admin.connect() as connection:
        for name in created:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()
