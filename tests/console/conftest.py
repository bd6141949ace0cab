"""A small real world for the delivery console: two partitions run by real ``dag.test()`` runs
against the stand-in (one delivered in full, one with a batch the stand-in refuses), a real
SQLite state database (ledger + envelope store) and the output files on local storage."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from capi_devtools.console_demo import STANDIN_ARGS, stage_refused_partition
from capi_devtools.sample_partition import stage_sample_partition
from capi_devtools.standin_fixture import running_standin
from tests.support.conversions_run import configure_pipeline, run_conversions


@dataclass(frozen=True)
class ConsoleWorld:
    root: Path
    delivered: str  # partition delivered in full
    refused: str  # partition with one refused batch
    env: dict[str, str]

    def summary(self, partition: str) -> dict:
        return json.loads((self.root / "output" / f"dt={partition}" / "summary.json").read_text())

    @property
    def state_db(self) -> Path:
        return self.root / "state.db"


@pytest.fixture(scope="package")
def console_world(airflow_db, tmp_path_factory) -> Iterator[ConsoleWorld]:
    root = tmp_path_factory.mktemp("console")
    today = dt.datetime.now(dt.UTC).date()
    delivered = (today - dt.timedelta(days=1)).isoformat()
    refused = (today - dt.timedelta(days=2)).isoformat()
    stage_sample_partition(root / "landing", delivered)
    stage_refused_partition(root / "landing", refused)
    with running_standin(*STANDIN_ARGS) as standin, pytest.MonkeyPatch.context() as patch:
        configure_pipeline(patch, root, standin)
        assert run_conversions(delivered) == "success"
        assert run_conversions(refused) == "failed"
        # A dry run after the failure: it sends nothing, so the partition stays failed.
        assert run_conversions(refused, dry_run=True) == "success"
        import os

        env = {k: v for k, v in os.environ.items() if k.startswith(("AIRFLOW_CONN_", "AIRFLOW_VAR_"))}
        yield ConsoleWorld(root=root, delivered=delivered, refused=refused, env=env)


@pytest.fixture(scope="package")
def api_client(console_world):
    """Airflow's own api-server app (the console plugin mounted by Airflow), in process."""
    from airflow.api_fastapi.app import create_app
    from fastapi.testclient import TestClient

    with TestClient(create_app(apps="core")) as client:
        yield client

