"""`make bench` at a small size, so the benchmark cannot rot: the table's shape and the counts.

No timing is asserted: this machine is shared and a smoke-size run measures nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.airflow


def test_bench_quick_run_prints_one_table_and_counts_add_up(airflow_db, tmp_path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "capi_devtools.bench", "--quick", "--events", "1500",
         "--workdir", str(tmp_path / "work"), "--airflow-home", str(airflow_db), "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    # Exit code 1 only means a target was missed (expected at smoke size); 2+ is a crash.
    assert result.returncode in (0, 1), result.stdout[-3000:] + result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert [cell.strip() for cell in table[0].split("|")[1:-1]] == ["figure", "value", "baseline", "ratio", "target", "met"]
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert len(table) == len(rows) + 2  # header, rule, one line per row
    figures = " ".join(row["figure"] for row in rows)
    for needed in ("validation", "delivery: BatchSender", "bare aiohttp", "end to end", "memory: validate", "memory: send",
                   "console: partitions page", "console: envelope health", "envelopes (", "hourly: one run",
                   "hourly: latency"):
        assert needed in figures
    for row in rows:
        assert row["value"] > 0
        if row["baseline"] is not None and row["ratio"] is not None:
            assert row["ratio"] == pytest.approx(row["value"] / row["baseline"])

    for run in (data["end_to_end"], data["end_to_end_small"]):
        counts, summary = run["counts"], run["summary"]
        assert summary["read"] == counts["records"] == run["events"]
        assert summary["read"] == summary["valid"] + summary["rejected"] + summary["duplicates"]
        assert summary["valid"] == summary["delivered_events"] == counts["valid_unique"]
        assert summary["rejected"] == counts["invalid"] and summary["duplicates"] == counts["duplicates"]
        assert all(run["checks"].values()), run["checks"]

    for run in data["granularity"].values():
        assert run["state"] == "success" and run["delivered"] == run["valid_expected"] > 0
        assert run["latency_seconds"] > 0
    assert data["granularity"]["hourly"]["partition"] == data["granularity"]["daily"]["partition"] + "T13"


def test_bench_shard_times_one_send_task_without_touching_the_benchs_state(airflow_db, tmp_path) -> None:
    import sqlite3

    work = tmp_path / "work"
    made = subprocess.run(
        [sys.executable, "-m", "capi_devtools.bench", "--send-only", "--quick", "--events", "1500",
         "--workdir", str(work), "--airflow-home", str(airflow_db)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert made.returncode in (0, 1), made.stdout[-3000:] + made.stderr[-3000:]
    state = work / "e2e-1500" / "state.db"

    def ledger() -> list[tuple[str, int]]:
        with sqlite3.connect(state) as connection:
            return connection.execute("SELECT state, count(*) FROM capi_delivery_ledger GROUP BY state").fetchall()

    before = ledger()
    assert before and all(state_name == "acknowledged" for state_name, _ in before)
    out = tmp_path / "shard.json"
    result = subprocess.run(
        [sys.executable, "-m", "capi_devtools.bench_shard", "--workdir", str(work), "--events", "1500",
         "--repeat", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert len(figures["task"]) == len(figures["ready"]) == 2
    # The task sends every batch of the shard again (its ledger rows were removed in the copy),
    # exactly as many as the same shard's batches planned ahead for BatchSender.
    requests = {row["requests"] for row in figures["task"] + figures["ready"]}
    assert len(requests) == 1 and requests.pop() > 0
    assert all(row["start_wall"] > 0 and row["cpu"] > 0 for row in figures["task"])
    assert "task vs ready (medians)" in result.stdout
    assert ledger() == before  # the bench's own state database is left as it was

    def written_by_the_harness() -> int:
        with sqlite3.connect(work / "bench-shard" / "state.db") as connection:
            return connection.execute(
                "SELECT count(*) FROM capi_delivery_ledger WHERE run_id LIKE 'bench-shard#%'").fetchone()[0]

    # A real task writes a row for each batch it sent (a request each, retries aside).
    assert 0 < written_by_the_harness() <= figures["task"][-1]["requests"]
    # The bound: the same task with its ledger writes skipped sends as much and writes nothing.
    bound = subprocess.run(
        [sys.executable, "-m", "capi_devtools.bench_shard", "--workdir", str(work), "--events", "1500",
         "--repeat", "1", "--mode", "task", "--without-ledger-writes", "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert bound.returncode == 0, bound.stdout[-3000:] + bound.stderr[-3000:]
    assert "a bound, not a delivery" in bound.stdout and "task* vs ready" not in bound.stdout
    rows = json.loads(out.read_text())["task*"]
    assert [row["requests"] for row in rows] == [figures["task"][0]["requests"]]
    assert written_by_the_harness() == 0
    assert ledger() == before
