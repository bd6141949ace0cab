"""The envelope refresh (plan, slices over real HTTP to the stand-in, report) and the claim, without Airflow."""

from __future__ import annotations

import json
import random
import time

import pytest

from liveramp_capi.delivery.refresh import EnvelopeRefresher
from liveramp_capi.delivery.settings import CapiSettings
from liveramp_capi.domain.consent import DAY_SECONDS, Consent
from liveramp_capi.domain.envelopes import EnvelopeRecord
from liveramp_capi.pipeline.claim import claim_partition
from liveramp_capi.pipeline.config import ClaimConfig, RefreshPlanConfig, RefreshReportConfig, SettingError
from liveramp_capi.pipeline.errors import PermanentStepFailure
from liveramp_capi.pipeline.refresh import plan_refresh, refresh_envelopes, report_refresh
from liveramp_capi.storage import RefreshFolder
from tests.pipeline.pipeline_support import PARTITION, LeaseOwnership

TCF = Consent(ct=4, cv="CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA")
FAST = CapiSettings(concurrency=8, timeout_seconds=3, max_attempts=3, backoff_base_seconds=0.01,
                    backoff_max_seconds=0.05, verify_tls=True)


def seed(store, now: int) -> None:
    """Three rows due (at most a third of 30 days left), one fresh, one without consent but due."""
    store.upsert([
        *(EnvelopeRecord(f"due-{i}", f"E-due-{i}", now - 25 * DAY_SECONDS, TCF, "203.0.113.7") for i in range(3)),
        EnvelopeRecord("fresh", "E-fresh", now - DAY_SECONDS, TCF, "203.0.113.7"),
        EnvelopeRecord("no-consent", "E-none", now - 12 * DAY_SECONDS, None, "203.0.113.7"),
    ], now=now)


def test_plan_refresh_and_report_a_run(standin, roots, envelope_store) -> None:
    seed(envelope_store, int(time.time()))
    folder = RefreshFolder(roots["output_root"], "2026-11-21")

    plan = plan_refresh(RefreshPlanConfig.parse({}), folder, envelope_store)

    assert plan.plan["remaining_share"] == pytest.approx(1 / 3)
    assert (plan.plan["due"], plan.plan["due_without_consent"]) == (4, 1)
    assert [task.as_kwargs()["slice_index"] for task in plan.slices] == [0]
    assert folder.read_json(folder.layout.plan) == plan.plan

    refresher = EnvelopeRefresher(standin.url, "pid-123", FAST, rng=random.Random(1))
    done = refresh_envelopes(plan.slices[0], folder, envelope_store, refresher.refresh_sync)

    assert (done.result["selected"], done.result["refreshed"], done.result["skipped_consent"]) == (4, 3, 1)
    assert len(standin.refresh_calls()) == 3
    summary = report_refresh(RefreshReportConfig.parse({}), folder, envelope_store, run_id="scheduled__1")
    assert (summary["status"], summary["refreshed"], summary["failed"]) == ("complete", 3, 0)
    assert json.loads((folder.output_dir / "summary.json").read_text()) == summary
    # A rerun of the day finds nothing due but the row without consent.
    assert plan_refresh(RefreshPlanConfig.parse({}), folder, envelope_store).plan["due"] == 1


def test_report_fails_when_a_slice_did_not_report(roots, envelope_store) -> None:
    folder = RefreshFolder(roots["output_root"], "2026-11-21")
    with pytest.raises(PermanentStepFailure, match="the plan step did not finish"):
        report_refresh(RefreshReportConfig.parse({}), folder, envelope_store, run_id=None)
    plan_refresh(RefreshPlanConfig.parse({"slices": "2"}), folder, envelope_store)
    with pytest.raises(PermanentStepFailure, match=r"incomplete: slices \[0, 1\] did not report"):
        report_refresh(RefreshReportConfig.parse({}), folder, envelope_store, run_id=None)


def test_refresh_settings_are_checked_with_their_variable() -> None:
    with pytest.raises(SettingError, match=r"remaining_share \(Variable capi_envelope_refresh_remaining_share\)"):
        RefreshPlanConfig.parse({"remaining_share": "1.5"})
    with pytest.raises(SettingError, match=r"max_failure_ratio \(Variable capi_envelope_refresh_max_failure_ratio\)"):
        RefreshReportConfig.parse({"max_failure_ratio": "ten"})


def test_claim_waits_for_the_other_run_then_gives_up_naming_it(storage, lease) -> None:
    LeaseOwnership(lease, "dag/other-run").claim()
    waits: list[float] = []

    def nap(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    config = ClaimConfig.parse({"wait_minutes": "0.005", "poll_seconds": "0.1"})

    with pytest.raises(PermanentStepFailure, match="dag/other-run.*gave up after waiting"):
        claim_partition(config, storage, LeaseOwnership(lease, "dag/run-1"), sleep=nap)
    assert waits and set(waits) == {0.1}

    lease.release(PARTITION, "dag/other-run")
    claimed = claim_partition(config, storage, LeaseOwnership(lease, "dag/run-1"), sleep=nap)
    assert claimed.partition == PARTITION and claimed.removed_runs == []


def test_claim_removes_other_runs_work_but_keeps_their_summaries(tmp_path, roots, storage, lease) -> None:
    other = tmp_path / "output" / f"dt={PARTITION}" / "_work" / "other-run"
    (other / "shards").mkdir(parents=True)
    (other / "shards" / "shard-00000.jsonl").write_text("{}\n")
    (other / "summary.json").write_text("{}\n")
    config = ClaimConfig.parse({})

    claimed = claim_partition(config, storage, LeaseOwnership(lease, "dag/run-1"))

    assert claimed.removed_runs == ["other-run"]
    assert (other / "summary.json").exists() and not (other / "shards").exists()
    dry = ClaimConfig.parse({"dry_run": True})
    assert (config.wait_seconds, config.poll_seconds, dry.dry_run) == (3600, 15, True)
