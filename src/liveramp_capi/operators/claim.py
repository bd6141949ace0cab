"""Claim: the run takes ownership of its partition before it reads, writes or sends anything."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from liveramp_capi.operators.config_errors import permanent_config_errors, step_failures
from liveramp_capi.pipeline.config import ClaimConfig


class ClaimPartitionOperator(BaseOperator):
    """Claim the partition for this run in the state database, waiting while another run holds it.

    See :func:`liveramp_capi.pipeline.claim.claim_partition`.
    Two runs of one partition (a manual trigger beside the scheduled run, a backfill over a day
    still running) would otherwise send the same events at the same moment. The second run waits
    here, logging which run holds the partition; when the first has finished it goes on and, the
    ledger knowing what was acknowledged, sends only what is left (usually nothing). The wait
    holds a worker slot: it is the rare case, and polling the state database is cheap.

    :param partition: the partition, ``YYYY-MM-DD`` or ``YYYY-MM-DDTHH`` (templated).
    :param output_root: URL of the output root (templated).
    :param wait_minutes: how long to wait for another run's claim before failing (templated).
    :param poll_seconds: seconds between two attempts (templated).
    :param capi_state_conn_id: the state database connection.
    :param allow_mixed_granularity: let a day and its hours both be delivered (their files hold
        different events; templated). Otherwise a partition whose day is delivered at the other
        granularity fails here without retries.
    :param dry_run: claim, but leave other runs' work folders in place: a failed run whose tasks
        are cleared after a dry run still finds its shards (templated).
    """

    template_fields: Sequence[str] = (
        "partition", "output_root", "wait_minutes", "poll_seconds", "allow_mixed_granularity", "dry_run_setting"
    )
    ui_color = "#fce8e6"

    def __init__(
        self,
        *,
        partition: str,
        output_root: str,
        wait_minutes: float | str | None = None,
        poll_seconds: float | str | None = None,
        allow_mixed_granularity: bool | str | None = None,
        capi_state_conn_id: str = "capi_state_default",
        dry_run: bool | str = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.partition = partition
        self.output_root = output_root
        self.wait_minutes = wait_minutes
        self.poll_seconds = poll_seconds
        self.allow_mixed_granularity = allow_mixed_granularity
        self.capi_state_conn_id = capi_state_conn_id
        # Not ``self.dry_run``: that name is BaseOperator's dry_run() method.
        self.dry_run_setting = dry_run

    def execute(self, context: Any) -> dict[str, Any]:
        from liveramp_capi.hooks.state import CapiStateHook
        from liveramp_capi.operators.partition_claim import RunClaim, open_lease
        from liveramp_capi.pipeline.claim import claim_partition
        from liveramp_capi.storage import PartitionStorage, check_root_reachable

        with permanent_config_errors(self.capi_state_conn_id):
            config = ClaimConfig.parse(
                {"wait_minutes": self.wait_minutes, "poll_seconds": self.poll_seconds,
                 "allow_mixed_granularity": self.allow_mixed_granularity, "dry_run": self.dry_run_setting}
            )
            storage = PartitionStorage(None, self.output_root, self.partition, context["run_id"])
            # A missing output bucket or refused credentials would otherwise surface only after
            # the partition was read, validated and sent.
            check_root_reachable(self.output_root, variable="capi_output_root", local_must_exist=False)
            lease = open_lease(CapiStateHook(capi_state_conn_id=self.capi_state_conn_id))
        with step_failures():
            claimed = claim_partition(config, storage, RunClaim(lease, storage.partition, context))
        return {"partition": claimed.partition, "claimed_at": claimed.claimed_at}
