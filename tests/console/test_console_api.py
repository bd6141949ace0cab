"""The console's endpoints inside Airflow's own api-server app (the plugin mounted by Airflow):
authentication on every route, numbers against summary.json and the ledger, the failed
partition's rerun, paging, empty and missing data, and no identifier in any answer."""

from __future__ import annotations

import json
import re
import sqlite3

import pytest

from liveramp_capi.storage.layout import PartitionLayout, run_key
from tests.console.console_support import sample_secrets, token_for

pytestmark = pytest.mark.airflow

ROUTES = [
    "",
    "conversions",
    "run?dag_id=tiktok_conversions&run_id=x",
    "envelopes",
    "task?dag_id=tiktok_conversions&run_id=x&task_id=send&map_index=0",
    "static/console.js",
    "static/console.css",
    "static/icon.svg",
    "api/partitions",
    "api/partitions/2026-01-01",
    "api/daily?days=30",
    "api/runs/x",
    "api/task?run_id=x&task_id=send&map_index=0",
    "api/envelopes",
]


ANONYMOUS = object()


def _get(client, path, role="viewer", **params):
    """GET as a user with ``role`` (None: a user without any role; ANONYMOUS: no credential)."""
    headers = {} if role is ANONYMOUS else {"Authorization": f"Bearer {token_for(role)}"}
    return client.get(f"/capi-console/{path}", headers=headers, params=params or None, follow_redirects=False)


@pytest.mark.parametrize("route", ROUTES)
def test_every_route_refuses_without_a_valid_airflow_login(api_client, route):
    api_client.cookies.clear()
    assert _get(api_client, route, role=ANONYMOUS).status_code == 401
    forged = api_client.get(f"/capi-console/{route}", headers={"Authorization": "Bearer not-a-jwt"})
    assert forged.status_code == 403
    # A genuine token of a user without any role: authenticated, not authorised.
    assert _get(api_client, route, role=None).status_code == 403
    assert _get(api_client, route, role="viewer").status_code in (200, 307, 404)


def test_the_ui_login_cookie_is_accepted(api_client, console_world):
    api_client.cookies.set("_token", token_for("viewer"))
    try:
        assert api_client.get("/capi-console/api/partitions").status_code == 200
        assert "console.js" in api_client.get("/capi-console/conversions").text
    finally:
        api_client.cookies.clear()


def _ledger(world, partition):
    with sqlite3.connect(world.state_db) as db:
        rows = db.execute(
            "SELECT state, count(*), sum(event_count) FROM capi_delivery_ledger WHERE partition = ? GROUP BY state",
            (partition,),
        ).fetchall()
    return {state: (batches, events) for state, batches, events in rows}


def test_partition_rows_match_summary_json_and_the_ledger(api_client, console_world):
    rows = {row["partition"]: row for row in _get(api_client, "api/partitions", limit=200).json()["partitions"]}
    for partition, state in ((console_world.delivered, "delivered"), (console_world.refused, "failed")):
        summary, row = console_world.summary(partition), rows[partition]
        assert row["state"] == state
        counts = row["counts"]
        assert counts["received"] == summary["read"]
        assert counts["valid"] == summary["valid"]
        assert counts["rejected"] == summary["rejected"]
        assert counts["delivered"] == summary["delivered_events"]
        assert counts["failed"] == summary["failed_events"]
        assert counts["skipped"] == summary["envelope_expired_events"] + summary.get("not_sent_events", 0)
        assert counts["retries"] == summary["retries"]
        reasons = summary["rejected_by_reason"]
        top = sorted(reasons.items(), key=lambda item: (-item[1], item[0]))[:3]
        assert [(r["code"], r["count"]) for r in row["top_reasons"]] == top
        ledger = _ledger(console_world, partition)
        assert row["ledger"]["acknowledged_events"] == ledger["acknowledged"][1] == summary["delivered_events"]
        assert row["ledger"]["failed_events"] == ledger.get("failed", (0, 0))[1] == summary["failed_events"]
        assert row["ledger"]["batches"] == sum(batches for batches, _ in ledger.values())
        assert row["last_run"]["run_id"] == summary["run_id"]
        assert row["last_run"]["url"].startswith("/dags/tiktok_conversions/runs/")


