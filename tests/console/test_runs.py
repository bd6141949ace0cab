"""Which partition a run processed, and the rerun line it gets (scheduled and manual runs)."""

from __future__ import annotations

import datetime as dt

from liveramp_capi.console.runs import HOURLY_CONVERSIONS_DAG_ID, RunInfo, partition_of, rerun_action


def _run(partition_key: str | None) -> RunInfo:
    at = dt.datetime(2026, 11, 21, 3, tzinfo=dt.UTC)
    return RunInfo(
        run_id="scheduled__2026-11-21T03:00:00+00:00", partition="2026-11-20", state="failed",
        run_type="scheduled", partition_key=partition_key, start_date=at, end_date=at + dt.timedelta(minutes=3),
        run_after=at,
    )


def _tasks(*states: tuple[str, int, str]) -> list[dict]:
    return [{"task_id": t, "map_index": m, "state": s, "url": f"/u/{t}/{m}"} for t, m, s in states]


def test_partition_of_follows_the_dag_template():
    logical = dt.datetime(2026, 11, 22, tzinfo=dt.UTC)
    assert partition_of({"partition": "2026-11-01"}, "2026-11-20", logical) == "2026-11-01"
    assert partition_of('{"partition": "2026-11-02"}', None, logical) == "2026-11-02"
    assert partition_of({"partition": None}, "2026-11-20", logical) == "2026-11-20"
    assert partition_of({}, None, logical) == "2026-11-22"
    assert partition_of("not json", None, None) is None


def test_scheduled_run_is_cleared_by_partition_key_only_its_failed_send_tasks():
    action = rerun_action(
        _run("2026-11-20"),
        _tasks(("validate", -1, "success"), ("send", 0, "success"), ("send", 1, "failed"), ("report", -1, "failed")),
    )
    assert action["cli"] == "airflow dags clear tiktok_conversions --partition-key 2026-11-20 --only-failed --yes"
    assert action["clear_tasks"] == [{"task_id": "send", "map_index": 1, "url": "/u/send/1"}]
    assert action["run_url"] == "/dags/tiktok_conversions/runs/scheduled__2026-11-21T03%3A00%3A00%2B00%3A00"


def test_manual_run_is_rerun_by_triggering_the_partition_and_upstream_failures_point_at_the_cause():
    action = rerun_action(
        _run(None), _tasks(("validate", -1, "failed"), ("send", -1, "upstream_failed"), ("report", -1, "failed"))
    )
    assert action["cli"] == "airflow dags trigger tiktok_conversions --conf '{\"partition\": \"2026-11-20\"}'"
    assert [t["task_id"] for t in action["clear_tasks"]] == ["validate", "report"]


def _hourly_run(partition_key: str | None) -> RunInfo:
    at = dt.datetime(2026, 11, 20, 14, 15, tzinfo=dt.UTC)
    return RunInfo(
        run_id="scheduled__2026-11-20T14:15:00+00:00", partition="2026-11-20T13", state="failed",
        run_type="scheduled", partition_key=partition_key, start_date=at, end_date=at + dt.timedelta(minutes=1),
        run_after=at, dag_id=HOURLY_CONVERSIONS_DAG_ID,
    )


def test_an_hourly_run_falls_back_to_its_hour_and_is_rerun_in_the_hourly_dag():
    logical = dt.datetime(2026, 11, 20, 13, 15, tzinfo=dt.UTC)
    assert partition_of({}, None, logical, HOURLY_CONVERSIONS_DAG_ID) == "2026-11-20T13"
    assert partition_of({}, "2026-11-20T12", logical, HOURLY_CONVERSIONS_DAG_ID) == "2026-11-20T12"
    tasks = _tasks(("send", 0, "failed"), ("report", -1, "failed"))
    scheduled = rerun_action(_hourly_run("2026-11-20T13"), tasks)
    assert scheduled["cli"] == (
        "airflow dags clear tiktok_conversions_hourly --partition-key 2026-11-20T13 --only-failed --yes"
    )
    assert scheduled["run_url"].startswith("/dags/tiktok_conversions_hourly/runs/scheduled__2026-11-20T14")
    manual = rerun_action(_hourly_run(None), tasks)
    assert manual["cli"] == "airflow dags trigger tiktok_conversions_hourly --conf '{\"partition\": \"2026-11-20T13\"}'"
    assert _hourly_run(None).as_dict()["dag_id"] == HOURLY_CONVERSIONS_DAG_ID
