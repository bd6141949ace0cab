"""Send: adapter of :func:`liveramp_capi.pipeline.deliver.deliver_shard` (and ``plan_shard`` in a dry run)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from liveramp_capi import metrics
from liveramp_capi.operators.config_errors import permanent_config_errors
from liveramp_capi.pipeline.config import flag


class SendConversionsOperator(BaseOperator):
    """Deliver one session shard of a partition to LiveRamp's ATS Conversions API adapter.

    The shard's events are grouped into sessions (``session_id``, or the same envelope and
    device ids with an inactivity gap), cut into batches of at most ``max_batch_events`` and
    sent with many requests in flight. The delivery ledger (connection ``capi_state_default``)
    decides what is sent: events of batches acknowledged by an earlier run are skipped, so a
    rerun sends only the remainder. Every batch is tried; the task then fails if any batch
    failed for good, listing them in ``failed.jsonl``.

    :param shard: the shard index (mapped from the validate step).
    :param partition: the partition, ``YYYY-MM-DD`` or ``YYYY-MM-DDTHH`` (templated).
    :param output_root: URL of the output root (templated).
    :param liveramp_capi_conn_id: the CAPI adapter connection.
    :param capi_state_conn_id: the state database connection.
    :param session_gap_seconds: inactivity that ends an envelope-keyed session.
    :param max_batch_events: overrides the connection's ``max_batch_events`` (1..1000).
    :param dry_run: plan the shard's batches exactly as a real run would and write the plan;
        send nothing and write nothing to the state database (templated).
    """

    template_fields: Sequence[str] = ("partition", "output_root", "dry_run_setting")
    ui_color = "#e6f4ea"

    def __init__(
        self,
        *,
        shard: int,
        partition: str,
        output_root: str,
        liveramp_capi_conn_id: str = "liveramp_capi_default",
        capi_state_conn_id: str = "capi_state_default",
        session_gap_seconds: int = 1800,
        max_batch_events: int | None = None,
        dry_run: bool | str = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.shard = shard
        self.partition = partition
        self.output_root = output_root
        self.liveramp_capi_conn_id = liveramp_capi_conn_id
        self.capi_state_conn_id = capi_state_conn_id
        self.session_gap_seconds = session_gap_seconds
        self.max_batch_events = max_batch_events
        # Not ``self.dry_run``: that name is BaseOperator's dry_run() method.
        self.dry_run_setting = dry_run

    def execute(self, context: Any) -> dict[str, Any]:
        from liveramp_capi.hooks.capi import LiveRampCapiHook
        from liveramp_capi.operators.partition_claim import holding_partition
        from liveramp_capi.pipeline.deliver import (
            ConfigurationRefused,
            DeliveryFailed,
            ShardConfig,
            deliver_shard,
            plan_shard,
        )
        from liveramp_capi.storage import PartitionStorage

        with permanent_config_errors():
            dry_run = flag("dry_run", self.dry_run_setting)
            storage = PartitionStorage(None, self.output_root, self.partition, context["run_id"])
        state, ledger, envelope_store, held = _open_state(self.capi_state_conn_id)
        capi = LiveRampCapiHook(liveramp_capi_conn_id=self.liveramp_capi_conn_id)
        with permanent_config_errors(self.liveramp_capi_conn_id):
            settings = capi.get_settings()
        config = ShardConfig(int(self.shard), int(self.max_batch_events or settings.max_batch_events),
                             self.liveramp_capi_conn_id, self.session_gap_seconds, dry_run)
        with holding_partition(state, storage.partition, context) as claim:
            if dry_run:
                return plan_shard(config, storage, ledger, envelope_store, held).brief()
            try:
                done = deliver_shard(config, storage, ledger, envelope_store, held, capi.send_batches, claim,
                                     airflow_run_id=context["run_id"], try_number=int(context["ti"].try_number))
            except (ConfigurationRefused, DeliveryFailed) as failed:
                metrics.delivered(failed.done.result, failed.done.stats)
                permanent = isinstance(failed, ConfigurationRefused) or failed.permanent
                raise (AirflowFailException if permanent else AirflowException)(str(failed)) from None
        metrics.delivered(done.result, done.stats)
        return done.brief()


def _open_state(conn_id: str) -> tuple[Any, Any, Any, Any]:
    """The state hook, ledger, envelope store and held table: nothing is sent without a ledger."""
    from liveramp_capi.operators.state import state_database

    with state_database(conn_id, "sent") as state:
        return state, state.get_ledger(), state.get_envelope_store(), state.get_held_conversions()