def test_failed_partition_shows_what_failed_and_the_exact_rerun(api_client, console_world):
    detail = _get(api_client, f"api/partitions/{console_world.refused}").json()
    assert detail["state"] == "failed"
    failed = detail["failed_batches"]
    assert failed["total"] == 1 == console_world.summary(console_world.refused)["failed_batches"]
    batch = failed["batches"][0]
    assert batch["events"] == 1 and batch["http_status"] == 400
    assert set(batch) == {"batch_id", "events", "http_status", "error", "attempts", "updated_at"}
    rerun = detail["rerun"]
    # A manual run (no partition key): the rerun is a new run of the same partition.
    assert rerun["cli"] == (
        f"airflow dags trigger tiktok_conversions --conf '{json.dumps({'partition': console_world.refused})}'"
    )
    [send] = rerun["clear_tasks"]
    assert send["task_id"] == "send"
    assert send["url"] == f"{detail['run']['url']}/tasks/send/mapped/{send['map_index']}"
    states = {(t["task_id"], t["map_index"]): t["state"] for t in detail["tasks"]}
    assert states[("send", send["map_index"])] == "failed"
    delivered = _get(api_client, f"api/partitions/{console_world.delivered}").json()
    assert "rerun" not in delivered and delivered["failed_batches"]["total"] == 0


def test_run_tab_describes_that_run(api_client, console_world):
    summary = console_world.summary(console_world.delivered)
    detail = _get(api_client, f"api/runs/{summary['run_id']}").json()
    assert detail["partition"] == console_world.delivered
    assert detail["summary_is_from_this_run"] is True
    assert detail["counts"]["delivered"] == summary["delivered_events"]
    assert {r["code"]: r["count"] for r in detail["rejected_by_reason"]} == summary["rejected_by_reason"]
    assert detail["send_duration_seconds"] is not None
    assert _get(api_client, "api/runs/no-such-run").status_code == 404


def test_task_tab_of_the_failed_send_task_shows_its_shard(api_client, console_world):
    run_id = console_world.summary(console_world.refused)["run_id"]
    detail = _get(api_client, f"api/partitions/{console_world.refused}").json()
    [send] = detail["rerun"]["clear_tasks"]
    task = _get(api_client, "api/task", run_id=run_id, task_id="send", map_index=send["map_index"]).json()
    assert task["task"]["state"] == "failed"
    # The run's own hand-over files, in its work folder.
    layout = PartitionLayout(console_world.refused, run_key(run_id))
    folder = console_world.root / "output" / layout.folder
    validation = json.loads((folder / layout.validation).read_text())
    shard = validation["shards"][send["map_index"]]
    result = json.loads((folder / layout.result(shard)).read_text())
    assert task["shard_result"]["shard"] == shard
    assert task["shard_result"]["shard_count"] == validation["shard_count"]
    for key in ("events", "delivered_events", "failed_events", "failed_batches", "requests"):
        assert task["shard_result"][key] == result[key]
    assert task["shard_failed_batches"]["total"] == result["failed_batches"] == 1
    assert task["shard_failed_batches"]["batches"] == detail["failed_batches"]["batches"]
    other = _get(api_client, "api/task", run_id=run_id, task_id="report", map_index=-1).json()
    assert "shard_result" not in other and other["task"]["task_id"] == "report"
    assert _get(api_client, "api/task", run_id="nope", task_id="send").status_code == 404


