"""Envelope refresh: plan the slices, refresh each slice, report the run.

A run writes under ``<output_root>/envelope_refresh/<date>/`` (:class:`~liveramp_capi.storage.layout.RefreshLayout`):
the plan (selection time and slice count), per-slice counters and ``summary.json``. Only counts
are logged or returned; envelopes, consent strings and IPs stay in the state database.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from liveramp_capi.domain.envelopes import RefreshResult, StoredEnvelope
from liveramp_capi.domain.refresh_summary import build_refresh_summary
from liveramp_capi.pipeline.config import RefreshPlanConfig, RefreshReportConfig
from liveramp_capi.pipeline.errors import PermanentStepFailure

if TYPE_CHECKING:
    from liveramp_capi.delivery.refresh import RefreshOutcome, RefreshStats
    from liveramp_capi.state.envelope_store import EnvelopeStore
    from liveramp_capi.storage import RefreshFolder

#: Outcomes written to the store per call.
_STORE_GROUP = 256

_LOG = logging.getLogger(__name__)

#: Refreshes rows through LiveRamp's envelope API, calling back once per row (the hook's ``refresh``).
Refresher = Callable[[Iterable[StoredEnvelope], Callable[["RefreshOutcome"], None]], "RefreshStats"]


@dataclass(frozen=True, slots=True)
class RefreshSlice:
    """One slice task's share of a run's due rows: what the plan hands each refresh task."""

    slice_index: int
    slices: int
    as_of: int
    remaining_share: float

    def as_kwargs(self) -> dict[str, Any]:
        """The refresh operator's arguments (``expand_kwargs``)."""
        return {"slice_index": self.slice_index, "slices": self.slices, "as_of": self.as_of,
                "remaining_share": self.remaining_share}


@dataclass(frozen=True, slots=True)
class RefreshPlan:
    """The run's plan (written as ``_work/plan.json``) and its slices."""

    plan: dict[str, Any]
    slices: list[RefreshSlice]
    newly_expired: int


