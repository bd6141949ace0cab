"""The partition wait (deferrable sensor + trigger) and the alerting pieces (notifier, deadline)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
import time
from pathlib import Path

import pytest

from liveramp_capi.notifiers import LogNotifier, default_failure_notifier, partition_deadline_alert
from liveramp_capi.sensors import PartitionReadySensor
from liveramp_capi.triggers import PartitionMarkerTrigger
from liveramp_capi.triggers.partition import marker_url

PARTITION = "2026-11-20"


async def _first_event(trigger: PartitionMarkerTrigger) -> dict:
    async for event in trigger.run():
        return event.payload
    raise AssertionError("the trigger ended without an event")


def test_trigger_fires_once_the_marker_appears(tmp_path: Path) -> None:
    folder = tmp_path / f"dt={PARTITION}"
    folder.mkdir()
    trigger = PartitionMarkerTrigger(
        landing_root=f"file://{tmp_path}", partition=PARTITION, timeout_at=time.time() + 60, poll_interval=0.05
    )

    async def scenario() -> dict:
        task = asyncio.ensure_future(_first_event(trigger))
        await asyncio.sleep(0.3)
        assert not task.done(), "fired before the export finished"
        (folder / "_SUCCESS").write_text("")
        return await asyncio.wait_for(task, timeout=10)

    event = asyncio.run(scenario())
    assert event["status"] == "ready" and event["partition"] == PARTITION and event["checks"] > 1


def test_trigger_times_out_and_survives_serialisation(tmp_path: Path) -> None:
    trigger = PartitionMarkerTrigger(
        landing_root=f"file://{tmp_path}", partition=PARTITION, timeout_at=time.time() + 0.3, poll_interval=0.05
    )
    classpath, kwargs = trigger.serialize()
    assert classpath == "liveramp_capi.triggers.partition.PartitionMarkerTrigger"
    # The triggerer rebuilds it from these kwargs; the deadline is absolute, so a restart keeps it.
    rebuilt = PartitionMarkerTrigger(**kwargs)
    assert rebuilt.timeout_at == trigger.timeout_at
    event = asyncio.run(asyncio.wait_for(_first_event(rebuilt), timeout=10))
    assert event["status"] == "timeout"


def test_marker_url_refuses_traversal() -> None:
    assert marker_url("file:///data/landing", PARTITION) == f"file:///data/landing/dt={PARTITION}/_SUCCESS"
    for bad_partition in ["../x", "2026-11-20/..", ""]:
        with pytest.raises(ValueError):
            marker_url("file:///data/landing", bad_partition)
    with pytest.raises(ValueError):
        marker_url("file:///data/landing", PARTITION, marker="../_SUCCESS")


def test_sensor_defers_without_the_marker_and_fails_clearly_on_timeout(tmp_path: Path) -> None:
    from airflow.sdk.exceptions import AirflowSensorTimeout, TaskDeferred

    sensor = PartitionReadySensor(
        task_id="wait", partition=PARTITION, landing_root=f"file://{tmp_path}", max_wait_minutes="30", poll_seconds="5"
    )
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute({})
    trigger = deferred.value.trigger
    assert isinstance(trigger, PartitionMarkerTrigger) and trigger.poll_interval == 5
    assert 29 * 60 < trigger.timeout_at - time.time() <= 30 * 60
    with pytest.raises(AirflowSensorTimeout, match=f"partition {PARTITION} is not complete: no _SUCCESS marker"):
        sensor.execute_complete({}, {"status": "timeout", "partition": PARTITION})
    sensor.execute_complete({}, {"status": "ready", "partition": PARTITION})


def test_sensor_succeeds_at_once_when_the_partition_is_complete(tmp_path: Path) -> None:
    (tmp_path / f"dt={PARTITION}").mkdir()
    (tmp_path / f"dt={PARTITION}" / "_SUCCESS").write_text("")
    sensor = PartitionReadySensor(task_id="wait", partition=PARTITION, landing_root=f"file://{tmp_path}")
    assert sensor.execute({}) is None  # no TaskDeferred: no triggerer round trip


def test_sensor_fails_at_once_when_the_landing_root_does_not_exist(tmp_path: Path) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    typo = f"file://{tmp_path}/landnig"
    sensor = PartitionReadySensor(task_id="wait", partition=PARTITION, landing_root=typo, max_wait_minutes="360")
    # Fails instead of deferring for six hours: "root missing" is not "partition not arrived yet".
    with pytest.raises(AirflowFailException, match=r"landing root .*/landnig does not exist \(Variable capi_landing_root\)"):
        sensor.execute({})
    sensor = PartitionReadySensor(
        task_id="wait", partition=PARTITION, landing_root=typo, max_wait_minutes="360", deferrable=False
    )
    with pytest.raises(AirflowFailException, match="does not exist"):
        sensor.execute({})


def test_log_notifier_works_with_the_serialized_dag_of_a_dag_callback(caplog: pytest.LogCaptureFixture) -> None:
    """``airflow dags test`` hands DAG callbacks a serialized DAG, which has no Jinja environment."""

    class _SerializedDag:
        dag_id = "tiktok_conversions"

    context = {"dag": _SerializedDag(), "run_id": "manual__x", "params": {"partition": PARTITION}, "reason": "task_failure"}
    with caplog.at_level(logging.ERROR, logger="liveramp_capi.alerts"):
        LogNotifier("partition failed")(context)
    line = caplog.records[-1].getMessage()
    assert "dag=tiktok_conversions" in line and f"partition={PARTITION}" in line


def test_log_notifier_names_the_partition_and_nothing_secret(caplog: pytest.LogCaptureFixture) -> None:
    class _TI:
        dag_id, task_id, map_index, try_number = "tiktok_conversions", "send", 3, 2

    context = {
        "ti": _TI(),
        "run_id": "scheduled__2026-11-21",
        "params": {"partition": PARTITION},
        "exception": RuntimeError("2 batches failed for good"),
        "conn": {"password": "cfg-secret-123"},
    }
    with caplog.at_level(logging.ERROR, logger="liveramp_capi.alerts"):
        LogNotifier("partition failed")(context)
    line = caplog.records[-1].getMessage()
    assert f"partition={PARTITION}" in line and "task=send" in line and "map_index=3" in line
    assert "RuntimeError: 2 batches failed" in line and "cfg-secret-123" not in line


def test_log_notifier_runs_as_a_deadline_callback(caplog: pytest.LogCaptureFixture) -> None:
    # What the triggerer does with an AsyncCallback: await callback(**kwargs, context=context).
    context = {
        "dag_run": {"dag_id": "tiktok_conversions", "dag_run_id": "manual__x", "conf": {"partition": PARTITION}},
        "deadline": {"id": "1", "deadline_time": "2026-11-21T09:00:00Z"},
    }

    async def fire() -> None:
        await LogNotifier(title="partition not finished by its deadline", context=context)

    with caplog.at_level(logging.ERROR, logger="liveramp_capi.alerts"):
        asyncio.run(fire())
    line = caplog.records[-1].getMessage()
    assert "not finished by its deadline" in line and f"partition={PARTITION}" in line and "deadline=" in line


def make_test_notifier(title: str) -> LogNotifier:
    """A factory as a user would name it in CAPI_FAILURE_NOTIFIER."""
    return LogNotifier(title=f"custom: {title}")


def test_the_failure_notifier_is_pluggable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(default_failure_notifier(), LogNotifier)
    monkeypatch.setenv("CAPI_FAILURE_NOTIFIER", f"{__name__}:make_test_notifier")
    assert default_failure_notifier("refresh failed").title == "custom: refresh failed"
    monkeypatch.setenv("CAPI_FAILURE_NOTIFIER", "no_such_module.factory")
    with pytest.raises(ImportError):
        default_failure_notifier()


def test_deadline_alert_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk import AsyncCallback, DeadlineReference

    monkeypatch.setenv("CAPI_PARTITION_DEADLINE_MINUTES", "90")
    alert = partition_deadline_alert()
    assert alert.interval == dt.timedelta(minutes=90)
    assert alert.reference == DeadlineReference.DAGRUN_QUEUED_AT
    assert isinstance(alert.callback, AsyncCallback)
    assert alert.callback.path == "liveramp_capi.notifiers.log.LogNotifier"
    monkeypatch.setenv("CAPI_PARTITION_DEADLINE_MINUTES", "0")
    assert partition_deadline_alert() is None
    monkeypatch.delenv("CAPI_PARTITION_DEADLINE_MINUTES")
    assert partition_deadline_alert() is None  # opt-in (Airflow 3.3.2 limitations)


def test_dag_wires_the_sensor_notifier_and_deadline(monkeypatch: pytest.MonkeyPatch, airflow_db) -> None:
    from airflow.dag_processing.dagbag import DagBag

    from capi_devtools import REPO

    monkeypatch.setenv("CAPI_PARTITION_DEADLINE_MINUTES", "120")
    dag = DagBag(dag_folder=str(REPO / "dags" / "tiktok_conversions.py")).get_dag("tiktok_conversions")
    wait = dag.get_task("wait_for_partition")
    assert isinstance(wait, PartitionReadySensor) and wait.deferrable
    # Nothing is read before the run owns its partition.
    assert [t.task_id for t in wait.downstream_list] == ["claim_partition"]
    assert [t.task_id for t in dag.get_task("claim_partition").downstream_list] == ["extract"]
    assert dag.on_failure_callback
    deadlines = dag.deadline if isinstance(dag.deadline, list) else [dag.deadline]
    assert deadlines[0].interval == dt.timedelta(minutes=120)


@pytest.mark.airflow
def test_a_late_partition_is_waited_for_in_the_triggerer(airflow_db, standin, tmp_path, monkeypatch):
    """dag.test() runs deferred tasks through an in-process triggerer: the run waits, then delivers."""
    from capi_devtools.sample_partition import stage_sample_partition
    from tests.support.conversions_run import (
        configure_pipeline,
        run_conversions,
        sample_valid_event_ids,
        yesterday,
    )

    partition = yesterday()
    configure_pipeline(monkeypatch, tmp_path, standin)
    monkeypatch.setenv("AIRFLOW_VAR_CAPI_PARTITION_POLL_SECONDS", "1")
    folder = stage_sample_partition(tmp_path / "landing", partition)
    (folder / "_SUCCESS").unlink()  # the export is still running
    timer = threading.Timer(4.0, (folder / "_SUCCESS").write_text, args=("",))
    timer.start()
    try:
        assert run_conversions(partition) == "success"
    finally:
        timer.cancel()
    assert set(standin.received_event_ids()) == sample_valid_event_ids()


@pytest.mark.airflow
def test_a_partition_that_never_completes_fails_with_a_clear_message(airflow_db, standin, tmp_path, monkeypatch):
    from capi_devtools.sample_partition import stage_sample_partition
    from tests.support.conversions_run import configure_pipeline, run_conversions, yesterday

    partition = yesterday()
    configure_pipeline(monkeypatch, tmp_path, standin)
    monkeypatch.setenv("AIRFLOW_VAR_CAPI_PARTITION_POLL_SECONDS", "1")
    monkeypatch.setenv("AIRFLOW_VAR_CAPI_PARTITION_WAIT_MINUTES", "0.05")  # 3 seconds
    folder = stage_sample_partition(tmp_path / "landing", partition)
    (folder / "_SUCCESS").unlink()
    assert run_conversions(partition) == "failed"
    assert standin.received_event_ids() == []
