"""Recover held conversions: adapter of :func:`liveramp_capi.pipeline.recover.recover_held`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from liveramp_capi.operators.config_errors import permanent_config_errors
from liveramp_capi.pipeline.config import RecoverConfig
from liveramp_capi.storage import OutputFolder, PartitionStorage, RefreshFolder


class RecoverHeldConversionsOperator(BaseOperator):
    """Deliver held conversions whose user key now has a live envelope; mark those past the window lost.

    See :func:`liveramp_capi.pipeline.recover.recover_held`. Writes ``held_recovery.json``
    (counts only) into the conversions run's work folder (with ``partition``), or into the
    envelope refresh run's folder (with ``run_date``).

    :param output_root: URL of the output root (templated).
    :param max_event_age_days: the attribution window; older held events are lost (templated).
    :param partition: the conversions run's partition (templated): its own held events are
        counted by state in the result (``this_partition``); None in the refresh DAG.
    :param run_date: the envelope refresh run's date (templated); None in the conversions DAG.
    :param liveramp_capi_conn_id: the CAPI adapter connection.
    :param capi_state_conn_id: the state database connection.
    :param dry_run: do nothing (recovery sends and marks held events; a dry run does neither).
    """

    template_fields: Sequence[str] = ("output_root", "max_event_age_days", "partition", "run_date", "dry_run_setting")
    ui_color = "#fce8e6"

    def __init__(
        self,
        *,
        output_root: str,
        max_event_age_days: int | str | None = None,
        partition: str | None = None,
        run_date: str | None = None,
        liveramp_capi_conn_id: str = "liveramp_capi_default",
        capi_state_conn_id: str = "capi_state_default",
        dry_run: bool | str = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.output_root = output_root
        self.max_event_age_days = max_event_age_days
        self.partition = partition
        self.run_date = run_date
        self.liveramp_capi_conn_id = liveramp_capi_conn_id
        self.capi_state_conn_id = capi_state_conn_id
        # Not ``self.dry_run``: that name is BaseOperator's dry_run() method.
        self.dry_run_setting = dry_run

    def execute(self, context: Any) -> dict[str, Any]:
        from liveramp_capi.hooks.capi import LiveRampCapiHook
        from liveramp_capi.operators.state import state_database
        from liveramp_capi.pipeline.recover import recover_held

        with permanent_config_errors():
            config = RecoverConfig.parse({"max_event_age_days": self.max_event_age_days, "dry_run": self.dry_run_setting})
            folder, result_file, partition = self._result_target(context["run_id"])
        if config.dry_run:
            self.log.info("Dry run: held conversions are neither sent nor marked")
            return {"dry_run": True}
        with state_database(self.capi_state_conn_id, "recovered") as state:
            ledger = state.get_ledger()
            state.get_envelope_store()  # recovery reads the store's live envelopes
            held = state.get_held_conversions()
        capi = LiveRampCapiHook(liveramp_capi_conn_id=self.liveramp_capi_conn_id)
        result = recover_held(
            config, held, ledger, capi.send_batches, folder=folder, result_file=result_file,
            run_id=f"{context['run_id']}#{context['ti'].try_number}", partition=partition,
        )
        return result.brief()

    def _result_target(self, run_id: str) -> tuple[OutputFolder, str, str | None]:
        """Where the result goes: the conversions run's work folder, or the refresh run's folder."""
        if self.partition:
            storage = PartitionStorage(None, self.output_root, self.partition, run_id)
            return storage, storage.layout.held_recovery, storage.partition
        refresh = RefreshFolder(self.output_root, str(self.run_date))
        return refresh, refresh.layout.held_recovery, None
