"""A send task killed mid-partition, and a state database that is unreachable or locked.

The kill runs ``airflow dags test`` in its own process group (the way ``capi_devtools.demo`` runs
the DAG), waits until the stand-in has recorded some but not all batches and SIGKILLs the group:
no ``finally``, no flush. The rerun must finish the partition, re-sending only batches the ledger
still holds ``in_flight`` (their outcome is unknown; TikTok deduplicates their event_ids).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from capi_devtools.sample_partition import stage_sample_partition
from tests.support.conversions_run import configure_pipeline, output_json, yesterday
from tests.support.fault_support import free_port, ledger_rows, run_dag_once, task_context, write_partition

pytestmark = pytest.mark.airflow

AIRFLOW = str(Path(sys.executable).parent / "airflow")


def _wait_for(predicate, timeout: float, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the DAG run ended (exit {process.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_send_killed_mid_partition_rerun_resends_only_in_flight_batches(airflow_db, standin, tmp_path, monkeypatch):
    partition = yesterday()
    generated = write_partition(tmp_path / "landing", partition, users=40, seed=21)
    # Two requests in flight, 150 ms each: the send step takes several seconds.
    configure_pipeline(monkeypatch, tmp_path, standin, concurrency=2, max_attempts=3)
    # The killed run never releases its claim and Airflow still shows it running: the rerun waits
    # for the claim to lapse (6 s here, 10 minutes by default), then takes over.
    monkeypatch.setenv("AIRFLOW_VAR_CAPI_PARTITION_LEASE_MINUTES", "0.1")
    monkeypatch.setenv("AIRFLOW_VAR_CAPI_PARTITION_CLAIM_POLL_SECONDS", "0.5")
    standin.config(latency_ms=150)
    log_path = tmp_path / "killed-run.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [AIRFLOW, "dags", "test", "tiktok_conversions", "--conf", json.dumps({"partition": partition})],
            env=os.environ.copy(),  # configure_pipeline put the connections and variables here
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the kill takes the task with it
        )
        try:
            _wait_for(lambda: standin.stats()["batches"] >= 25, 120, "25 batches reached the stand-in", process)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, log_path.read_text()[-3000:]

    before = Counter(standin.received_event_ids())
    rows = ledger_rows(tmp_path / "state.db", partition)
    in_flight = [r for r in rows if r["state"] == "in_flight"]
    acknowledged = [r for r in rows if r["state"] == "acknowledged"]
    assert before and len(set(before)) < len(generated.event_ids), "the kill must land mid-partition"
    assert acknowledged, "acknowledgements older than the ledger's flush interval must have been recorded"

    standin.config(latency_ms=0)
    assert run_dag_once(partition) == "success"

    after = Counter(standin.received_event_ids())
    assert set(after) == set(generated.event_ids), "the rerun must complete the partition"
    summary = output_json(tmp_path, partition, "summary.json")
    total_batches = summary["batches"] + len(acknowledged)
    assert summary["status"] == "complete" and all(summary["checks"].values())
    assert summary["resent_unknown_outcome_batches"] == len(in_flight)
    assert summary["previously_delivered_events"] == sum(r["event_count"] for r in acknowledged)
    # Only events of batches the ledger held in flight may have reached the stand-in twice.
    duplicated = {event_id for event_id, n in after.items() if n > 1}
    in_flight_events = {event_id for r in in_flight for event_id in r["event_ids"]}
    assert duplicated <= in_flight_events
    assert sum(n - 1 for n in after.values()) <= len(in_flight_events)
    # Nothing acknowledged before the kill was sent again.
    assert not duplicated & {event_id for r in acknowledged for event_id in r["event_ids"]}
    assert {r["state"] for r in ledger_rows(tmp_path / "state.db", partition)} == {"acknowledged"}
    print(
        f"\nkill: {len(set(before))} events on the stand-in before the kill, {len(acknowledged)} batches acknowledged "
        f"in the ledger, {len(in_flight)} in flight; rerun re-sent {len(duplicated)} events "
        f"({summary['resent_unknown_outcome_batches']} unknown-outcome batches) of {total_batches} batches"
    )


def _prepare_send(tmp_path: Path, monkeypatch, standin, partition: str) -> None:
    """Run wait/extract/validate's operators directly so the send step has its shards."""
    from liveramp_capi.operators.extract import ExtractPartitionOperator
    from liveramp_capi.operators.validate import ValidateConversionsOperator

    configure_pipeline(monkeypatch, tmp_path, standin)
    stage_sample_partition(tmp_path / "landing", partition)
    roots = {"landing_root": f"file://{tmp_path / 'landing'}", "output_root": f"file://{tmp_path / 'output'}"}
    ExtractPartitionOperator(task_id="extract", partition=partition, **roots).execute(task_context())
    ValidateConversionsOperator(task_id="validate", partition=partition, max_invalid_ratio=0.25, **roots).execute(
        task_context()
    )


def _send(tmp_path: Path, partition: str):
    from liveramp_capi.operators.send import SendConversionsOperator

    output_root = f"file://{tmp_path / 'output'}"
    return SendConversionsOperator(task_id="send", shard=0, partition=partition, output_root=output_root).execute(
        task_context()
    )


def test_unreachable_state_database_stops_send_before_anything_is_sent(standin, tmp_path, monkeypatch):
    from airflow.sdk.exceptions import AirflowException

    partition = yesterday()
    _prepare_send(tmp_path, monkeypatch, standin, partition)
    password = "pg-Secret-0d1e"
    monkeypatch.setenv(
        "AIRFLOW_CONN_CAPI_STATE_DEFAULT",
        json.dumps({"conn_type": "postgres", "host": "127.0.0.1", "port": free_port(), "login": "capi",
                    "password": password, "schema": "capi"}),
    )
    with pytest.raises(AirflowException) as caught:
        _send(tmp_path, partition)
    message = str(caught.value)
    assert "state database unavailable, nothing sent" in message and "127.0.0.1" in message
    assert password not in message and standin.config_id not in message
    assert standin.stats()["requests"] == 0


def test_locked_state_database_stops_send_before_anything_is_sent(standin, tmp_path, monkeypatch):
    from airflow.sdk.exceptions import AirflowException

    import liveramp_capi.state.database as statedb

    partition = yesterday()
    _prepare_send(tmp_path, monkeypatch, standin, partition)
    # The ledger waits this long for a lock before giving up (30 s in production).
    monkeypatch.setattr(statedb, "SQLITE_BUSY_TIMEOUT_MS", 500)
    # Another process (a backup, a stuck migration) holds the write lock of the state database.
    holder = sqlite3.connect(tmp_path / "state.db", timeout=5, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(AirflowException) as caught:
            _send(tmp_path, partition)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    message = str(caught.value)
    assert "state database unavailable, nothing sent" in message and "locked" in message
    assert standin.stats()["requests"] == 0
