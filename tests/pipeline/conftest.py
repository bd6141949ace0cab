"""Fixtures for the pipeline steps: real files under tmp_path, a real SQLite state database, no Airflow DB."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from liveramp_capi.state.database import make_engine
from liveramp_capi.state.envelope_store import EnvelopeStore
from liveramp_capi.state.lease import PartitionLease
from liveramp_capi.storage import PartitionStorage
from tests.pipeline.pipeline_support import PARTITION


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, str]:
    return {"landing_root": f"file://{tmp_path / 'landing'}", "output_root": f"file://{tmp_path / 'output'}"}


@pytest.fixture
def storage(roots: dict[str, str]) -> PartitionStorage:
    return PartitionStorage(roots["landing_root"], roots["output_root"], PARTITION, "manual__run-1")


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'state.db'}")
    yield engine
    engine.dispose()


@pytest.fixture
def envelope_store(engine: Engine) -> EnvelopeStore:
    store = EnvelopeStore(engine)
    store.ensure_schema()
    return store


@pytest.fixture
def lease(engine: Engine) -> PartitionLease:
    lease = PartitionLease(engine, ttl_seconds=600)
    lease.ensure_schema()
    return lease
