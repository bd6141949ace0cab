"""Envelope refresh operators: adapters of :mod:`liveramp_capi.pipeline.refresh` (plan, refresh slices, report)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from liveramp_capi import metrics
from liveramp_capi.operators.config_errors import permanent_config_errors, step_failures
from liveramp_capi.pipeline.config import RefreshPlanConfig, RefreshReportConfig
from liveramp_capi.storage import RefreshFolder

if TYPE_CHECKING:
    # Only a type here: the store (SQLAlchemy tables) is imported when a task runs, not at DAG parse.
    from liveramp_capi.state.envelope_store import EnvelopeStore


@contextmanager
def _run_folder_and_store(output_root: str, run_date: str, conn_id: str) -> Iterator[tuple[RefreshFolder, EnvelopeStore]]:
    """The run's folder and the envelope store; a failed step fails the task (permanently where no retry helps)."""
    from liveramp_capi.operators.state import state_database

    with permanent_config_errors():
        folder = RefreshFolder(output_root, run_date)
    with state_database(conn_id, "refreshed") as state:
        store = state.get_envelope_store()
    with step_failures():
        yield folder, store


class PlanEnvelopeRefreshOperator(BaseOperator):
    """Fix the run's selection time, mark expired rows, count what is due and split it into slices.

    See :func:`liveramp_capi.pipeline.refresh.plan_refresh`. Returns one kwargs dict per slice for ``RefreshEnvelopesOperator.partial(...).expand_kwargs``.

    :param run_date: the run's date, ``YYYY-MM-DD`` (templated; names the output folder).
    :param output_root: URL of the output root (templated).
    :param remaining_share: refresh an envelope once at most this share of its own lifetime is
        left (templated; None: the default of :data:`~liveramp_capi.pipeline.config.SETTINGS`, a
        third: a 15-day envelope from day 10, a 30-day one from day 20).
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
        remaining_share: float | str | None = None,
        slices: int | str | None = None,
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
        from liveramp_capi.pipeline.refresh import plan_refresh

        with permanent_config_errors():
            config = RefreshPlanConfig.parse(
                {"remaining_share": self.remaining_share, "slices": self.slices,
                 "rows_per_slice": self.rows_per_slice, "max_slices": self.max_slices}
            )
        with _run_folder_and_store(self.output_root, self.run_date, self.capi_state_conn_id) as (folder, store):
            plan = plan_refresh(config, folder, store)
        metrics.envelopes_expired(plan.newly_expired)
        return [task.as_kwargs() for task in plan.slices]


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
        from liveramp_capi.hooks.envelope import LiveRampEnvelopeHook
        from liveramp_capi.pipeline.refresh import RefreshSlice, refresh_envelopes

        task = RefreshSlice(int(self.slice_index), int(self.slices), int(self.as_of), float(self.remaining_share))
        hook = LiveRampEnvelopeHook(liveramp_envelope_conn_id=self.liveramp_envelope_conn_id)
        with _run_folder_and_store(self.output_root, self.run_date, self.capi_state_conn_id) as (folder, store):
            # A missing connection or pid fails here, at once: no retry can create it.
            with permanent_config_errors(self.liveramp_envelope_conn_id):
                hook.get_refresh_config()
            done = refresh_envelopes(task, folder, store, hook.refresh, page_size=self.page_size)
        metrics.envelopes_refreshed(done.stats)
        return {k: done.result[k] for k in ("slice", "selected", "refreshed", "failed", "skipped_consent")}


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
        max_failure_ratio: float | str | None = None,
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
        from liveramp_capi.pipeline.refresh import report_refresh

        with permanent_config_errors():
            config = RefreshReportConfig.parse({"max_failure_ratio": self.max_failure_ratio})
        with _run_folder_and_store(self.output_root, self.run_date, self.capi_state_conn_id) as (folder, store):
            summary = report_refresh(config, folder, store, run_id=context.get("run_id"))
        return {k: summary[k] for k in ("status", "selected", "refreshed", "failed", "skipped_consent")}
