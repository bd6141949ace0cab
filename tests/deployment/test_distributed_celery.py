"""End to end on a real distributed Airflow: PostgreSQL metadata DB, CeleryExecutor on Redis,
scheduler, dag-processor, api-server and two Celery workers as separate processes.

1. A partition cut into many shards is triggered through the REST API; its mapped ``send``
   tasks run on both workers and the stand-in receives every valid event exactly once.
2. One worker is killed (SIGKILL, with its children) while it sends a second partition; the
   interrupted tasks are cleared through the REST API and the partition completes with every
   valid event delivered; events re-sent are only those of batches the ledger had "in flight"
   (``resent_unknown_outcome_batches`` in the summary).
3. Two runs of one partition triggered at the same moment: one waits for the other's claim, both
   end green, every valid event arrives exactly once.

Skipped when PostgreSQL (127.0.0.1:5432) or Redis (127.0.0.1:6379) is unreachable.
"""

from __future__ import annotations

import copy
import datetime as dt
import fcntl
import json
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from capi_devtools.sample_partition import SAMPLE_DIR
from tests.support.distributed import (
    PG_HOST,
    PG_PORT,
    REDIS_HOST,
    REDIS_PORT,
    Deployment,
    reachable,
    wait_for,
)

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(900)]

DAG_ID = "tiktok_conversions"
EVENTS_PER_PARTITION = 400
EVENTS_PER_SESSION = 5
INVALID_PER_PARTITION = 4
SETTLED = {"success", "failed", "up_for_retry", "upstream_failed", "skipped"}


def _template_event() -> dict:
    line = (SAMPLE_DIR / "web-events.jsonl").read_text().splitlines()[0]
    return json.loads(line)


