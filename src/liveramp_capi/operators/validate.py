"""Validate: every record of a partition checked, the valid ones spilled to session shards."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from liveramp_capi import metrics
from liveramp_capi.operators.config_errors import permanent_config_errors
from liveramp_capi.pipeline.config import ValidateConfig

#: The arguments that make up the step's :class:`ValidateConfig`, besides the dry run.
_SETTINGS = ("max_invalid_ratio", "max_event_age_days", "allow_custom_events", "events_per_shard", "reference_time",
             "max_future_skew_seconds", "max_line_bytes")


class ValidateConversionsOperator(BaseOperator):
    """Validate a partition's conversion records and write its session shards and rejects.

    See :func:`liveramp_capi.pipeline.validate.validate_partition`. Each record is checked against the JSON Schema shipped in the package (``liveramp_capi/schemas/``) (``jsonschema``; a
    compiled validator does the first pass) and against what a schema can't express: a
    duplicate ``event_id`` within the partition (kept once, counted), an ``event_time`` in the
    future or older than ``max_event_age_days``. Rejected records go to
    ``<output_root>/dt=<partition>/rejected.jsonl`` with file, line, JSON pointer and reason;
    valid events go to session shards for the send step. The task fails, after writing the
    rejects, when the rejected share exceeds ``max_invalid_ratio``.

    :param partition: the partition, ``YYYY-MM-DD`` or ``YYYY-MM-DDTHH`` (templated).
    :param landing_root: URL of the landing root (templated).
    :param output_root: URL of the output root (templated).
    Settings left None take their defaults from :data:`liveramp_capi.pipeline.config.SETTINGS`.

    :param max_invalid_ratio: the largest share of rejected records (0..1) the partition may hold.
    :param max_event_age_days: events older than this many days are rejected (TikTok: 28).
    :param max_future_skew_seconds: how far in the future an ``event_time`` may lie (clock skew).
    :param allow_custom_events: accept ``event_type`` values beyond TikTok's standard events.
    :param reference_time: Unix seconds the age window is measured from (default: now).
    :param events_per_shard: how many events one send task handles at most (memory bound).
    :param max_line_bytes: longer input lines are rejected unread.
    :param capi_state_conn_id: the state database connection; accepted records with a
        ``user_key`` and an envelope are upserted into its envelope store (newer envelopes win).
    :param dry_run: write the rejects to ``dry_run/rejected.jsonl`` and leave the envelope store
        alone: the partition's newest envelopes go to the run's work folder instead (templated).
    """

    template_fields: Sequence[str] = (
        "partition",
        "landing_root",
        "output_root",
        "max_invalid_ratio",
        "max_event_age_days",
        "allow_custom_events",
        "reference_time",
        "events_per_shard",
        "dry_run_setting",
    )
    ui_color = "#fef7e0"

    def __init__(
        self,
        *,
        partition: str,
        landing_root: str,
        output_root: str,
        max_invalid_ratio: float | str | None = None,
        max_event_age_days: int | str | None = None,
        max_future_skew_seconds: int = 300,
        allow_custom_events: bool | str | None = None,
        reference_time: int | str | None = None,
        events_per_shard: int | str | None = None,
        max_line_bytes: int = 1_048_576,
        capi_state_conn_id: str = "capi_state_default",
        dry_run: bool | str = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.partition = partition
        self.landing_root = landing_root
        self.output_root = output_root
        self.max_invalid_ratio = max_invalid_ratio
        self.max_event_age_days = max_event_age_days
        self.max_future_skew_seconds = max_future_skew_seconds
        self.allow_custom_events = allow_custom_events
        self.reference_time = reference_time
        self.events_per_shard = events_per_shard
        self.max_line_bytes = max_line_bytes
        self.capi_state_conn_id = capi_state_conn_id
        # Not ``self.dry_run``: that name is BaseOperator's dry_run() method.
        self.dry_run_setting = dry_run

    def execute(self, context: Any) -> list[int]:
        from liveramp_capi.operators.partition_claim import holding_partition
        from liveramp_capi.operators.state import state_database
        from liveramp_capi.pipeline.validate import RejectedShareExceeded, validate_partition
        from liveramp_capi.storage import PartitionStorage

        with permanent_config_errors():
            config = ValidateConfig.parse(
                {**{name: getattr(self, name) for name in _SETTINGS}, "dry_run": self.dry_run_setting}
            )
            storage = PartitionStorage(self.landing_root, self.output_root, self.partition, context["run_id"])
        with state_database(self.capi_state_conn_id, "validated") as state:
            envelope_store = state.get_envelope_store()
        failure: RejectedShareExceeded | None = None
        try:
            with holding_partition(state, storage.partition, context) as claim:
                result = validate_partition(config, storage, envelope_store, claim)
        except RejectedShareExceeded as exceeded:
            failure, result = exceeded, exceeded.result
        if not config.dry_run:
            metrics.validated(result.validation)
        if failure is not None:
            raise AirflowFailException(str(failure)) from None
        # What the send step maps over: the indices of non-empty shards.
        return result.shards
