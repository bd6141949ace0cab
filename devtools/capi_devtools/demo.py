"""`make demo`: the product on its embedded default, from a fresh checkout.

Creates a local Airflow home (SQLite metadata DB) under ``.demo/``, starts the local stand-in of
LiveRamp's endpoints (it is NOT LiveRamp: it records what it receives), stages the sample
partition for yesterday, runs ``tiktok_conversions`` with ``airflow dags test`` and prints the
partition's summary. It then runs the same partition again to show that a rerun sends nothing
that was already acknowledged.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from capi_devtools import REPO
from capi_devtools.sample_partition import stage_sample_partition
from capi_devtools.standin_fixture import STANDIN_SCRIPT

DEMO = REPO / ".demo"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment(port: int) -> dict[str, str]:
    env = os.environ.copy()
    env.update(
        {
            "AIRFLOW_HOME": str(DEMO / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{DEMO / 'airflow' / 'airflow.db'}",
            "AIRFLOW_CONN_LIVERAMP_CAPI_DEFAULT": json.dumps(
                {
                    "conn_type": "liveramp_capi",
                    "host": f"http://127.0.0.1:{port}",
                    "password": "cfg-demo",
                    "extra": {"concurrency": 32, "timeout_seconds": 5, "max_attempts": 4},
                }
            ),
            "AIRFLOW_CONN_CAPI_STATE_DEFAULT": json.dumps({"conn_type": "sqlite", "host": str(DEMO / "state.db")}),
            "AIRFLOW_VAR_CAPI_LANDING_ROOT": f"file://{DEMO / 'landing'}",
            "AIRFLOW_VAR_CAPI_OUTPUT_ROOT": f"file://{DEMO / 'output'}",
            # The sample holds a handful of deliberately invalid records among ~60.
            "AIRFLOW_VAR_CAPI_MAX_INVALID_RATIO": "0.25",
            # The envelope refresh API of the same stand-in (pid and origin are placeholders).
            "AIRFLOW_CONN_LIVERAMP_ENVELOPE_DEFAULT": json.dumps(
                {
                    "conn_type": "liveramp_envelope",
                    "host": f"http://127.0.0.1:{port}",
                    "extra": {"pid": "demo-placement", "origin": "https://yourwebshop.com", "concurrency": 16},
                }
            ),
            # `airflow dags test` (3.3.2) crashes on a successful run of a DAG with a deadline alert.
            "CAPI_PARTITION_DEADLINE_MINUTES": "0",
        }
    )
    return env


def _standin_stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_standin/stats", timeout=5) as response:
        return json.loads(response.read())


def _run_dag(env: dict[str, str], partition: str, log_name: str) -> dict:
    log_path = DEMO / log_name
    started = time.monotonic()
    with log_path.open("wb") as log:
        code = subprocess.run(
            [str(BIN / "airflow"), "dags", "test", "tiktok_conversions", "--conf", json.dumps({"partition": partition})],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
        ).returncode
    summary_path = DEMO / "output" / f"dt={partition}" / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    print(f"  airflow dags test exited {code} in {time.monotonic() - started:.1f} s (log: {log_path.relative_to(REPO)})")
    return summary


def _run_refresh(env: dict[str, str]) -> dict:
    log_path = DEMO / "refresh.log"
    started = time.monotonic()
    with log_path.open("wb") as log:
        code = subprocess.run(
            [str(BIN / "airflow"), "dags", "test", "ats_envelope_refresh"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
        ).returncode
    print(f"  airflow dags test exited {code} in {time.monotonic() - started:.1f} s (log: {log_path.relative_to(REPO)})")
    summaries = sorted((DEMO / "output" / "envelope_refresh").glob("*/summary.json"))
    return json.loads(summaries[-1].read_text()) if summaries else {}


def _print_summary(summary: dict) -> None:
    keys = ["status", "read", "valid", "rejected", "duplicates", "sessions", "batches", "delivered_events",
            "delivered_this_run", "previously_delivered_events", "failed_events", "pending_events"]
    for key in keys:
        print(f"    {key:<28} {summary.get(key)}")
    for reason, count in (summary.get("rejected_by_reason") or {}).items():
        print(f"    rejected: {reason:<18} {count}")
    print(f"    checks: {summary.get('checks')}")


def main() -> int:
    if DEMO.exists():
        shutil.rmtree(DEMO)
    (DEMO / "airflow").mkdir(parents=True)
    port = _free_port()
    env = _environment(port)
    print("1. Migrating a local SQLite Airflow metadata DB under .demo/airflow ...")
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)

    print(f"2. Starting the local LiveRamp STAND-IN on 127.0.0.1:{port} (not LiveRamp: it records what it receives)")
    standin = subprocess.Popen(
        [sys.executable, str(STANDIN_SCRIPT), "--port", str(port),
         "--config-id", "cfg-demo", "--latency-ms", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert standin.stdout is not None
        ready = standin.stdout.readline().decode()
        if "listening" not in ready:
            print(f"stand-in failed to start: {ready}")
            return 1
        partition = (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)).isoformat()
        folder = stage_sample_partition(DEMO / "landing", partition)
        print(f"3. Staged the sample partition at {folder.relative_to(REPO)}: "
              + ", ".join(sorted(p.name for p in folder.iterdir())))

        print(f"4. Running tiktok_conversions for partition {partition} ...")
        first = _run_dag(env, partition, "run-1.log")
        _print_summary(first)
        print(f"   output: .demo/output/dt={partition}/ (summary.json, rejected.jsonl, failed.jsonl)")
        stats = _standin_stats(port)
        print(f"   the stand-in received {stats.get('events')} events in {stats.get('batches')} batches")

        print("5. Running the same partition again (a rerun sends only what was not acknowledged) ...")
        second = _run_dag(env, partition, "run-2.log")
        _print_summary(second)
        stats = _standin_stats(port)
        print(f"   the stand-in has now received {stats.get('events')} events in {stats.get('batches')} batches in all")
        print("6. Running ats_envelope_refresh: envelopes with a third of their lifetime left are refreshed ...")
        refresh = _run_refresh(env)
        for key in ("status", "selected", "refreshed", "failed", "failed_by_reason", "skipped_consent",
                    "expired_when_found", "requests"):
            print(f"    {key:<28} {refresh.get(key)}")
        print("   (the sample holds an EU user (TCF) whose envelope is 25 days old, US Privacy and California users")
        print("    on the 15-day lifetime 10-12 days in, and one due user without consent: reported, never sent")
        print("    to the refresh API)")
        ok = (
            first.get("status") == "complete"
            and second.get("delivered_this_run") == 0
            and refresh.get("status") == "complete"
        )
        print("Demo finished: " + ("every valid event delivered exactly once." if ok else "something is off, see the logs."))
        return 0 if ok else 1
    finally:
        standin.terminate()
        standin.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
