"""Helpers for end-to-end runs of ``tiktok_conversions``: environment, staging, and what was sent."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from capi_devtools.sample_partition import SAMPLE_DIR

#: Records of the sample partition that validation must reject, by event_id (the truncated
#: JSON line has none), and the one duplicate.
SAMPLE_REJECTED_IDS = {"bad-ms", "bad-type", "bad-envelope", "bad-currency", "bad-no-app", "crm-bad-time"}
SAMPLE_REJECTED_COUNT = len(SAMPLE_REJECTED_IDS) + 1  # + the truncated JSON line
SAMPLE_DUPLICATES = 1


def yesterday() -> str:
    return (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)).isoformat()


def sample_valid_event_ids() -> set[str]:
    """Event ids of the sample that must reach LiveRamp, read straight from the sample files."""
    import csv

    ids: set[str] = set()
    for path in SAMPLE_DIR.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                ids.add(json.loads(line)["event_id"])
            except ValueError:
                continue
    for path in SAMPLE_DIR.glob("*.csv"):
        with path.open(newline="") as stream:
            ids.update(row["event_id"] for row in csv.DictReader(stream))
    return ids - SAMPLE_REJECTED_IDS


def configure_pipeline(monkeypatch: pytest.MonkeyPatch, root: Path, standin: Any, **extra: Any) -> None:
    """Point the DAG at a stand-in, a SQLite state DB and local landing/output roots under ``root``."""
    capi_extra = {"concurrency": 16, "timeout_seconds": 3, "max_attempts": 3, "backoff_base_seconds": 0.05,
                  "backoff_max_seconds": 0.2, **extra}
    monkeypatch.setenv(
        "AIRFLOW_CONN_LIVERAMP_CAPI_DEFAULT",
        json.dumps({"conn_type": "liveramp_capi", "host": standin.url, "password": standin.config_id, "extra": capi_extra}),
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_CAPI_STATE_DEFAULT", json.dumps({"conn_type": "sqlite", "host": str(root / "state.db")})
    )
    monkeypatch.setenv("AIRFLOW_VAR_CAPI_LANDING_ROOT", f"file://{root / 'landing'}")
    monkeypatch.setenv("AIRFLOW_VAR_CAPI_OUTPUT_ROOT", f"file://{root / 'output'}")
    monkeypatch.setenv("AIRFLOW_VAR_CAPI_MAX_INVALID_RATIO", "0.25")


def run_conversions(partition: str, *, dry_run: bool = False) -> str:
    """Run ``tiktok_conversions`` for one partition with ``dag.test()``; return the run's state."""
    from airflow.dag_processing.dagbag import DagBag

    from capi_devtools import REPO

    bag = DagBag(dag_folder=str(REPO / "dags" / "tiktok_conversions.py"))
    assert not bag.import_errors, bag.import_errors
    dag_run = bag.get_dag("tiktok_conversions").test(run_conf={"partition": partition, "dry_run": dry_run})
    return str(dag_run.state)


def received_events(batches: Iterable[dict]) -> list[dict]:
    return [event for batch in batches for event in batch["events"]]


def output_json(root: Path, partition: str, name: str) -> Any:
    return json.loads((root / "output" / f"dt={partition}" / name).read_text())


def output_jsonl(root: Path, partition: str, name: str) -> list[dict]:
    path = root / "output" / f"dt={partition}" / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
