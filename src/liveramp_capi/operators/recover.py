"""Recover held conversions: deliver events held for an expired envelope once their user has a live one."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from liveramp_capi.operators.config_errors import permanent_config_errors

_SEGMENT_RE = re.compile(r"\A[A-Za-z0-9_=.\-]+\Z")


def _check_result_folder(folder: str) -> str:
    segments = [segment for segment in str(folder).strip().split("/") if segment]
    if not segments or any(s in {".", ".."} or not _SEGMENT_RE.match(s) for s in segments):
        raise AirflowFailException(
            "result_folder must be a relative folder of plain names (letters, digits, _ = . -), e.g. dt=2026-11-20"
        )
    return "/".join(segments)


class RecoverHeldConversionsOperator(BaseOperator):
    """Deliver held conversions whose user key now has a live envelope; mark those past the window lost.

    See :mod:`liveramp_capi.domain.recovery`. Held events are not this run's own events, so a
    transient failure does not fail the task: the events go back to waiting and a later pass
    tries again. Writes ``<output_root>/<result_folder>/held_recovery.json`` (counts only); with
    ``partition`` (the conversions DAG), into that run's work folder under ``result_folder``.

    :param output_root: URL of the output root (templated).
    :param result_folder: folder under the output root for the result (templated).
    :param max_event_age_days: the attribution window; older held events are lost (templated).
    :param partition: the conversions run's partition (templated): its own held events are
        counted by state in the result (``this_partition``); None in the refresh DAG.
    :param liveramp_capi_conn_id: the CAPI adapter connection.
    :param capi_state_conn_id: the state database connection.
    :param dry_run: do nothing (recovery sends and marks held events; a dry run does neither).
    """

    template_fields: Sequence[str] = ("output_root", "result_folder", "max_event_age_days", "partition", "dry_run")
    ui_color = "#fce8e6"

    def __init__(
        self,
        *,
        output_root: str,
        result_folder: str,
        max_event_age_days: int | str = 28,
        partition: str | None = None,
        liveramp_capi_conn_id: str = "liveramp_capi_default",
        capi_state_conn_id: str = "capi_state_default",
        dry_run: bool | str = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.output_root = output_root
        self.result_folder = result_folder
        self.max_event_age_days = max_event_age_days
        self.partition = partition
        self.liveramp_capi_conn_id = liveramp_capi_conn_id
        self.capi_state_conn_id = capi_state_conn_id
        self.dry_run = dry_run

    def execute(self, context: Any) -> dict[str, Any]:
        import json
        import time

        from airflow.sdk import ObjectStoragePath

        from liveramp_capi.domain.consent import DAY_SECONDS
        from liveramp_capi.domain.held import HELD_RECOVERY_FILE
        from liveramp_capi.domain.partition import PartitionLayout, check_root, parse_partition, run_key
        from liveramp_capi.domain.recovery import recover_held_conversions
        from liveramp_capi.hooks.capi import LiveRampCapiHook
        from liveramp_capi.hooks.state import CapiStateHook
        from liveramp_capi.operators.config_errors import setting_flag

        if setting_flag(self.dry_run, "dry_run"):
            self.log.info("Dry run: held conversions are neither sent nor marked")
            return {"dry_run": True}
        try:
            window_days = int(self.max_event_age_days)
        except (TypeError, ValueError):
            raise AirflowFailException("max_event_age_days must be a whole number of days") from None
        if window_days < 1:
            raise AirflowFailException("max_event_age_days must be at least 1")
        folder = _check_result_folder(self.result_folder)
        with permanent_config_errors():
            target = ObjectStoragePath(check_root(self.output_root, name="capi_output_root")) / folder
        state = CapiStateHook(capi_state_conn_id=self.capi_state_conn_id)
        with permanent_config_errors(self.capi_state_conn_id), state.opened("recovered"):
            ledger = state.get_ledger()
            state.get_envelope_store()  # recovery reads the store's live envelopes
            held = state.get_held_conversions()
        capi = LiveRampCapiHook(liveramp_capi_conn_id=self.liveramp_capi_conn_id)

        run_id = f"{context['run_id']}#{context['ti'].try_number}"
        result = recover_held_conversions(
            held, ledger, capi.send_batches, now=int(time.time()), window_seconds=window_days * DAY_SECONDS,
            run_id=run_id,
        )
        totals = held.counts()
        result["still_held"] = totals["held"] + totals["delivering"]
        result["totals"] = totals
        if self.partition:
            with permanent_config_errors():
                own = parse_partition(self.partition)
            result["this_partition"] = held.counts(own)
            # A conversions run keeps its result in its own work folder, where its report reads it.
            target = target / PartitionLayout(own, run_key(context["run_id"])).work_dir
        target.mkdir(parents=True, exist_ok=True)
        with (target / HELD_RECOVERY_FILE).open("wb") as stream:
            stream.write(json.dumps(result, indent=2, sort_keys=True).encode() + b"\n")
        self.log.info(
            "Held conversions: %d recovered now (%d found acknowledged already), %d lost now (%s), %d to retry; "
            "%d still held, %d recovered and %d lost in all",
            result["recovered"] + result["recovered_already_acknowledged"],
            result["recovered_already_acknowledged"],
            result["lost_window_passed"] + result["lost_refused"],
            result["lost_by_reason"],
            result["released"],
            result["still_held"],
            totals["recovered"],
            totals["lost"],
        )
        if result["released"]:
            self.log.warning(
                "%d held conversions could not be delivered now (transient failures); the next pass retries them",
                result["released"],
            )
        return {k: result[k] for k in ("recovered", "recovered_already_acknowledged", "lost_window_passed",
                                       "lost_refused", "released", "still_held")}