def plan_refresh(config: RefreshPlanConfig, folder: RefreshFolder, store: EnvelopeStore) -> RefreshPlan:
    """Fix the run's selection time, mark expired rows, count what is due and split it into slices."""
    as_of = int(time.time())
    newly_expired = store.mark_expired_by_state(now=as_of)
    due = store.count_due(now=as_of, remaining_share=config.remaining_share)
    slices = config.slices or max(1, min(config.max_slices, -(-due["due"] // config.rows_per_slice)))
    expired = sum(newly_expired.values())
    plan = {
        "run_date": folder.run_date,
        "as_of": as_of,
        "remaining_share": config.remaining_share,
        "lifetime_rule": store.lifetime_rule.value,
        "slices": slices,
        "due": due["due"],
        "due_without_consent": due["consent_missing"],
        "newly_expired": expired,
        "newly_expired_by_state": newly_expired,
        "store_rows_by_state": store.counts_by_state(),
    }
    # A rerun of the day starts clean: slice results of an earlier try would be double counted.
    folder.clear(folder.layout.slices_dir)
    folder.write_json(folder.layout.plan, plan)
    _LOG.info(
        "Envelope refresh %s: %d rows due (at most %.0f%% of their lifetime left; %d without consent), "
        "%d found already expired %s, %d slices",
        folder.run_date, due["due"], config.remaining_share * 100, due["consent_missing"], expired,
        newly_expired, slices,
    )
    tasks = [RefreshSlice(index, slices, as_of, config.remaining_share) for index in range(slices)]
    return RefreshPlan(plan, tasks, expired)


class _OutcomeWriter:
    """Writes refresh outcomes to the store in groups, counting the rows selected on the way."""

    def __init__(self, store: EnvelopeStore) -> None:
        self.store = store
        self.selected = 0
        self.refreshed: list[RefreshResult] = []
        self.failed: list[RefreshResult] = []

    def rows(self, pages: Iterable[list[StoredEnvelope]]) -> Iterator[StoredEnvelope]:
        for page in pages:
            self.selected += len(page)
            yield from page

    def on_outcome(self, outcome: RefreshOutcome) -> None:
        if outcome.skipped:
            return
        if outcome.refreshed:
            self.refreshed.append(RefreshResult(outcome.row, new_envelope=outcome.envelope))
        else:
            self.failed.append(RefreshResult(outcome.row, reason=outcome.reason))
        if len(self.refreshed) + len(self.failed) >= _STORE_GROUP:
            self.flush()

    def flush(self) -> None:
        now = int(time.time())
        if self.refreshed:
            self.store.record_refreshed(self.refreshed, now=now)
            self.refreshed.clear()
        if self.failed:
            self.store.record_failed(self.failed, now=now)
            self.failed.clear()


@dataclass(frozen=True, slots=True)
class SliceResult:
    """One slice's counters (written as its slice result) and the refresher's statistics."""

    result: dict[str, Any]
    stats: RefreshStats


def refresh_envelopes(
    task: RefreshSlice, folder: RefreshFolder, store: EnvelopeStore, refresh: Refresher, *, page_size: int = 1000
) -> SliceResult:
    """Refresh one slice of the due rows; each outcome reaches the store (new envelope, or failure reason).

    Pages through the slice's rows (keyset, bounded memory); rows without consent are counted,
    never sent.
    """
    writer = _OutcomeWriter(store)
    pages = store.iter_due(now=task.as_of, remaining_share=task.remaining_share, slice_index=task.slice_index,
                           slices=task.slices, page_size=page_size)
    try:
        stats = refresh(writer.rows(pages), writer.on_outcome)
    finally:
        # Whatever happened, what was learnt reaches the store.
        writer.flush()
    result = {"slice": task.slice_index, "slices": task.slices, "selected": writer.selected, **stats.as_dict()}
    folder.write_json(folder.layout.slice_result(task.slice_index), result)
    _LOG.info(
        "Slice %d/%d: %d selected, %d refreshed, %d failed %s, %d skipped for consent; %d requests, %d retries "
        "in %.1f s (%.0f requests/s)",
        task.slice_index, task.slices, writer.selected, stats.refreshed, stats.failed, stats.failed_by_reason,
        stats.skipped_consent, stats.requests, stats.retries, stats.elapsed_seconds, stats.requests_per_second,
    )
    return SliceResult(result, stats)


def report_refresh(
    config: RefreshReportConfig, folder: RefreshFolder, store: EnvelopeStore, *, run_id: str | None
) -> dict[str, Any]:
    """Write the run's ``summary.json`` and return it; fail above the failure share or when slices are missing.

    Refreshed and failed counts are read from the store (rows attempted since the plan's
    selection time), so a retried slice is neither lost nor counted twice; consent-less rows
    come from the slice results.

    :raises PermanentStepFailure: when the plan did not finish, too many refreshes failed, or a
        slice did not report.
    """
    layout = folder.layout
    plan = folder.read_json_if_exists(layout.plan)
    if plan is None:
        raise PermanentStepFailure(f"{layout.folder}: the plan step did not finish; nothing was refreshed")
    results = [
        folder.read_json(layout.slice_result(index))
        for index in range(int(plan["slices"]))
        if folder.exists(layout.slice_result(index))
    ]
    attempts = store.attempts_since(int(plan["as_of"]))
    summary = build_refresh_summary(plan, results, attempts, max_failure_ratio=config.max_failure_ratio)
    summary["run_id"] = run_id
    if folder.exists(layout.held_recovery):
        summary["held_conversions"] = folder.read_json(layout.held_recovery)
    folder.write_json(layout.summary, summary)
    _LOG.info("Envelope refresh %s summary: %s", folder.run_date, json.dumps(summary, sort_keys=True))
    if summary["status"] == "failure_ratio_exceeded":
        raise PermanentStepFailure(
            f"{summary['failed']} of {summary['attempted']} envelope refreshes failed "
            f"({summary['failure_ratio']:.1%}), more than max_failure_ratio {config.max_failure_ratio:.1%}; "
            f"see {layout.folder}/{layout.summary} (failed_by_reason)"
        )
    if summary["status"] != "complete":
        raise PermanentStepFailure(
            f"envelope refresh {folder.run_date} is incomplete: slices {summary['slices']['missing']} did not "
            "report; a rerun refreshes what is still due"
        )
    return summary
