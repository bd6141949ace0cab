"""``airflow dags clear tiktok_conversions_hourly --partition-key <hour> --yes`` reruns one hour.

A real scheduler (LocalExecutor, SQLite metadata DB; api-server, scheduler and dag-processor as
separate processes) runs two hours of the hourly DAG, created with partition keys by
``airflow backfill create``, end to end against the stand-in. Clearing one hour by its partition
key makes the scheduler run that hour's run again: it finds every batch acknowledged in the
ledger and sends nothing (the stand-in's request count does not move), and the other hour's run
is not touched.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from capi_devtools.standin_fixture import StandInProcess
from tests.support.distributed import wait_for
from tests.support.fault_support import generate_events
from tests.support.single_host import SingleHost

pytestmark = [pytest.mark.airflow, pytest.mark.timeout(600)]

DAG_ID = "tiktok_conversions_hourly"


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SingleHost]:
    from capi_devtools.standin_fixture import running_standin

    root = tmp_path_factory.mktemp("single-host")
    with running_standin() as standin:
        host = SingleHost(root=root, standin_url=standin.url, standin_config_id=standin.config_id,
                          events_per_shard=100_000)
        host.standin = standin  # type: ignore[attr-defined]
        started = time.monotonic()
        try:
            host.migrate()
            host.start("api-server", "api-server", "--port", str(host.api_port))
            host.start("scheduler", "scheduler")
            host.start("dag-processor", "dag-processor")
            wait_for("the api-server", lambda: host.call("GET", "/version"), 180, diagnose=host.diagnose, abort=host.dead)
            wait_for(f"{DAG_ID} to be parsed", lambda: host.call("GET", f"/dags/{DAG_ID}")["is_paused"] is False,
                     180, diagnose=host.diagnose, abort=host.dead)
            host.timings = {"ready_seconds": round(time.monotonic() - started, 1)}  # type: ignore[attr-defined]
            yield host
        finally:
            host.stop_all()


def _runs(host: SingleHost) -> dict[str, dict]:
    """The DAG's runs by partition key."""
    found = host.call("GET", f"/dags/{DAG_ID}/dagRuns?limit=100")["dag_runs"]
    return {run["partition_key"]: run for run in found if run.get("partition_key")}


def _tries(host: SingleHost, run_id: str) -> dict[tuple[str, int], tuple[int, str | None, str | None]]:
    """Each task instance's try number, end date and state."""
    return {(ti["task_id"], ti["map_index"]): (ti["try_number"], ti["end_date"], ti["state"])
            for ti in host.task_instances(DAG_ID, run_id)}


def _finished(host: SingleHost, keys: list[str], after: dict[str, int] | None = None) -> dict[str, dict] | None:
    """The runs of ``keys`` once all are finished (and, with ``after``, their report ran past that try)."""
    runs = _runs(host)
    if not all(key in runs and runs[key]["state"] in ("success", "failed") for key in keys):
        return None
    for key, report_try in (after or {}).items():
        tries, _, state = _tries(host, runs[key]["dag_run_id"]).get(("report", -1), (0, None, None))
        if tries <= report_try or state not in ("success", "failed"):
            return None
    return runs


def _write_hour(landing: Path, hour: str, seed: int) -> set[str]:
    """An hour's export (a few users' sessions) and its ``_SUCCESS``; the event ids it holds."""
    events = generate_events(hour, 8, seed=seed, prefix=f"h{seed}")[0]
    folder = landing / f"dt={hour}"
    folder.mkdir(parents=True)
    (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (folder / "_SUCCESS").write_text("")
    return {e["event_id"] for e in events}


def _counters(standin: StandInProcess) -> dict[str, object]:
    """The stand-in's request, batch and event counters (everything but its clock)."""
    return {key: value for key, value in standin.stats().items() if key != "uptime_seconds"}


def test_clearing_one_hour_by_partition_key_reruns_only_that_hour_and_sends_nothing_again(airflow: SingleHost) -> None:
    host, standin = airflow, airflow.standin  # type: ignore[attr-defined]
    measured: dict[str, object] = dict(airflow.timings)  # type: ignore[attr-defined]
    # Two past hours, written before their runs exist: recent enough for the event-age check, far
    # enough back that no generated session (they span a few hours) ends in the future.
    base = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=12)
    first, second = base.strftime("%Y-%m-%dT%H"), (base + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H")
    expected = {hour: _write_hour(host.root / "landing", hour, seed=n) for n, hour in enumerate((first, second))}

    # Partitioned runs of past hours: a backfill over their partition dates (the schedule's ticks
    # at HH:15 inside the window), one run per hour key.
    started = time.monotonic()
    host.cli("backfill", "create", "--dag-id", DAG_ID, "--from-date", base.isoformat(),
             "--to-date", (base + dt.timedelta(hours=1, minutes=30)).isoformat())
    runs = wait_for("both hours to run", lambda: _finished(host, [first, second]), 240, interval=1,
                    diagnose=host.diagnose, abort=host.dead)
    measured["two_hours_seconds"] = round(time.monotonic() - started, 1)
    assert {key: run["state"] for key, run in runs.items()} == {first: "success", second: "success"}, host.diagnose()
    delivered = Counter(standin.received_event_ids())
    assert set(delivered) == expected[first] | expected[second] and max(delivered.values()) == 1
    requests_before = _counters(standin)
    other_before = _tries(host, runs[second]["dag_run_id"])
    report_try = _tries(host, runs[first]["dag_run_id"])[("report", -1)][0]

    # The CLI of the runbook: every run with this exact partition key, and nothing else.
    started = time.monotonic()
    said = host.cli("dags", "clear", DAG_ID, "--partition-key", first, "--yes")
    assert "across 1 Dag run(s)" in said, said
    runs = wait_for(f"the scheduler to rerun {first}", lambda: _finished(host, [first], {first: report_try}), 240,
                    interval=1, diagnose=host.diagnose, abort=host.dead)
    measured["rerun_seconds"] = round(time.monotonic() - started, 1)
    rerun = runs[first]
    assert rerun["state"] == "success", host.diagnose()
    assert rerun["dag_run_id"] == _runs(host)[first]["dag_run_id"]  # the same run, run again

    # The rerun found every batch acknowledged: not one request more at the stand-in.
    assert _counters(standin) == requests_before
    assert Counter(standin.received_event_ids()) == delivered
    # The run's summary accounts for its second try: nothing sent, everything delivered by the first.
    final = json.loads((host.root / "output" / f"dt={first}" / "summary.json").read_text())
    assert final["run_id"] == rerun["dag_run_id"] and final["status"] == "complete"
    assert final["delivered_events"] == len(expected[first]) and final["requests"] == 0
    assert final["tries"]["1"]["delivered_events"] == len(expected[first])
    assert final["tries"]["2"] == {"batches": 0, "delivered_events": 0, "failed_events": 0, "requests": 0, "retries": 0}
    # The other hour's run: same tries, same end dates.
    assert _tries(host, runs[second]["dag_run_id"]) == other_before
    assert runs[second]["state"] == "success"
    print("\nhourly clear by partition key:", json.dumps(measured, sort_keys=True))