def test_paging_is_newest_first_without_overlap(api_client, console_world, tmp_path, monkeypatch):
    output = tmp_path / "output"
    made = []
    for day in range(1, 61):
        partition = f"2020-03-{day:02d}" if day <= 31 else f"2020-04-{day - 31:02d}"
        (output / f"dt={partition}").mkdir(parents=True)
        (output / f"dt={partition}" / "summary.json").write_text(json.dumps({"status": "complete", "read": day}))
        made.append(partition)
    monkeypatch.setenv("AIRFLOW_VAR_CAPI_OUTPUT_ROOT", f"file://{output}")
    seen, offset, total = [], 0, None
    while True:
        page = _get(api_client, "api/partitions", limit=7, offset=offset).json()
        total = page["total"]
        assert len(page["partitions"]) <= 7
        if not page["partitions"]:
            break
        seen += [row["partition"] for row in page["partitions"]]
        offset += 7
    assert len(seen) == len(set(seen)) == total
    assert seen == sorted(seen, reverse=True)
    ours = [p for p in seen if p.startswith("2020-")]
    assert ours == sorted(made, reverse=True)
    by_partition = {row["partition"]: row for row in _get(api_client, "api/partitions", limit=200).json()["partitions"]}
    # A summary with only some keys: what is there is shown, the rest is absent.
    assert by_partition["2020-03-05"]["counts"] == {"received": 5}
    assert _get(api_client, "api/partitions", limit=0).status_code == 422
    assert _get(api_client, "api/partitions", limit=201).status_code == 422


def test_newer_summary_fields_are_shown_and_text_is_redacted(api_client, console_world, tmp_path, monkeypatch):
    folder = tmp_path / "output" / "dt=2019-06-01"
    folder.mkdir(parents=True)
    folder.joinpath("summary.json").write_text(json.dumps({
        "partition": "2019-06-01", "status": "not_processed", "read": 10, "delivered_this_run_events": 4,
        "delivered_earlier_tries_events": 2, "not_sent_events": 3, "envelope_expired_events": 1,
        "tries": [{"try_number": 1, "delivered_events": 2, "state": "failed"}, {"try_number": 2, "delivered_events": 4}],
        "unfinished_tasks": [{"task_id": "send", "map_index": 3, "state": "failed"}],
        "ignored_files": ["crm-export-of-jane@example.com.txt"], "note": "AgNTagi_Y2T6eSlK9l3X7uJ11ib8QP2RXvpd2id5",
    }))
    monkeypatch.setenv("AIRFLOW_VAR_CAPI_OUTPUT_ROOT", f"file://{tmp_path / 'output'}")
    response = _get(api_client, "api/partitions/2019-06-01")
    detail = response.json()
    assert detail["state"] == "failed"
    assert detail["counts"]["delivered_this_run"] == 4 and detail["counts"]["delivered_earlier_tries"] == 2
    assert detail["counts"]["skipped"] == 3 + 1
    assert detail["tries"] == [
        {"try_number": 1, "delivered_events": 2, "state": "failed"}, {"try_number": 2, "delivered_events": 4}
    ]
    assert detail["unfinished_tasks"] == [{"task_id": "send", "map_index": 3, "state": "failed"}]
    assert "jane@example.com" not in response.text and "AgNTagi" not in response.text