def write_partition(landing: Path, partition: str, prefix: str) -> set[str]:
    """Write a synthetic partition (valid web events in sessions, a few invalid) and its marker.

    :returns: the event ids that must reach LiveRamp.
    """
    template = _template_event()
    day = dt.datetime.fromisoformat(partition).replace(tzinfo=dt.UTC)
    start = int(day.timestamp()) + 3600
    folder = landing / f"dt={partition}"
    folder.mkdir(parents=True)
    valid: set[str] = set()
    with (folder / "events.jsonl").open("w") as out:
        for i in range(EVENTS_PER_PARTITION):
            event = copy.deepcopy(template)
            event["event_id"] = f"{prefix}-{i:05d}"
            event["event_time"] = start + i * 7
            event["session_id"] = f"{prefix}-s{i // EVENTS_PER_SESSION}"
            event["envelope_issued_at"] = start - 86400
            out.write(json.dumps(event) + "\n")
            valid.add(event["event_id"])
        for i in range(INVALID_PER_PARTITION):
            event = copy.deepcopy(template)
            event["event_id"] = f"{prefix}-bad-{i}"
            event["event_type"] = "NotAnEvent"
            event["event_time"] = start
            out.write(json.dumps(event) + "\n")
    (folder / "_SUCCESS").write_text("")
    return valid


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    if not reachable(PG_HOST, PG_PORT):
        pytest.skip(f"PostgreSQL is not reachable on {PG_HOST}:{PG_PORT}: the distributed deployment test needs it")
    if not reachable(REDIS_HOST, REDIS_PORT):
        pytest.skip(f"Redis is not reachable on {REDIS_HOST}:{REDIS_PORT}: the distributed deployment test needs it")
    from capi_devtools.standin_fixture import running_standin

    root = tmp_path_factory.mktemp("distributed")
    # One deployment at a time on this machine: two would share (and flush) the same Redis DB.
    lock = (Path(tempfile.gettempdir()) / "capi-e2e-distributed.lock").open("w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    with lock, running_standin("--latency-ms", "100") as standin:
        deployment = Deployment(root=root, standin_url=standin.url, standin_config_id=standin.config_id)
        deployment.standin = standin  # type: ignore[attr-defined]
        deployment.flush_redis()
        deployment.create_databases()
        try:
            started = time.monotonic()
            deployment.migrate()
            deployment.timings = {"migrate": time.monotonic() - started}  # type: ignore[attr-defined]
            deployment.start("api-server", "api-server", "--port", str(deployment.api_port))
            deployment.start("scheduler", "scheduler")
            deployment.start("dag-processor", "dag-processor")
            deployment.start_worker("worker-a")
            deployment.start_worker("worker-b")
            wait_for("the api-server", lambda: deployment.call("GET", "/version"), 180, diagnose=deployment.diagnose, abort=deployment.dead)
            wait_for(f"{DAG_ID} to be parsed", lambda: deployment.call("GET", f"/dags/{DAG_ID}")["is_paused"] is False,
                     180, diagnose=deployment.diagnose, abort=deployment.dead)
            deployment.timings["ready"] = time.monotonic() - started  # type: ignore[attr-defined]
            yield deployment
        finally:
            deployment.stop_all()
            deployment.drop_databases()
            deployment.flush_redis()


def _send_tis(deployment: Deployment, run_id: str) -> list[dict]:
    return [ti for ti in deployment.task_instances(DAG_ID, run_id) if ti["task_id"] == "send"]


def _wait_run(deployment: Deployment, run_id: str, timeout: float) -> str:
    def finished() -> str | None:
        state = deployment.run_state(DAG_ID, run_id)
        return state if state in ("success", "failed") else None

    return wait_for(f"run {run_id} to finish", finished, timeout, interval=2, diagnose=deployment.diagnose, abort=deployment.dead)


def _summary(deployment: Deployment, partition: str) -> dict:
    return json.loads((deployment.root / "output" / f"dt={partition}" / "summary.json").read_text())


def test_partition_spreads_over_two_celery_workers_and_survives_a_killed_worker(deployment: Deployment) -> None:
    standin = deployment.standin  # type: ignore[attr-defined]
    landing = deployment.root / "landing"
    today = dt.datetime.now(dt.UTC).date()
    first, second = (today - dt.timedelta(days=3)).isoformat(), (today - dt.timedelta(days=2)).isoformat()
    measured: dict[str, object] = dict(deployment.timings)  # type: ignore[attr-defined]

    # --- 1. one partition, two workers, every valid event exactly once -----------------------
    valid_first = write_partition(landing, first, "A")
    started = time.monotonic()
    run_id = deployment.trigger(DAG_ID, {"partition": first})
    assert _wait_run(deployment, run_id, 420) == "success", deployment.diagnose()
    measured["run_1_seconds"] = round(time.monotonic() - started, 1)

    sends = _send_tis(deployment, run_id)
    by_host = Counter(ti["hostname"] for ti in sends)
    measured["run_1_send_tasks_by_worker"] = dict(by_host)
    assert len(sends) >= 4, "the partition should have been cut into several shards"
    assert set(by_host) == {"worker-a", "worker-b"}, f"send tasks did not run on both workers: {by_host}"
    delivered = Counter(i for i in standin.received_event_ids() if i.startswith("A-"))
    assert set(delivered) == valid_first
    assert max(delivered.values()) == 1, "an event was delivered twice"
    summary = _summary(deployment, first)
    assert summary["status"] == "complete" and summary["delivered_events"] == len(valid_first)
    assert summary["rejected"] == INVALID_PER_PARTITION

    # --- 2. a worker dies in the middle of a partition; clearing its tasks finishes it ---------
    standin.config(latency_ms=3000)  # a shard now sends for ~10 s: time to be interrupted
    valid_second = write_partition(landing, second, "B")
    started = time.monotonic()
    run_id = deployment.trigger(DAG_ID, {"partition": second})

    def worker_b_busy() -> list[int] | None:
        running = [ti for ti in _send_tis(deployment, run_id)
                   if ti["state"] == "running" and ti["hostname"] == "worker-b"]
        # Both of its slots running tasks: no message sits on worker-b unstarted.
        enough = 2 if time.monotonic() - started < 90 else 1
        if len(running) >= enough:
            return [ti["map_index"] for ti in running]
        return None

    wait_for("worker-b to run send tasks", worker_b_busy, 240, interval=0.5,
             diagnose=deployment.diagnose, abort=deployment.dead)
    time.sleep(3.0)  # past start-up (parsing, reading the shard): batches are on the wire
    # Read again right before the kill: a shard may have finished meanwhile (the engine frees the
    # slot of a request that looks lost, so a shard at 3 s latency ends in seconds).
    interrupted = [ti["map_index"] for ti in _send_tis(deployment, run_id)
                   if ti["state"] == "running" and ti["hostname"] == "worker-b"]
    deployment.components["worker-b"].kill()
    assert interrupted, "no send task was running on worker-b at the kill"
    measured["killed_worker_b_during_shards"] = interrupted
    measured["received_before_kill"] = sum(1 for i in standin.received_event_ids() if i.startswith("B-"))

    def settled() -> list[dict] | None:
        sends = _send_tis(deployment, run_id)
        return sends if sends and all(ti["state"] in SETTLED for ti in sends) else None

    sends = wait_for("the killed worker's tasks to be declared lost", settled, 300, interval=2,
                     diagnose=deployment.diagnose, abort=deployment.dead)
    lost = sorted(ti["map_index"] for ti in sends if ti["state"] != "success")
    measured["tasks_to_rerun"] = lost
    assert set(interrupted) <= set(lost)
    assert deployment.run_state(DAG_ID, run_id) != "success"

    standin.config(latency_ms=100)
    cleared = deployment.clear(DAG_ID, run_id, [["send", i] for i in lost])
    assert {(ti["task_id"], ti["map_index"]) for ti in cleared} >= {("send", i) for i in lost}
    assert _wait_run(deployment, run_id, 420) == "success", deployment.diagnose()
    measured["run_2_seconds_incl_kill_and_rerun"] = round(time.monotonic() - started, 1)
    reruns = [ti for ti in _send_tis(deployment, run_id) if ti["map_index"] in lost]
    assert {ti["hostname"] for ti in reruns} == {"worker-a"}

    batches = [b for b in standin.received(fields="event_id") if b["events"][0]["event_id"].startswith("B-")]
    delivered = Counter(e["event_id"] for b in batches for e in b["events"])
    assert set(delivered) == valid_second, "the rerun did not complete the partition"
    summary = _summary(deployment, second)
    assert summary["status"] == "complete" and summary["delivered_events"] == len(valid_second)
    resent = summary["resent_unknown_outcome_batches"]
    copies = Counter(tuple(e["event_id"] for e in b["events"]) for b in batches)
    duplicate_batches = sum(n - 1 for n in copies.values())
    measured["resent_unknown_outcome_batches"] = resent
    measured["duplicate_batches_received"] = duplicate_batches
    measured["duplicate_events_received"] = sum(n - 1 for n in delivered.values())
    # Only batches whose outcome the ledger could not know (in flight at the kill) come twice;
    # TikTok deduplicates those by event name + event_id.
    assert duplicate_batches <= resent
    print("\ndistributed e2e measurements:", json.dumps(measured, sort_keys=True))


def test_two_runs_of_one_partition_on_celery_deliver_every_event_once(deployment: Deployment) -> None:
    standin = deployment.standin  # type: ignore[attr-defined]
    standin.config(latency_ms=300)  # the first run's shards send for several seconds
    partition = (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=4)).isoformat()
    valid = write_partition(deployment.root / "landing", partition, "C")

    run_ids = [deployment.trigger(DAG_ID, {"partition": partition}) for _ in range(2)]
    states = [_wait_run(deployment, run_id, 600) for run_id in run_ids]

    assert states == ["success", "success"], deployment.diagnose()
    delivered = Counter(i for i in standin.received_event_ids() if i.startswith("C-"))
    assert set(delivered) == valid
    assert max(delivered.values()) == 1, "an event was delivered twice"
    run_summaries = [
        json.loads(p.read_text())
        for p in (deployment.root / "output" / f"dt={partition}" / "_work").glob("*/summary.json")
    ]
    assert sorted(s["delivered_this_run"] for s in run_summaries) == [0, len(valid)]
    assert _summary(deployment, partition)["status"] == "complete"
