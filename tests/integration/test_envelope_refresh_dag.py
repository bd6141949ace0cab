"""``ats_envelope_refresh`` end to end (dag.test, the stand-in over HTTP, a real SQLite store), and
envelope resolution when ``tiktok_conversions`` sends."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import pytest

from liveramp_capi.domain.consent import DAY_SECONDS, Consent
from liveramp_capi.domain.envelopes import ACTIVE, CONSENT_MISSING, EXPIRED, REFRESH_FAILED, EnvelopeRecord
from liveramp_capi.state.database import make_engine
from liveramp_capi.state.envelope_store import EnvelopeStore
from tests.support.conversions_run import (
    configure_pipeline,
    output_json,
    output_jsonl,
    run_conversions,
    yesterday,
)

pytestmark = pytest.mark.airflow

TCF = Consent(ct=4, cv="CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA")
CALIFORNIA = Consent(gpp="DBABMA~CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA", gpp_sid="7,8")


def _store(root: Path) -> EnvelopeStore:
    store = EnvelopeStore(make_engine(f"sqlite:///{root / 'state.db'}"))
    store.ensure_schema()
    return store


def _configure_refresh(monkeypatch: pytest.MonkeyPatch, root: Path, standin, max_failure_ratio: str) -> None:
    extra = {"pid": "pid-test", "origin": "https://shop.example", "concurrency": 8, "timeout_seconds": 3,
             "max_attempts": 2, "backoff_base_seconds": 0.01, "backoff_max_seconds": 0.05}
    monkeypatch.setenv("AIRFLOW_CONN_LIVERAMP_ENVELOPE_DEFAULT",
                       json.dumps({"conn_type": "liveramp_envelope", "host": standin.url, "extra": extra}))
    monkeypatch.setenv("AIRFLOW_CONN_CAPI_STATE_DEFAULT", json.dumps({"conn_type": "sqlite", "host": str(root / "state.db")}))
    monkeypatch.setenv("AIRFLOW_VAR_CAPI_OUTPUT_ROOT", f"file://{root / 'output'}")
    monkeypatch.setenv("AIRFLOW_VAR_CAPI_ENVELOPE_REFRESH_MAX_FAILURE_RATIO", max_failure_ratio)
    monkeypatch.setenv("AIRFLOW_VAR_CAPI_ENVELOPE_REFRESH_SLICES", "3")


def _run_refresh() -> tuple[str, dict]:
    from airflow.dag_processing.dagbag import DagBag

    from capi_devtools import REPO

    bag = DagBag(dag_folder=str(REPO / "dags" / "ats_envelope_refresh.py"))
    assert not bag.import_errors, bag.import_errors
    dag_run = bag.get_dag("ats_envelope_refresh").test()
    return str(dag_run.state), {}


def test_refresh_dag_refreshes_due_rows_marks_failures_and_never_calls_without_consent(
    airflow_db, standin, tmp_path, monkeypatch
):
    now = int(time.time())
    life = 30 * DAY_SECONDS
    store = _store(tmp_path)
    due = now - life + 3 * DAY_SECONDS  # expires in 3 days
    store.upsert(
        [
            EnvelopeRecord("u-ok", "E-ok", due, TCF, "203.0.113.7"),
            EnvelopeRecord("u-ca", "E-ca", now - 12 * DAY_SECONDS, CALIFORNIA),  # 15-day life: 3 days left
            EnvelopeRecord("u-err", "E-err", due, TCF),
            EnvelopeRecord("u-400", "E-400", due, TCF),
            # No consent: the 15-day lifetime, 3 days left.
            EnvelopeRecord("u-noconsent", "E-noconsent", now - 12 * DAY_SECONDS, None),
            # US Privacy (ct=3): 15 days too; 20 days old, so found already expired.
            EnvelopeRecord("u-usp-dead", "E-usp-dead", now - 20 * DAY_SECONDS, Consent(ct=3, cv="1YNN")),
            EnvelopeRecord("u-later", "E-later", now - DAY_SECONDS, TCF),
            EnvelopeRecord("u-gone", "E-gone", now - life - 60, TCF),
        ]
        + [EnvelopeRecord(f"u-bulk-{i:03d}", f"E-bulk-{i:03d}", due + i, TCF) for i in range(40)],
        now=now,
    )
    standin.config(refresh_err_ivs=["E-err"], refresh_status_by_iv={"E-400": 400})
    _configure_refresh(monkeypatch, tmp_path, standin, "0.1")

    state, _ = _run_refresh()
    assert state == "success"

    rows = {key: store.get(key) for key in ("u-ok", "u-ca", "u-err", "u-400", "u-noconsent", "u-later", "u-gone")}
    for key in ("u-ok", "u-ca"):
        assert rows[key].state == ACTIVE and rows[key].envelope.startswith("R1.") and rows[key].issued_at >= now
    assert rows["u-ok"].expires_at == rows["u-ok"].issued_at + life
    assert rows["u-ca"].expires_at == rows["u-ca"].issued_at + 15 * DAY_SECONDS
    assert (rows["u-err"].state, rows["u-err"].reason, rows["u-err"].envelope) == (REFRESH_FAILED, "err entry", "E-err")
    assert (rows["u-400"].state, rows["u-400"].reason, rows["u-400"].envelope) == (REFRESH_FAILED, "HTTP 400", "E-400")
    assert (rows["u-noconsent"].state, rows["u-noconsent"].envelope) == (CONSENT_MISSING, "E-noconsent")
    assert (rows["u-later"].envelope, rows["u-later"].issued_at) == ("E-later", now - DAY_SECONDS)
    assert rows["u-gone"].state == EXPIRED
    assert all(store.get(f"u-bulk-{i:03d}").envelope.startswith("R1.") for i in range(40))

    calls = standin.refresh_calls()
    called = {call["iv"] for call in calls}
    assert called == {"E-ok", "E-ca", "E-err", "E-400"} | {f"E-bulk-{i:03d}" for i in range(40)}
    for call in calls:
        assert ("ct" in call and "cv" in call) or ("gpp" in call and "gpp_sid" in call), "a call without consent"

    run_date = dt.datetime.now(dt.UTC).date().isoformat()
    summary = json.loads((tmp_path / "output" / "envelope_refresh" / run_date / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert (summary["selected"], summary["refreshed"], summary["failed"], summary["skipped_consent"]) == (45, 42, 2, 1)
    assert summary["failed_by_reason"] == {"HTTP 400": 1, "err entry": 1}
    assert summary["slices"] == {"planned": 3, "reported": 3, "missing": []}
    # Stored as expired on arrival already, so this run marks none; the lifetime share is reported.
    assert summary["expired_when_found"] == 0 and summary["remaining_share"] == pytest.approx(1 / 3)
    assert store.get("u-usp-dead").state == EXPIRED
    assert summary["held_conversions"]["claimed"] == 0
    text = json.dumps(summary)
    assert "E-" not in text and "CPXx" not in text and "203.0.113" not in text


def test_refresh_dag_fails_above_the_failure_share(airflow_db, standin, tmp_path, monkeypatch):
    now = int(time.time())
    store = _store(tmp_path)
    due = now - 30 * DAY_SECONDS + DAY_SECONDS
    store.upsert([EnvelopeRecord(f"u{i}", f"E{i}", due, TCF) for i in range(4)], now=now)
    standin.config(refresh_err_ivs=["E0", "E1"])
    _configure_refresh(monkeypatch, tmp_path, standin, "0.25")
    state, _ = _run_refresh()
    assert state == "failed"
    assert store.counts_by_state() == {ACTIVE: 2, REFRESH_FAILED: 2}


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_send_uses_the_stores_fresher_envelope_and_holds_back_expired_ones(airflow_db, standin, tmp_path, monkeypatch):
    partition = yesterday()
    configure_pipeline(monkeypatch, tmp_path, standin)
    now = int(time.time())
    event_time = int(dt.datetime.fromisoformat(partition).replace(tzinfo=dt.UTC).timestamp()) + 3600
    expired_issue = now - 31 * DAY_SECONDS
    store = _store(tmp_path)
    store.upsert([EnvelopeRecord("u-fresh", "AgStoreFreshEnvelope", now - DAY_SECONDS, TCF)], now=now)

    def event(event_id: str, envelope: str, user_key: str) -> dict:
        return {"event_manager": ["tiktok"], "event_id": event_id, "event_type": "Purchase", "event_time": event_time,
                "event_source_url": "https://shop.example/c", "user_data": {"partner_id": envelope},
                "user_key": user_key, "envelope_issued_at": expired_issue, "consent": {"ct": 4, "cv": TCF.cv}}

    _write_jsonl(tmp_path / "landing" / f"dt={partition}" / "events.jsonl",
                 [event("ev-fresh", "AgOwnExpiredEnvelopeA", "u-fresh"),
                  event("ev-stale", "AgOwnExpiredEnvelopeB", "u-stale")])
    (tmp_path / "landing" / f"dt={partition}" / "_SUCCESS").write_text("")

    assert run_conversions(partition) == "success"
    sent = [e for b in standin.received() for e in b["events"]]
    assert [(e["event_id"], e["user_data"]["partner_id"]) for e in sent] == [("ev-fresh", "AgStoreFreshEnvelope")]
    summary = output_json(tmp_path, partition, "summary.json")
    assert (summary["valid"], summary["delivered_events"], summary["envelope_expired_events"]) == (2, 1, 1)
    assert summary["envelope_replaced_events"] == 1 and all(summary["checks"].values())
    [held] = output_jsonl(tmp_path, partition, "envelope_expired.jsonl")
    assert (held["event_id"], held["reason"]) == ("ev-stale", "envelope expired")
    # The expired record's own envelope did not replace the store's fresher one.
    assert store.get("u-fresh").envelope == "AgStoreFreshEnvelope"
    assert store.get("u-stale").state == EXPIRED


def test_forget_identity_cli_deletes_rows_and_prints_counts_only(tmp_path):
    import os
    import subprocess
    import sys

    now = int(time.time())
    store = _store(tmp_path)
    store.upsert([EnvelopeRecord("crm-secret-key", "AgSecretEnvelopeValue", now, TCF, "203.0.113.9"),
                  EnvelopeRecord("crm-other", "AgOther", now, TCF)], now=now)
    env = {**os.environ, "AIRFLOW_CONN_CAPI_STATE_DEFAULT": json.dumps({"conn_type": "sqlite", "host": str(tmp_path / "state.db")})}
    done = subprocess.run([sys.executable, "-m", "liveramp_capi.cli", "forget-identity", "--user-key", "crm-secret-key"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 envelope store row(s) and 0 held conversion(s) deleted" in done.stdout
    assert "crm-secret-key" not in done.stdout + done.stderr and "AgSecret" not in done.stdout + done.stderr
    assert store.get("crm-secret-key") is None and store.get("crm-other") is not None
