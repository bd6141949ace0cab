"""Held conversions end to end: a conversion held for an expired envelope is delivered once by a later
partition that brings a fresh envelope for its user, and never again by reruns of either partition
(real ``dag.test()`` runs, the stand-in over HTTP, a real SQLite state database)."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.support.conversions_run import configure_pipeline, output_json, output_jsonl, run_conversions

pytestmark = pytest.mark.airflow

DAY = 86_400
USP = {"ct": 3, "cv": "1YNN"}
TCF = {"ct": 4, "cv": "CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA"}


def _stage(root: Path, partition: str, records: list[dict]) -> None:
    folder = root / "landing" / f"dt={partition}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "events.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "_SUCCESS").write_text("")


def _event(event_id: str, partition: str, envelope: str, user_key: str, issued_at: int, consent: dict) -> dict:
    event_time = int(dt.datetime.fromisoformat(partition).replace(tzinfo=dt.UTC).timestamp()) + 3600
    return {"event_manager": ["tiktok"], "event_id": event_id, "event_type": "Purchase", "event_time": event_time,
            "event_source_url": "https://shop.example/c", "user_data": {"partner_id": envelope},
            "user_key": user_key, "envelope_issued_at": issued_at, "consent": consent}


def _sent(standin) -> Counter[tuple[str, str]]:
    return Counter((e["event_id"], e["user_data"]["partner_id"]) for b in standin.received() for e in b["events"])


def test_a_held_conversion_is_won_back_once_by_a_later_partition(airflow_db, standin, tmp_path, monkeypatch):
    configure_pipeline(monkeypatch, tmp_path, standin)
    now = int(time.time())
    today = dt.datetime.now(dt.UTC).date()
    first, later = (today - dt.timedelta(days=2)).isoformat(), (today - dt.timedelta(days=1)).isoformat()
    # A Californian on a US Privacy string, envelope captured 20 days ago: 15 days apply, so it
    # has expired (the 30-day rule of old would have sent it dead).
    _stage(tmp_path, first, [
        _event("ev-held", first, "AgCaliforniaOldEnvelope", "u-back", now - 20 * DAY, USP),
        _event("ev-ok", first, "AgEuropeEnvelope", "u-eu", now - 20 * DAY, TCF),
    ])
    assert run_conversions(first) == "success"
    assert _sent(standin) == Counter({("ev-ok", "AgEuropeEnvelope"): 1})
    summary = output_json(tmp_path, first, "summary.json")
    assert (summary["delivered_events"], summary["envelope_expired_events"]) == (1, 1)
    [line] = output_jsonl(tmp_path, first, "envelope_expired.jsonl")
    assert (line["event_id"], line["held"]) == ("ev-held", "held")
    assert summary["held_conversions"]["this_partition"]["held"] == 1

    # The user comes back the next day: the later partition brings a fresh envelope.
    _stage(tmp_path, later, [_event("ev-new", later, "AgCaliforniaFreshEnvelope", "u-back", now - 3600, USP)])
    assert run_conversions(later) == "success"
    assert _sent(standin) == Counter({("ev-ok", "AgEuropeEnvelope"): 1, ("ev-new", "AgCaliforniaFreshEnvelope"): 1,
                                      ("ev-held", "AgCaliforniaFreshEnvelope"): 1})
    recovery = output_json(tmp_path, later, "summary.json")["held_conversions"]
    assert (recovery["recovered"], recovery["still_held"], recovery["totals"]["recovered"]) == (1, 0, 1)

    # Reruns of either partition send nothing again.
    for partition in (first, later, first):
        assert run_conversions(partition) == "success"
    assert sum(_sent(standin).values()) == 3
    summary = output_json(tmp_path, first, "summary.json")
    assert (summary["delivered_this_run"], summary["envelope_expired_events"]) == (0, 1)
    assert all(summary["checks"].values())
    [line] = output_jsonl(tmp_path, first, "envelope_expired.jsonl")
    assert (line["event_id"], line["held"]) == ("ev-held", "recovered")
    own = summary["held_conversions"]["this_partition"]
    assert (own["held"], own["recovered"], own["lost"]) == (0, 1, 0)
