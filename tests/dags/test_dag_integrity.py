"""Every DAG file imports cleanly and carries what operations rely on: tags, owner, retries, docs."""

from __future__ import annotations

import ast
import datetime as dt
from pathlib import Path

import pytest

DAGS_DIR = Path(__file__).resolve().parents[2] / "dags"
DAG_FILES = sorted(DAGS_DIR.glob("*.py"))
EXPECTED_DAGS = {"tiktok_conversions", "tiktok_conversions_hourly", "ats_envelope_refresh"}


@pytest.fixture(scope="module")
def dag_bag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS_DIR))


def test_dag_files_import_without_errors(dag_bag) -> None:
    assert dag_bag.import_errors == {}, dag_bag.import_errors


def test_expected_dags_are_present(dag_bag) -> None:
    assert EXPECTED_DAGS <= set(dag_bag.dag_ids)


@pytest.mark.parametrize("dag_id", sorted(EXPECTED_DAGS))
def test_dag_has_tags_owner_retries_and_docs(dag_bag, dag_id: str) -> None:
    dag = dag_bag.get_dag(dag_id)
    assert dag.tags, "every DAG needs tags for filtering in the UI"
    assert dag.doc_md and len(dag.doc_md) > 100
    for task in dag.tasks:
        assert task.owner and task.owner != "airflow", f"{task.task_id} has no owner"
        assert task.retries >= 1, f"{task.task_id} must retry at least once"


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_dag_files_do_no_work_at_top_level(path: Path) -> None:
    """Only imports, constants and the DAG definition: no Variable/Connection reads, no I/O."""
    tree = ast.parse(path.read_text())
    forbidden = {"Variable", "get_connection", "open", "requests", "create_engine", "ObjectStoragePath"}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef)):
            continue
        for sub in ast.walk(node):
            name = getattr(sub, "id", None) or getattr(sub, "attr", None)
            assert name not in forbidden, f"{path.name}:{getattr(sub, 'lineno', '?')} uses {name} at top level"


def test_partition_param_refuses_anything_but_a_date(dag_bag) -> None:
    from airflow.sdk.definitions.param import ParamValidationError

    dag = dag_bag.get_dag("tiktok_conversions")
    param = dag.params.get_param("partition")
    assert param.resolve("2026-11-20") == "2026-11-20"
    for bad in ["../etc", "2026-11-20/../../x", "20261120", "s3://bucket/x", "2026-11-20 "]:
        with pytest.raises(ParamValidationError):
            param.resolve(bad)


def test_hourly_partition_param_takes_an_hour_and_nothing_else(dag_bag) -> None:
    from airflow.sdk.definitions.param import ParamValidationError

    dag = dag_bag.get_dag("tiktok_conversions_hourly")
    param = dag.params.get_param("partition")
    assert param.resolve("2026-11-20T13") == "2026-11-20T13"
    for bad in ["2026-11-20", "2026-11-20T1", "2026-11-20T13:00", "../2026-11-20T13", "2026-11-20t13"]:
        with pytest.raises(ParamValidationError):
            param.resolve(bad)


@pytest.mark.parametrize(
    ("dag_id", "key"), [("tiktok_conversions", "2026-11-20"), ("tiktok_conversions_hourly", "2026-11-20T13")]
)
def test_both_granularities_are_one_pipeline_keyed_by_their_partition(dag_bag, dag_id: str, key: str) -> None:
    """Same tasks in the same order, a dry_run param off by default, and a timetable that names
    partitions the way the pipeline parses them."""
    from liveramp_capi.domain.partition import parse_partition

    daily = dag_bag.get_dag("tiktok_conversions")
    dag = dag_bag.get_dag(dag_id)
    assert [t.task_id for t in dag.tasks] == [t.task_id for t in daily.tasks]
    assert dag.params.get_param("dry_run").resolve() is False
    # What a backfill of that one day or hour creates: one run, keyed as the pipeline parses it.
    from airflow.serialization.encoders import coerce_to_core_timetable

    timetable = coerce_to_core_timetable(dag.timetable)
    start = dt.datetime.strptime(key, dag.timetable.key_format).replace(tzinfo=dt.UTC)
    end = start + (dt.timedelta(hours=1) if "T" in key else dt.timedelta(days=1)) - dt.timedelta(seconds=1)
    runs = list(timetable.iter_partition_dagrun_infos(earliest=start, latest=end))
    assert [run.partition_key for run in runs] == [key]
    assert parse_partition(runs[0].partition_key) == key
