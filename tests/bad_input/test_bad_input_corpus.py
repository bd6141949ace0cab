"""Every case of the bad-input corpus through the real operators, then all of them in one real DAG run.

Per case (extract + validate operators on a partition holding only that file): the counts and
rejection codes match ``expected.json``, every rejected record carries file, line, pointer, code
and a non-empty reason, ``read = valid + rejected + duplicates``, and no reason echoes the
envelope. Together (``tiktok_conversions`` with ``dag.test``): the partition's summary adds up
to the sum of the table, and exactly the valid events reach the stand-in.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from liveramp_capi.storage.layout import PartitionLayout, run_key
from tests.bad_input.corpus import ENVELOPE, EXPECTED, case_bytes, case_names, stage_case
from tests.support.conversions_run import configure_pipeline, output_json, output_jsonl, yesterday
from tests.support.fault_support import run_dag_once, task_context

RUN_ID = "manual__bad_input"

CASES = case_names()


def test_the_table_covers_every_case_and_nothing_else():
    assert set(CASES) == set(EXPECTED) - {"_doc"}


def _run_validation(root: Path, partition: str) -> tuple[dict, list[dict]]:
    from liveramp_capi.operators.extract import ExtractPartitionOperator
    from liveramp_capi.operators.validate import ValidateConversionsOperator

    roots = {"landing_root": f"file://{root / 'landing'}", "output_root": f"file://{root / 'output'}"}
    ExtractPartitionOperator(task_id="extract", partition=partition, **roots).execute(task_context(RUN_ID))
    ValidateConversionsOperator(task_id="validate", partition=partition, max_invalid_ratio=1.0, **roots).execute(
        task_context(RUN_ID)
    )
    out = root / "output" / f"dt={partition}"
    validation = json.loads((out / PartitionLayout(partition, run_key(RUN_ID)).validation).read_text())
    rejects = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines() if line]
    return validation, rejects


@pytest.mark.parametrize("name", CASES)
def test_case_gives_its_expected_outcome(name, tmp_path, monkeypatch):
    partition = yesterday()
    monkeypatch.setenv("AIRFLOW_CONN_CAPI_STATE_DEFAULT", json.dumps({"conn_type": "sqlite", "host": str(tmp_path / "s.db")}))
    stage_case(tmp_path / "landing", partition, name)
    expected = EXPECTED[name]

    validation, rejects = _run_validation(tmp_path, partition)

    got = {k: validation[k] for k in ("read", "valid", "duplicates", "rejected_by_code")}
    assert got == {k: expected[k] for k in got}, expected["why"]
    assert validation["read"] == validation["valid"] + validation["rejected"] + validation["duplicates"]
    assert len(rejects) == validation["rejected"]
    assert Counter(r["code"] for r in rejects) == Counter(expected["rejected_by_code"])
    for reject in rejects:
        assert reject["file"] == name and reject["reason"].strip() and reject["code"]
        assert "pointer" in reject and "line" in reject and "record" in reject
        assert ENVELOPE not in reject["reason"], "a reason must not echo an identifier"
        # The raw record is kept for replay, cut at 64 KiB (the 10 MB line included).
        assert len(reject["record"]) <= 64 * 1024 + len("...[truncated]")


def test_an_empty_partition_is_a_clear_task_error(tmp_path, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    from liveramp_capi.operators.extract import ExtractPartitionOperator

    partition = yesterday()
    folder = tmp_path / "landing" / f"dt={partition}"
    folder.mkdir(parents=True)
    (folder / "_SUCCESS").write_text("")
    (folder / "notes.txt").write_text("not an input file")
    roots = {"landing_root": f"file://{tmp_path / 'landing'}", "output_root": f"file://{tmp_path / 'output'}"}
    with pytest.raises(AirflowFailException, match="holds no input files"):
        ExtractPartitionOperator(task_id="extract", partition=partition, **roots).execute(task_context())


@pytest.mark.airflow
def test_the_whole_corpus_in_one_partition_through_the_dag(airflow_db, standin, tmp_path, monkeypatch):
    partition = yesterday()
    configure_pipeline(monkeypatch, tmp_path, standin)
    monkeypatch.setenv("AIRFLOW_VAR_CAPI_MAX_INVALID_RATIO", "1.0")
    for name in CASES:
        stage_case(tmp_path / "landing", partition, name)
    cases = [EXPECTED[name] for name in CASES]

    assert run_dag_once(partition) == "success"

    summary = output_json(tmp_path, partition, "summary.json")
    assert summary["status"] == "complete" and all(summary["checks"].values())
    assert summary["read"] == sum(c["read"] for c in cases)
    assert summary["valid"] == sum(c["valid"] for c in cases) == summary["delivered_events"]
    assert summary["duplicates"] == sum(c["duplicates"] for c in cases)
    by_code: Counter[str] = Counter()
    for case in cases:
        by_code.update(case["rejected_by_code"])
    assert summary["rejected_by_reason"] == dict(by_code)
    assert summary["read"] == summary["valid"] + summary["rejected"] + summary["duplicates"]
    assert len(output_jsonl(tmp_path, partition, "rejected.jsonl")) == summary["rejected"]
    received = Counter(standin.received_event_ids())
    assert sum(received.values()) == summary["valid"]
    # dup-1 is two different events (Purchase and AddToCart): sent twice, the repeat Purchase not at all.
    assert received["dup-1"] == 2 and received["tm-after"] == 1 and received["bom-ok"] == 1
    assert not {"l1-bad", "ms-1", "fut-1", "mp-1", "huge-1"} & set(received)


def test_case_bytes_are_deterministic():
    partition = yesterday()
    for name in ("truncated_gzip.jsonl.gz", "csv_quoted_newlines.csv"):
        assert case_bytes(name, partition) == case_bytes(name, partition)