def test_empty_and_unknown(api_client, console_world, tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_VAR_CAPI_OUTPUT_ROOT", f"file://{tmp_path / 'nothing'}")
    monkeypatch.setenv(
        "AIRFLOW_CONN_CAPI_STATE_DEFAULT", json.dumps({"conn_type": "sqlite", "host": str(tmp_path / "empty.db")})
    )
    health = _get(api_client, "api/envelopes").json()
    assert health["total"] == 0 and health["histogram"] == [] and health["last_refresh"] is None
    rows = _get(api_client, "api/partitions").json()["partitions"]
    # Runs are known to Airflow, but without output or ledger their numbers are simply absent.
    assert all(row["counts"] == {} and "ledger" not in row for row in rows)
    assert _get(api_client, "api/partitions/1999-01-01").status_code == 404
    assert _get(api_client, "api/partitions/not-a-day").status_code == 404
    series = _get(api_client, "api/daily", days=90).json()["series"]
    assert len(series) == 90 and all(day["delivered"] is None for day in series)


def test_envelope_health_counts_the_store(api_client, console_world):
    health = _get(api_client, "api/envelopes").json()
    with sqlite3.connect(console_world.state_db) as db:
        by_state = dict(db.execute("SELECT state, count(*) FROM capi_envelope_store GROUP BY state").fetchall())
        lifetimes = {row[0] for row in db.execute("SELECT (expires_at - issued_at) / 86400 FROM capi_envelope_store")}
    assert health["total"] == sum(by_state.values()) > 0
    assert health["by_state"] == by_state
    assert sum(cell["envelopes"] for cell in health["histogram"]) == health["total"]
    assert set(health["lifetimes_days"]) == lifetimes


def test_daily_series_has_the_partitions(api_client, console_world):
    series = {day["partition"]: day for day in _get(api_client, "api/daily", days=30).json()["series"]}
    summary = console_world.summary(console_world.delivered)
    day = series[console_world.delivered]
    assert day["delivered"] == summary["delivered_events"]
    assert day["rejection_rate"] == round(summary["rejected"] / summary["read"], 4)
    assert day["send_duration_seconds"] is not None
    assert series[console_world.refused]["state"] == "failed"


def test_no_answer_holds_an_identifier_envelope_ip_or_consent_string(api_client, console_world):
    summary = console_world.summary(console_world.refused)
    bodies = [
        _get(api_client, path).text
        for path in (
            "api/partitions",
            f"api/partitions/{console_world.refused}",
            f"api/partitions/{console_world.delivered}",
            f"api/runs/{summary['run_id']}",
            f"api/task?run_id={summary['run_id']}&task_id=send&map_index=0",
            "api/envelopes",
            "api/daily?days=30",
        )
    ]
    secrets = sample_secrets()
    assert len(secrets) > 50
    # A short sample value (event id "6543") also occurs inside run ids' timestamps
    # ("…T15:28:36.654321"), which is no leak: short values count as whole tokens only.
    leaked = {
        secret
        for secret in secrets
        for body in bodies
        if (secret in body if len(secret) >= 12 else re.search(rf"(?<![\w.-]){re.escape(secret)}(?![\w.-])", body))
    }
    assert not leaked


def test_a_dry_run_is_shown_apart_and_does_not_change_the_partition_state(api_client, console_world):
    detail = _get(api_client, f"api/partitions/{console_world.refused}").json()
    summary = console_world.summary(console_world.refused)
    # (Other test modules may have run this partition too: the metadata DB is the session's.)
    assert detail["state"] == "failed" and detail["dry_runs"] >= 1 and detail["runs"] >= 1
    assert detail["run"]["dry_run"] is False and detail["rerun"]
    flags = [run["dry_run"] for run in detail["all_runs"]]
    assert flags.count(True) == detail["dry_runs"] and flags.count(False) == detail["runs"]
    planned = detail["dry_run_summary"]
    assert planned["dry_run"] is True and planned["status"] == "planned"
    # The dry run plans exactly what the failed run left: the refused batch.
    assert planned["planned_events"] == summary["failed_events"]
    assert planned["previously_delivered_events"] == summary["delivered_events"]


def test_hourly_partition_folders_are_listed_and_described(api_client, console_world, tmp_path, monkeypatch):
    for key in ("2020-05-01", "2020-05-01T13", "2020-05-01T14"):
        folder = tmp_path / "output" / f"dt={key}"
        folder.mkdir(parents=True)
        folder.joinpath("summary.json").write_text(json.dumps({"partition": key, "status": "complete", "read": 3}))
    monkeypatch.setenv("AIRFLOW_VAR_CAPI_OUTPUT_ROOT", f"file://{tmp_path / 'output'}")
    rows = [row["partition"] for row in _get(api_client, "api/partitions", limit=200).json()["partitions"]]
    assert [r for r in rows if r.startswith("2020-05-01")] == ["2020-05-01T14", "2020-05-01T13", "2020-05-01"]
    detail = _get(api_client, "api/partitions/2020-05-01T13").json()
    assert detail["partition"] == "2020-05-01T13" and detail["counts"]["received"] == 3
    assert _get(api_client, "api/partitions/2020-05-01T24").status_code == 404


HOURLY_DAG_ID = "tiktok_conversions_hourly"


@pytest.fixture(scope="module")
def failed_hour(airflow_db, tmp_path_factory):
    """An hour run by the hourly DAG (``dag.test()``) with one batch the stand-in refuses, in its own roots."""
    import datetime as dt
    import os

    from airflow.dag_processing.dagbag import DagBag

    from capi_devtools import REPO
    from capi_devtools.console_demo import STANDIN_ARGS, stage_refused_partition
    from capi_devtools.standin_fixture import running_standin
    from tests.support.conversions_run import configure_pipeline

    root = tmp_path_factory.mktemp("console-hourly")
    day = (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)).isoformat()
    # An hour no other test runs: the metadata DB is shared by the session, and the row counts runs.
    hour = f"{day}T07"
    stage_refused_partition(root / "landing", day).rename(root / "landing" / f"dt={hour}")
    with running_standin(*STANDIN_ARGS) as standin, pytest.MonkeyPatch.context() as patch:
        configure_pipeline(patch, root, standin)
        dag = DagBag(dag_folder=str(REPO / "dags" / "tiktok_conversions_hourly.py")).get_dag(HOURLY_DAG_ID)
        assert str(dag.test(run_conf={"partition": hour}).state) == "failed"
        env = {k: v for k, v in os.environ.items() if k.startswith(("AIRFLOW_CONN_", "AIRFLOW_VAR_"))}
    yield root, hour, env


