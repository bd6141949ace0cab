"""`make bench`, hourly partitions: an hourly run's per-run time against the daily run of the same
data, and the latency from a partition's ``_SUCCESS`` to its last event acknowledged.

Both runs go through ``dag.test()`` in a child process (``bench.py --run-dag``), each on its own
landing, output and state database, against a fresh stand-in; the same seeded records are written
once as a day (``dt=2026-11-20``) and once as an hour (``dt=2026-11-20T13``).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: (DAG id, partition key) of the two granularities, the daily one first (the baseline).
_RUNS = (("tiktok_conversions", ""), ("tiktok_conversions_hourly", "T13"))


def _last_acknowledged(state_db: Path) -> float:
    with sqlite3.connect(state_db) as connection:
        (latest,) = connection.execute(
            "SELECT max(acknowledged_at) FROM capi_delivery_ledger WHERE state = 'acknowledged'"
        ).fetchone()
    stamp = dt.datetime.fromisoformat(str(latest))
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.UTC)).timestamp()


def run_granularity(workdir: Path, airflow_home: Path, dag_id: str, key: str, *, events: int, latency_ms: float,
                    concurrency: int) -> dict[str, Any]:
    """Write the partition, mark it ready, run its DAG; return the run's time and the latency."""
    from capi_devtools.bench import CONFIG_ID, PARTITION, SEED, _airflow_env, _day_start, _ensure_airflow_db
    from capi_devtools.bench_data import write_partition
    from capi_devtools.standin_fixture import running_standin

    root = workdir / f"granularity-{dag_id}"
    if root.exists():
        shutil.rmtree(root)
    folder = root / "landing" / f"dt={key}"
    counts = write_partition(folder, events, seed=SEED, day_start=_day_start(PARTITION))
    marker = folder / "_SUCCESS"
    marker.unlink()
    with running_standin("--latency-ms", str(latency_ms), "--no-keep-in-memory", config_id=CONFIG_ID) as standin:
        env = _airflow_env(airflow_home, root, standin.url, concurrency)
        env["CAPI_HOURLY_PARTITION_DEADLINE_MINUTES"] = "0"
        _ensure_airflow_db(airflow_home, env)
        out = root / "run.json"
        marker.write_bytes(b"")
        ready_at = time.time()
        with (root / "run.log").open("wb") as log:
            code = subprocess.run(
                [sys.executable, str(Path(__file__).with_name("bench.py")), "--run-dag", key, "--run-dag-out", str(out),
                 "--run-dag-id", dag_id],
                env=env, stdout=log, stderr=subprocess.STDOUT, check=False,
            ).returncode
        requests = standin.stats().get("requests")
    if code != 0 or not out.exists():
        raise RuntimeError(f"{dag_id} failed (exit {code}); log tail:\n{(root / 'run.log').read_text()[-3000:]}")
    run = json.loads(out.read_text())
    summary = json.loads((root / "output" / f"dt={key}" / "summary.json").read_text())
    return {
        "dag_id": dag_id,
        "partition": key,
        "seconds": run["seconds"],
        "latency_seconds": _last_acknowledged(root / "state.db") - ready_at,
        "delivered": summary["delivered_events"],
        "valid_expected": counts.valid_unique,
        "requests": requests,
        "state": run["state"],
    }


def granularity_rows(row: Any, workdir: Path, airflow_home: Path, *, events: int, latency_ms: float,
                     concurrency: int) -> tuple[list[Any], dict[str, Any]]:
    """Bench rows for hourly partitions, and the raw results.

    :param row: the bench's ``Row`` class.
    """
    from capi_devtools.bench import PARTITION

    daily, hourly = (
        run_granularity(workdir, airflow_home, dag_id, PARTITION + suffix, events=events, latency_ms=latency_ms,
                        concurrency=concurrency)
        for dag_id, suffix in _RUNS
    )
    delivered = all(r["state"] == "success" and r["delivered"] == r["valid_expected"] for r in (daily, hourly))
    ratio = hourly["seconds"] / daily["seconds"]
    rows = [
        row(
            f"hourly: one run on {events:,} records vs the daily run of the same records",
            hourly["seconds"], "s", daily["seconds"], ratio, "<= 1.2x, every event delivered once",
            ratio <= 1.2 and delivered,
        ),
        row(
            "hourly: latency, _SUCCESS written -> last event acknowledged",
            hourly["latency_seconds"], "s", daily["latency_seconds"], hourly["latency_seconds"] / daily["latency_seconds"],
            "(info) + the wait for the next HH:15 tick", None,
        ),
        row(
            "  (info) per-run cost of a day in hours: 24 hourly runs vs 1 daily run",
            24 * hourly["seconds"], "s", daily["seconds"], 24 * hourly["seconds"] / daily["seconds"], "", None,
        ),
    ]
    return rows, {"daily": daily, "hourly": hourly}
