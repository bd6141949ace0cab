"""Envelope refresh: plan the slices, refresh each slice, report the run.

A run writes under ``<output_root>/envelope_refresh/<date>/``: ``_work/plan.json`` (the selection
time and slice count), ``_work/slices/slice-NNNNN.json`` (per-slice counters) and
``summary.json``. Only counts are logged or passed through XCom; envelopes, consent strings and
IPs stay in the state database.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from liveramp_capi import metrics
from liveramp_capi.operators.config_errors import permanent_config_errors

#: Outcomes written to the store per call.
_STORE_GROUP = 256
_PLAN = "_work/plan.json"
_SLICES_DIR = "_work/slices"


def _slice_result(index: int) -> str:
    return f"{_SLICES_DIR}/slice-{index:05d}.json"


class _RunFolder:
    """``<output_root>/envelope_refresh/<run_date>/`` on object storage."""

    def __init__(self, output_root: str, run_date: str) -> None:
        from airflow.sdk import ObjectStoragePath

        from liveramp_capi.domain.partition import check_root, parse_partition

        self.run_date = parse_partition(run_date)
        self.folder = f"envelope_refresh/{self.run_date}"
        self.path = ObjectStoragePath(check_root(output_root, name="capi_output_root")) / self.folder

    def write_json(self, relative: str, value: Any) -> None:
        import json

        path = self.path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as stream:
            stream.write(json.dumps(value, indent=2, sort_keys=True).encode() + b"\n")

    def read_json(self, relative: str) -> Any:
        import json

        with (self.path / relative).open("rb") as stream:
            return json.loads(stream.read())

    def exists(self, relative: str) -> bool:
        return (self.path / relative).exists()

    def clear(self, relative_dir: str) -> None:
        folder = self.path / relative_dir
        if folder.exists():
            for child in folder.iterdir():
                if child.is_file():
                    child.unlink()


def _as_float(name: str, value: Any, low: float, high: float) -> float:
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise AirflowFailException(f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(result) and low <= result <= high):
        raise AirflowFailException(f"{name} must lie between {low:g} and {high:g}, got {value!r}")
    return result


def _store(conn_id: str) -> Any:
    from liveramp_capi.hooks.state import CapiStateHook

    hook = CapiStateHook(capi_state_conn_id=conn_id)
    with permanent_config_errors(conn_id), hook.opened("refreshed"):
        return hook.get_envelope_store()


class PlanEnvelopeRefreshOperator(BaseOperator):
    """Fix the run's selection time, mark expired rows, count what is due and split it into slices.

    Returns one kwargs dict per slice for ``RefreshEnvelopesOperator.partial(...).expand_kwargs``.

    :param run_date: the run's date, ``YYYY-MM-DD`` (templated; names the output folder).
    :param output_root: URL of the output root (templated).
    :param remaining_share: refresh an envelope once at most this share of its own lifetime is
        left (templated; default a third: a 15-day envelope from day 10, a 30-day one from day 20).
    :param slices: how many slice tasks share the work; 0 chooses from the due count (templated).
    :param rows_per_slice: target due rows per slice when ``slices`` is 0.
    :param max_slices: upper bound of the automatic slice count.
    :param capi_state_conn_id: the state database connection.
    """

    template_fields: Sequence[str] = ("run_date", "output_root", "remaining_share", "slices")
    ui_color = "#e8f0fe"

    def __init__(
        self,
        *,
        run_date: str,
        output_root: str,
        remaining_share: float | str = 1 / 3,
        slices: int | str = 0,
        rows_per_slice: int = 50_000,
        max_slices: int = 64,
        capi_state_conn_id: str = "capi_state_default",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.run_date = run_date
        self.output_root = output_root
        self.remaining_share = remaining_share
        self.slices = slices
        self.rows_per_slice = rows_per_slice
        self.max_slices = max_slices
        self.capi_state_conn_id = capi_state_conn_id

    def execute(self, context: Any) -> list[dict[str, Any]]:
        share = _as_float("remaining_share", self.remaining_share, 0.01, 0.99)
        requested = int(_as_float("slices", self.slices, 0, 1024))
        with permanent_config_errors():
            folder = _RunFolder(self.output_root, self.run_date)
        store = _store(self.capi_state_conn_id)
        as_of = int(time.time())
        newly_expired = store.mark_expired_by_state(now=as_of)
        metrics.envelopes_expired(sum(newly_expired.values()))
        due = store.count_due(now=as_of, remaining_share=share)
        if requested:
            slices = requested
        else:
            slices = max(1, min(self.max_slices, -(-due["due"] // self.rows_per_slice)))
        plan = {
            "run_date": folder.run_date,
            "as_of": as_of,
            "remaining_share": share,
            "lifetime_rule": store.lifetime_rule.value,
            "slices": slices,
            "due": due["due"],
            "due_without_consent": due["consent_missing"],
            "newly_expired": sum(newly_expired.values()),
            "newly_expired_by_state": newly_expired,
            "store_rows_by_state": store.counts_by_state(),
        }
        # A rerun of the day starts clean: slice results of an earlier try would be double counted.
        folder.clear(_SLICES_DIR)
        folder.write_json(_PLAN, plan)
        self.log.info(
            "Envelope refresh %s: %d rows due (at most %.0f%% of their lifetime left; %d without consent), "
            "%d found already expired %s, %d slices",
            folder.run_date,
            due["due"],
            share * 100,
            due["consent_missing"],
            sum(newly_expired.values()),
            newly_expired,
            slices,
        )
        return [
            {"slice_index": index, "slices": slices, "as_of": as_of, "remaining_share": share}
            for index in range(slices)
        ]


class RefreshEnvelopesOperator(BaseOperator):
    """Refresh one slice of the due envelopes through ``liveramp_envelope_default``.

    Pages through the slice's rows (keyset, bounded memory), refreshes them with many requests
    in flight, and records each outcome in the store: a new envelope, issue time and expiry; or
    the failure reason, keeping the old envelope. Rows without consent are counted, never sent.

    :param slice_index: this task's slice (from the plan).
    :param slices: how many slices the run has.
    :param as_of: the run's selection time (Unix seconds).
    :param remaining_share: the plan's selection share.
    :param run_date: the run's date (templated).
    :param output_root: URL of the output root (templated).
    :param page_size: rows per store page.
    :param liveramp_envelope_conn_id: the envelope API connection.
    :param capi_state_conn_id: the state database connection.
    """

    template_fields: Sequence[str] = ("run_date", "output_root")
    ui_color = "#e6f4ea"

    def __init__(
        self,
        *,
        slice_index: int,
        slices: int,
        as_of: int,
        remaining_share: float,
        run_date: str,
        output_root: str,
        page_size: int = 1000,
        liveramp_envelope_conn_id: str = "liveramp_envelope_default",
        capi_state_conn_id: str = "capi_state_default",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.slice_index = slice_index
        self.slices = slices
        self.as_of = as_of
        self.remaining_share = remaining_share
        self.run_date = run_date
        self.output_root = output_root
        self.page_size = page_size
        self.liveramp_envelope_conn_id = liveramp_envelope_conn_id
        self.capi_state_conn_id = capi_state_conn_id

    def execute(self, context: Any) -> dict[str, Any]:
        from collections.abc import Iterator

        from liveramp_capi.domain.envelopes import RefreshResult, StoredEnvelope
        from liveramp_capi.hooks.envelope import LiveRampEnvelopeHook

        index, slices, as_of = int(self.slice_index), int(self.slices), int(self.as_of)
        with permanent_config_errors():
            folder = _RunFolder(self.output_root, self.run_date)
        store = _store(self.capi_state_conn_id)
        hook = LiveRampEnvelopeHook(liveramp_envelope_conn_id=self.liveramp_envelope_conn_id)
        # A missing connection or pid fails here, at once: no retry can create it.
        with permanent_config_errors(self.liveramp_envelope_conn_id):
            hook.get_refresh_config()

        selected = 0
        refreshed: list[RefreshResult] = []
        failed: list[RefreshResult] = []

        def rows() -> Iterator[StoredEnvelope]:
            nonlocal selected
            for page in store.iter_due(
                now=as_of,
                remaining_share=float(self.remaining_share),
                slice_index=index,
                slices=slices,
                page_size=self.page_size,
            ):
                selected += len(page)
                yield from page

        def flush() -> None:
            now = int(time.time())
            if refreshed:
                store.record_refreshed(refreshed, now=now)
                refreshed.clear()
            if failed:
                store.record_failed(failed, now=now)
                failed.clear()

        def on_outcome(outcome: Any) -> None:
            if outcome.skipped:
                return
            if outcome.refreshed:
                refreshed.append(RefreshResult(outcome.row, new_envelope=outcome.envelope))
            else:
                failed.append(RefreshResult(outcome.row, reason=outcome.reason))
            if len(refreshed) + len(failed) >= _STORE_GROUP:
                flush()

        try:
            stats = hook.refresh(rows(), on_outcome)
        finally:
            # Whatever happened, what was learnt reaches the store.
            flush()
        metrics.envelopes_refreshed(stats)
        result = {
            "slice": index,
            "slices": slices,
            "selected": selected,
            **stats.as_dict(),
        }
        folder.write_json(_slice_result(index), result)
        self.log.info(
            "Slice %d/%d: %d selected, %d refreshed, %d failed %s, %d skipped for consent; %d requests, %d retries "
            "in %.1f s (%.0f requests/s)",
            index,
            slices,
            selected,
            stats.refreshed,
            stats.failed,
            stats.failed_by_reason,
            stats.skipped_consent,
            stats.requests,
            stats.retries,
            stats.elapsed_seconds,
            stats.requests_per_second,
        )
        return {k: result[k] for k in ("slice", "selected", "refreshed", "failed", "skipped_consent")}


class ReportEnvelopeRefreshOperator(BaseOperator):
    """Write the run's ``summary.json``, log its counts, fail above the failure share.

    Refreshed and failed counts are read from the store (rows attempted since the plan's
    selection time), so a retried slice is neither lost nor counted twice; consent-less rows
    come from the slice results.

    :param run_date: the run's date (templated).
    :param output_root: URL of the output root (templated).
    :param max_failure_ratio: largest share of failed refreshes among attempted ones (templated).
    :param capi_state_conn_id: the state database connection.
    """

    template_fields: Sequence[str] = ("run_date", "output_root", "max_failure_ratio")
    ui_color = "#f3e8fd"

    def __init__(
        self,
        *,
        run_date: str,
        output_root: str,
        max_failure_ratio: float | str = 0.1,
        capi_state_conn_id: str = "capi_state_default",
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("trigger_rule", "all_done")
        super().__init__(**kwargs)
        self.run_date = run_date
        self.output_root = output_root
        self.max_failure_ratio = max_failure_ratio
        self.capi_state_conn_id = capi_state_conn_id

    def execute(self, context: Any) -> dict[str, Any]:
        import json

        from liveramp_capi.domain.held import HELD_RECOVERY_FILE
        from liveramp_capi.domain.refresh_summary import build_refresh_summary

        max_ratio = _as_float("max_failure_ratio", self.max_failure_ratio, 0, 1)
        with permanent_config_errors():
            folder = _RunFolder(self.output_root, self.run_date)
        if not folder.exists(_PLAN):
            raise AirflowFailException(f"{folder.folder}: the plan step did not finish; nothing was refreshed")
        plan = folder.read_json(_PLAN)
        results = [
            folder.read_json(_slice_result(index))
            for index in range(int(plan["slices"]))
            if folder.exists(_slice_result(index))
        ]
        store = _store(self.capi_state_conn_id)
        attempts = store.attempts_since(int(plan["as_of"]))
        summary = build_refresh_summary(plan, results, attempts, max_failure_ratio=max_ratio)
        summary["run_id"] = context.get("run_id")
        if folder.exists(HELD_RECOVERY_FILE):
            summary["held_conversions"] = folder.read_json(HELD_RECOVERY_FILE)
        folder.write_json("summary.json", summary)
        self.log.info("Envelope refresh %s summary: %s", folder.run_date, json.dumps(summary, sort_keys=True))
        if summary["status"] == "failure_ratio_exceeded":
            raise AirflowFailException(
                f"{summary['failed']} of {summary['attempted']} envelope refreshes failed "
                f"({summary['failure_ratio']:.1%}), more than max_failure_ratio {max_ratio:.1%}; "
                f"see {folder.folder}/summary.json (failed_by_reason)"
            )
        if summary["status"] != "complete":
            raise AirflowFailException(
                f"envelope refresh {folder.run_date} is incomplete: slices {summary['slices']['missing']} did not "
                "report; a rerun refreshes what is still due"
            )
        return {k: summary[k] for k in ("status", "selected", "refreshed", "failed", "skipped_consent")}
