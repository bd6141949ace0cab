"""Hourly and daily partitions side by side, end to end: the two DAGs of one builder.

Real Airflow runs (``dag.test()``), the stand-in over real HTTP, one real SQLite state database
for both DAGs.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from pathlib import Path

import pytest

from tests.support.conversions_run import configure_pipeline, output_json, yesterday
from tests.support.fault_support import generate_events, write_partition

pytestmark = pytest.mark.airflow


def run(dag_file: str, dag_id: str, partition: str) -> str:
    from airflow.dag_processing.dagbag import DagBag

    from capi_devtools import REPO

    bag = DagBag(dag_folder=str(REPO / "dags" / dag_file))
    assert not bag.import_errors, bag.import_errors
    return str(bag.get_dag(dag_id).test(run_conf={"partition": partition}).state)


def _last_run_states(dag_id: str) -> dict[str, str]:
    """Task states of the DAG's newest run, read from the metadata DB."""
    from airflow.models import DagRun, TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        newest = session.query(DagRun).filter(DagRun.dag_id == dag_id).order_by(DagRun.id.desc()).first()
        tis = session.query(TaskInstance).filter(TaskInstance.dag_id == dag_id, TaskInstance.run_id == newest.run_id)
        return {ti.task_id: str(ti.state) for ti in tis}


def write_hour(landing: Path, hour: str, events: list[dict]) -> None:
    folder = landing / f"dt={hour}"
    folder.mkdir(parents=True)
    (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (folder / "_SUCCESS").write_text("")


def straddling_session(day: str) -> tuple[list[dict], list[dict]]:
    """One visit from 13:50 to 14:09 UTC: two events land in the 13 o'clock export, two in the 14."""
    template, _ = generate_events(day, 1, seed=5, prefix="tmpl")
    start = int(dt.datetime.fromisoformat(f"{day}T13:50").replace(tzinfo=dt.UTC).timestamp())
    visit = []
    for n, offset in enumerate((0, 400, 720, 1140)):
        event = {**template[0], "event_id": f"visit-{n}", "event_time": start + offset, "session_id": "visit-1"}
        visit.append(event)
    return visit[:2], visit[2:]


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_hourly_and_daily_partitions_each_deliver_their_own_events_once(
    backend, airflow_db, standin, tmp_path, monkeypatch, request
):
    day = yesterday()
    h13, h14 = f"{day}T13", f"{day}T14"
    # The daily partition is another day: a day and its own hours are never both delivered.
    other_day = (dt.date.fromisoformat(day) - dt.timedelta(days=1)).isoformat()
    configure_pipeline(monkeypatch, tmp_path, standin)
    if backend == "postgresql":
        # PostgreSQL enforces column lengths: an hour key is longer than a day's.
        monkeypatch.setenv("AIRFLOW_CONN_CAPI_STATE_DEFAULT", request.getfixturevalue("pg_database_factory")())
    landing = tmp_path / "landing"
    daily = write_partition(landing, other_day, users=12, seed=3)
    in_13, in_14 = straddling_session(day)
    hour_13 = generate_events(h13, 6, seed=11, prefix="h13")[0] + in_13
    hour_14 = generate_events(h14, 6, seed=12, prefix="h14")[0] + in_14
    write_hour(landing, h13, hour_13)
    write_hour(landing, h14, hour_14)

    assert run("tiktok_conversions_hourly.py", "tiktok_conversions_hourly", h13) == "success"
    sent_13 = standin.received()
    assert run("tiktok_conversions_hourly.py", "tiktok_conversions_hourly", h14) == "success"
    assert run("tiktok_conversions.py", "tiktok_conversions", other_day) == "success"

    batches = standin.received()
    ids = Counter(e["event_id"] for b in batches for e in b["events"])
    expected = {e["event_id"] for e in hour_13 + hour_14} | set(daily.event_ids)
    assert set(ids) == expected and max(ids.values()) == 1, "every event once, none lost"
    assert {e["event_id"] for b in sent_13 for e in b["events"]} == {e["event_id"] for e in hour_13}
    # The visit across 14:00 is two sessions: each hour's part in its own batch, sent by its hour's run.
    visit_batches = [
        sorted(e["event_id"] for e in b["events"]) for b in batches if any(e["event_id"].startswith("visit-") for e in b["events"])
    ]
    assert sorted(visit_batches) == [["visit-0", "visit-1"], ["visit-2", "visit-3"]]
    for partition, valid in ((h13, len(hour_13)), (h14, len(hour_14)), (other_day, len(daily.event_ids))):
        summary = output_json(tmp_path, partition, "summary.json")
        assert summary["partition"] == partition and summary["status"] == "complete"
        assert summary["delivered_this_run"] == summary["valid"] == valid

    # An hour is rerun on its own key: the ledger of that hour has everything, nothing is sent again.
    standin.reset()
    assert run("tiktok_conversions_hourly.py", "tiktok_conversions_hourly", h14) == "success"
    assert standin.received() == []
    assert output_json(tmp_path, h14, "summary.json")["previously_delivered_events"] == len(hour_14)


def test_a_day_whose_hours_were_delivered_is_refused_until_the_variable_allows_it(
    airflow_db, standin, tmp_path, monkeypatch
):
    day = yesterday()
    hour = f"{day}T13"
    configure_pipeline(monkeypatch, tmp_path, standin)
    landing = tmp_path / "landing"
    hour_events = generate_events(hour, 4, seed=31, prefix="hr")[0]
    write_hour(landing, hour, hour_events)
    assert run("tiktok_conversions_hourly.py", "tiktok_conversions_hourly", hour) == "success"
    delivered = Counter(standin.received_event_ids())

    # The same feed exported as a day too: its run stops at claim_partition and sends nothing.
    daily = write_partition(landing, day, users=4, seed=32)
    assert run("tiktok_conversions.py", "tiktok_conversions", day) == "failed"
    assert _last_run_states("tiktok_conversions")["claim_partition"] == "failed"
    assert Counter(standin.received_event_ids()) == delivered
    assert not (tmp_path / "output" / f"dt={day}" / "summary.json").exists()

    # The day's files hold other events than its hours' (the operator says so): delivered once.
    monkeypatch.setenv("AIRFLOW_VAR_CAPI_ALLOW_MIXED_GRANULARITY", "true")
    assert run("tiktok_conversions.py", "tiktok_conversions", day) == "success"
    assert Counter(standin.received_event_ids()) == delivered + Counter(daily.event_ids)