def test_an_hourly_partition_row_has_its_run_link_state_and_rerun(api_client, failed_hour, monkeypatch):
    root, hour, env = failed_hour
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    summary = json.loads((root / "output" / f"dt={hour}" / "summary.json").read_text())
    run_id = summary["run_id"]
    run_url = f"/dags/{HOURLY_DAG_ID}/runs/"

    rows = {row["partition"]: row for row in _get(api_client, "api/partitions", limit=200).json()["partitions"]}
    row = rows[hour]
    assert row["state"] == "failed" and row["runs"] == 1
    assert row["last_run"]["dag_id"] == HOURLY_DAG_ID and row["last_run"]["run_id"] == run_id
    assert row["last_run"]["url"].startswith(run_url)
    assert row["counts"]["failed"] == summary["failed_events"] == 1

    detail = _get(api_client, f"api/partitions/{hour}").json()
    rerun = detail["rerun"]
    # A manual run: rerun by triggering the hour again, in the hourly DAG.
    assert rerun["cli"] == f"airflow dags trigger {HOURLY_DAG_ID} --conf '{json.dumps({'partition': hour})}'"
    assert rerun["run_url"] == detail["run"]["url"] and rerun["run_url"].startswith(run_url)
    [send] = rerun["clear_tasks"]
    assert send["url"] == f"{detail['run']['url']}/tasks/send/mapped/{send['map_index']}"
    assert {(t["task_id"], t["state"]) for t in detail["tasks"]} >= {("send", "failed"), ("report", "failed")}
    assert detail["send_duration_seconds"] is not None

    # The run tab and the task tab of the hourly DAG's run.
    tab = _get(api_client, f"api/runs/{run_id}", dag_id=HOURLY_DAG_ID).json()
    assert tab["partition"] == hour and tab["summary_is_from_this_run"] is True and tab["rerun"] == rerun
    assert _get(api_client, f"api/runs/{run_id}", dag_id="tiktok_conversions").status_code == 404
    task = _get(api_client, "api/task", run_id=run_id, task_id="send", map_index=send["map_index"],
                dag_id=HOURLY_DAG_ID).json()
    assert task["task"]["state"] == "failed" and task["shard_failed_batches"]["total"] == 1
