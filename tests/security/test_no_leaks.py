"""Nothing personal and no secret in logs, XCom, rendered templates or exception messages.

Runs ``tiktok_conversions`` and then ``ats_envelope_refresh`` against the stand-in over real HTTP,
on a generated partition whose every envelope, device id, client IP and consent string is unique,
with the unhappy paths switched on (an invalid record carrying identifiers, a batch refused with
400, an envelope refresh answering ``err``). It then collects

* everything written to stdout / stderr (captured by pytest) and every log record,
* every file under ``$AIRFLOW_HOME/logs`` (task logs, when Airflow writes them there),
* every XCom value and every rendered template field in the metadata database,

and searches all of it for the ATS configuration ID and each identifier.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from pathlib import Path

import pytest

from capi_devtools.liveramp_standin import _refreshed_envelope
from tests.support.conversions_run import configure_pipeline, output_jsonl, yesterday
from tests.support.fault_support import run_dag_once, write_partition

pytestmark = pytest.mark.airflow

DAY = 86_400


def _metadata_texts(airflow_home: Path) -> list[str]:
    texts: list[str] = []
    with sqlite3.connect(airflow_home / "airflow.db") as db:
        for table, column in (("xcom", "value"), ("rendered_task_instance_fields", "rendered_fields"),
                              ("dag_run", "conf"), ("task_instance", "rendered_map_index")):
            try:
                rows = db.execute(f"SELECT {column} FROM {table}").fetchall()
            except sqlite3.OperationalError:
                continue
            texts.extend(str(value) for (value,) in rows if value is not None)
    return texts


def _log_files(airflow_home: Path) -> list[str]:
    folder = airflow_home / "logs"
    if not folder.exists():
        return []
    return [p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file()]


def test_no_secret_or_identifier_in_logs_xcom_or_rendered_fields(airflow_db, standin, tmp_path, monkeypatch, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    partition = yesterday()
    generated = write_partition(tmp_path / "landing", partition, users=16, seed=31, files=1)
    # Envelopes issued 27 days ago: the refresh DAG will find every one of them due.
    issued = int(time.time()) - 27 * DAY
    path = generated.folder / "events-0.jsonl"
    events = [json.loads(line) for line in path.read_text().splitlines()]
    for event in events:
        event["envelope_issued_at"] = issued
    # One invalid record full of identifiers (an unknown event type) and a refused batch.
    bad = dict(events[0], event_id="leak-probe", event_type="NotAnEvent")
    path.write_text("".join(json.dumps(e) + "\n" for e in [*events, bad]))
    refused = events[5]["event_id"]
    configure_pipeline(monkeypatch, tmp_path, standin)
    standin.config(reject_event_ids=[refused], refresh_err_ivs=[events[-1]["user_data"]["partner_id"]])

    assert run_dag_once(partition) == "failed"  # the refused batch fails the run, as it should
    failed = output_jsonl(tmp_path, partition, "failed.jsonl")
    assert failed and failed[0]["http_status"] == 400

    refresh_extra = {"pid": "pid-security", "origin": "https://shop.example", "concurrency": 4, "timeout_seconds": 3,
                     "max_attempts": 2, "backoff_base_seconds": 0.01, "backoff_max_seconds": 0.02}
    monkeypatch.setenv("AIRFLOW_CONN_LIVERAMP_ENVELOPE_DEFAULT",
                       json.dumps({"conn_type": "liveramp_envelope", "host": standin.url, "extra": refresh_extra}))
    monkeypatch.setenv("AIRFLOW_VAR_CAPI_ENVELOPE_REFRESH_MAX_FAILURE_RATIO", "1.0")
    assert run_dag_once(None, dag_id="ats_envelope_refresh") == "success"
    calls = standin.refresh_calls()
    assert calls, "the refresh DAG must have called the stand-in for this test to mean anything"

    secrets = {standin.config_id, *generated.identifiers()}
    secrets |= {_refreshed_envelope(envelope) for envelope in generated.envelopes}
    captured = capfd.readouterr()
    airflow_home = Path(os.environ["AIRFLOW_HOME"])
    haystacks = {
        "stdout": [captured.out],
        "stderr": [captured.err],
        "log records": [record.getMessage() for record in caplog.records]
        + [str(record.exc_info[1]) for record in caplog.records if record.exc_info],
        "task log files": _log_files(airflow_home),
        "metadata DB (XCom, rendered fields, run conf)": _metadata_texts(airflow_home),
    }
    # The task logs really are in the haystack (else the search would be vacuous): the send task's
    # per-shard line and the refresh DAG's report are there.
    everything = "\n".join(t for texts in haystacks.values() for t in texts)
    assert "Shard 0:" in everything and "ats_envelope_refresh" in everything
    leaks = [
        f"{where}: {secret[:12]}..."
        for where, texts in haystacks.items()
        for text in texts
        for secret in secrets
        if secret in text
    ]
    assert not leaks, leaks[:20]
