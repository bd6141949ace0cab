"""Run integrity end to end: one run per partition at a time, and a run's colour and counts tell the truth.

Real Airflow runs (``dag.test()`` on a migrated metadata DB, also ``airflow dags test`` in two
processes at once), the stand-in over real HTTP, a real SQLite or PostgreSQL state database.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from capi_devtools.sample_partition import stage_sample_partition
from tests.support.conversions_run import configure_pipeline, output_json, sample_valid_event_ids, yesterday

pytestmark = pytest.mark.airflow

AIRFLOW = str(Path(sys.executable).parent / "airflow")


def _run(partition: str, *, retries: int = 2, **task_changes: Any) -> tuple[str, dict[str, tuple[str, int]]]:
    """Run ``tiktok_conversions`` with ``dag.test()`` keeping the DAG's retries (1 s apart).

    Returns the run's state and ``{task[map]: (state, try_number)}``, so a test can tell whether a
    failure spent retries.
    """
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    from capi_devtools import REPO

    dag = DagBag(dag_folder=str(REPO / "dags" / "tiktok_conversions.py")).get_dag("tiktok_conversions")
    for task in dag.tasks:
        task.retries = retries
        task.retry_delay = dt.timedelta(seconds=1)
        task.retry_exponential_backoff = 0
        for name, value in task_changes.get(task.task_id, {}).items():
            setattr(task, name, value)
    dag_run = dag.test(run_conf={"partition": partition})
    with create_session() as session:
        tis = session.query(TaskInstance).filter_by(dag_id=dag.dag_id, run_id=dag_run.run_id).all()
        tries = {
            (ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"): (str(ti.state), ti.try_number)
            for ti in tis
        }
    return str(dag_run.state), tries


def _run_summary(root: Path, partition: str) -> dict:
    """The summary this run wrote in its own work folder (there is one run per test here)."""
    found = sorted((root / "output" / f"dt={partition}" / "_work").glob("*/summary.json"))
    assert len(found) == 1, found
    return json.loads(found[0].read_text())


# -- two runs of one partition at once ---------------------------------------------------------


def _airflow_home_copy(airflow_db: Path, target: Path) -> dict[str, str]:
    """An environment whose Airflow home is a copy of the session's migrated one (one metadata DB per run)."""
    target.mkdir(parents=True)
    shutil.copy(airflow_db / "airflow.db", target / "airflow.db")
    env = os.environ.copy()
    env.update(
        {
            "AIRFLOW_HOME": str(target),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{target / 'airflow.db'}",
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(target / "logs"),
        }
    )
    return env


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_two_runs_of_one_partition_started_together_deliver_every_event_once(
    backend, airflow_db, standin, tmp_path, monkeypatch, request
):
    """Two ``airflow dags test`` processes (two schedulers' worth of runs) on one state database.

    Each process has its own metadata DB, like two deployments sharing a state database, so
    neither can ask Airflow about the other's run: only the claim in the state database keeps
    them apart. The second run waits for the first, then finds everything acknowledged.
    """
    from tests.support.fault_support import write_partition

    partition = yesterday()
    generated = write_partition(tmp_path / "landing", partition, users=60, seed=31)
    configure_pipeline(monkeypatch, tmp_path, standin, concurrency=2)
    if backend == "postgresql":
        url = request.getfixturevalue("pg_database_factory")()
        monkeypatch.setenv("AIRFLOW_CONN_CAPI_STATE_DEFAULT", url)
    monkeypatch.setenv("AIRFLOW_VAR_CAPI_PARTITION_CLAIM_POLL_SECONDS", "0.5")
    standin.config(latency_ms=100)  # a send step of several seconds: the runs overlap

    processes = []
    for name in ("a", "b"):
        env = _airflow_home_copy(airflow_db, tmp_path / f"airflow-{name}")
        log = (tmp_path / f"run-{name}.log").open("wb")
        processes.append(
            subprocess.Popen(
                [AIRFLOW, "dags", "test", "tiktok_conversions", "--conf", json.dumps({"partition": partition})],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    for process in processes:
        process.wait(timeout=600)
    logs = [(tmp_path / f"run-{name}.log").read_text(errors="replace") for name in ("a", "b")]
    for process, log in zip(processes, logs, strict=True):
        assert process.returncode == 0, log[-3000:]
        assert "state=success" in log, log[-3000:]

    received = Counter(standin.received_event_ids())
    assert set(received) == set(generated.event_ids)
    assert max(received.values()) == 1, "an event was delivered twice"
    # One run waited for the other's claim, then delivered nothing more.
    assert sum("Waiting: partition" in log for log in logs) == 1
    summary = output_json(tmp_path, partition, "summary.json")
    assert summary["status"] == "complete" and all(summary["checks"].values())
    assert summary["valid"] == len(generated.event_ids)
    run_summaries = [json.loads(p.read_text()) for p in (tmp_path / "output" / f"dt={partition}" / "_work").glob("*/summary.json")]
    assert sorted(s["delivered_this_run"] for s in run_summaries) == [0, len(generated.event_ids)]
    assert all(s["status"] == "complete" for s in run_summaries)
    # The published files are whole: every line parses.
    for name in ("rejected.jsonl", "failed.jsonl", "envelope_expired.jsonl"):
        path = tmp_path / "output" / f"dt={partition}" / name
        for line in path.read_text().splitlines():
            json.loads(line)


def test_a_run_takes_over_the_claim_of_a_run_that_ended(airflow_db, standin, tmp_path, monkeypatch):
    """A claim left behind by a finished run (its report never released it) does not block the next."""
    from liveramp_capi.state.database import make_engine
    from liveramp_capi.state.lease import PartitionLease

    partition = yesterday()
    configure_pipeline(monkeypatch, tmp_path, standin)
    stage_sample_partition(tmp_path / "landing", partition)
    state, _ = _run(partition, retries=0)
    assert state == "success"
    lease = PartitionLease(make_engine(f"sqlite:///{tmp_path / 'state.db'}"), ttl_seconds=3600)
    first_owner = lease.read(partition).owner
    # As if the report had been killed before releasing: the claim is fresh and not released.
    lease.acquire(partition, first_owner, "report try 1")

    state, _ = _run(partition, retries=0)

    assert state == "success"
    assert lease.read(partition).owner != first_owner
    assert Counter(standin.received_event_ids()) == Counter(sample_valid_event_ids())


# -- a run is green only if it delivered its partition ------------------------------------------


def test_a_run_whose_partition_did_not_arrive_ends_failed_and_keeps_the_delivered_summary(
    airflow_db, standin, tmp_path, monkeypatch
):
    partition = yesterday()
    configure_pipeline(monkeypatch, tmp_path, standin)
    folder = stage_sample_partition(tmp_path / "landing", partition)
    assert _run(partition, retries=0)[0] == "success"
    delivered_summary = output_json(tmp_path, partition, "summary.json")
    standin.reset()

    (folder / "_SUCCESS").unlink()
    monkeypatch.setenv("AIRFLOW_VAR_CAPI_PARTITION_WAIT_MINUTES", "0.03")
    monkeypatch.setenv("AIRFLOW_VAR_CAPI_PARTITION_POLL_SECONDS", "0.5")
    state, tries = _run(partition, retries=0)

    assert state == "failed"
    assert tries["wait_for_partition"][0] == "failed"
    assert tries["report"][0] == "failed"
    assert standin.received() == []
    # The partition's summary is still the run that delivered it, not a copy under a new run id.
    assert output_json(tmp_path, partition, "summary.json") == delivered_summary
    this_run = [
        json.loads(p.read_text())
        for p in (tmp_path / "output" / f"dt={partition}" / "_work").glob("*/summary.json")
        if json.loads(p.read_text())["run_id"] != delivered_summary["run_id"]
    ]
    assert len(this_run) == 1
    assert this_run[0]["status"] == "not_processed"
    assert this_run[0]["delivered_this_run"] == 0
    assert this_run[0]["unfinished_tasks"]["wait_for_partition"] == "failed"


def test_a_malformed_variable_fails_validate_at_once_and_the_run_is_red(airflow_db, standin, tmp_path, monkeypatch):
    partition = yesterday()
    configure_pipeline(monkeypatch, tmp_path, standin)
    stage_sample_partition(tmp_path / "landing", partition)
    monkeypatch.setenv("AIRFLOW_VAR_CAPI_MAX_INVALID_RATIO", "5%")

    state, tries = _run(partition, retries=2)

    assert state == "failed"
    assert tries["validate"] == ("failed", 1), "a setting no retry can fix must not spend retries"
    assert tries["report"][0] == "failed"
    assert standin.received() == []
    assert not (tmp_path / "output" / f"dt={partition}" / "summary.json").exists()
    assert _run_summary(tmp_path, partition)["status"] == "not_processed"


def test_a_missing_connection_fails_send_at_once(airflow_db, standin, tmp_path, monkeypatch):
    partition = yesterday()
    configure_pipeline(monkeypatch, tmp_path, standin)
    stage_sample_partition(tmp_path / "landing", partition)
    monkeypatch.delenv("AIRFLOW_CONN_LIVERAMP_CAPI_DEFAULT")

    state, tries = _run(partition, retries=2)

    assert state == "failed"
    assert tries["send[0]"] == ("failed", 1)
    summary = output_json(tmp_path, partition, "summary.json")
    assert summary["status"] == "incomplete" and summary["delivered_this_run"] == 0
    assert summary["unfinished_tasks"] == {"send_0": "failed"} or "send" in str(summary["unfinished_tasks"])


def test_an_unknown_configuration_id_stops_the_send_at_the_first_404(airflow_db, standin, tmp_path, monkeypatch, capfd):
    partition = yesterday()
    configure_pipeline(monkeypatch, tmp_path, standin, concurrency=1)
    stage_sample_partition(tmp_path / "landing", partition)
    standin.config(config_ids=["cfg-some-other"])

    state, tries = _run(partition, retries=2)

    assert state == "failed"
    assert tries["send[0]"] == ("failed", 1)
    assert standin.stats()["requests"] < 5, "after a 404 nothing more is sent"
    summary = output_json(tmp_path, partition, "summary.json")
    assert summary["delivered_this_run"] == 0
    assert summary["not_sent_events"] + summary["failed_events"] == summary["valid"]
    text = "".join(capfd.readouterr())
    assert "does not know the ATS configuration ID in connection liveramp_capi_default (its password field)" in text
    assert standin.config_id not in text


def test_counts_add_up_over_a_forced_send_retry(airflow_db, standin, tmp_path, monkeypatch):
    """Half the batches fail transiently in try 1; try 2 delivers the rest: the run's counts hold both."""
    partition = yesterday()
    configure_pipeline(monkeypatch, tmp_path, standin, max_attempts=1, concurrency=2)
    stage_sample_partition(tmp_path / "landing", partition)
    standin.config(error_rate=0.5, seed=7)

    def heal(context: Any) -> None:
        standin.config(error_rate=0.0)

    state, tries = _run(partition, retries=1, send={"on_retry_callback": heal})

    assert state == "success"
    assert tries["send[0]"] == ("success", 2)
    valid = len(sample_valid_event_ids())
    summary = output_json(tmp_path, partition, "summary.json")
    assert summary["status"] == "complete"
    assert summary["delivered_this_run"] == valid
    assert summary["previously_delivered_events"] == 0
    per_try = summary["tries"]
    assert set(per_try) == {"1", "2"}
    assert 0 < per_try["1"]["delivered_events"] < valid
    assert per_try["1"]["delivered_events"] + per_try["2"]["delivered_events"] == valid
    assert Counter(standin.received_event_ids()) == Counter(sample_valid_event_ids())
