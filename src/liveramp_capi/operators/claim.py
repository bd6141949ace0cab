"""Claim: the run takes ownership of its partition before it reads, writes or sends anything."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from liveramp_capi.operators.config_errors import permanent_config_errors, setting_number


class ClaimPartitionOperator(BaseOperator):
    """Claim the partition for this run in the state database, waiting while another run holds it.

    Two runs of one partition (a manual trigger beside the scheduled run, a backfill over a day
    still running) would otherwise send the same events at the same moment. The second run waits
    here, logging which run holds the partition; when the first has finished it goes on and, the
    ledger knowing what was acknowledged, sends only what is left (usually nothing). The wait
    holds a worker slot: it is the rare case, and polling the state database is cheap.

    :param partition: the partition, ``YYYY-MM-DD`` or ``YYYY-MM-DDTHH`` (templated).
    :param landing_root: URL of the landing root (templated).
    :param output_root: URL of the output root (templated).
    :param wait_minutes: how long to wait for another run's claim before failing (templated).
    :param poll_seconds: seconds between two attempts (templated).
    :param capi_state_conn_id: the state database connection.
    :param dry_run: claim, but leave other runs' work folders in place: a failed run whose tasks
        are cleared after a dry run still finds its shards (templated).
    """

    template_fields: Sequence[str] = (
        "partition", "landing_root", "output_root", "wait_minutes", "poll_seconds", "dry_run"
    )
    ui_color = "#fce8e6"

    def __init__(
        self,
        *,
        partition: str,
        landing_root: str,
        output_root: str,
        wait_minutes: float | str = 60,
        poll_seconds: float | str = 15.0,
        capi_state_conn_id: str = "capi_state_default",
        dry_run: bool | str = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.partition = partition
        self.landing_root = landing_root
        self.output_root = output_root
        self.wait_minutes = wait_minutes
        self.poll_seconds = poll_seconds
        self.capi_state_conn_id = capi_state_conn_id
        self.dry_run = dry_run

    def execute(self, context: Any) -> dict[str, Any]:
        from liveramp_capi.hooks.state import CapiStateHook
        from liveramp_capi.operators.config_errors import setting_flag
        from liveramp_capi.operators.partition_claim import claim_with_wait, open_lease, run_owner
        from liveramp_capi.storage import PartitionStorage, check_root_reachable

        wait_minutes = setting_number(self.wait_minutes, float, "wait_minutes", "capi_partition_claim_wait_minutes", "60")
        poll_seconds = setting_number(
            self.poll_seconds, float, "poll_seconds", "capi_partition_claim_poll_seconds", "15", minimum=0.1
        )
        with permanent_config_errors(self.capi_state_conn_id):
            storage = PartitionStorage(self.landing_root, self.output_root, self.partition, context["run_id"])
            # A missing output bucket or refused credentials would otherwise surface only after
            # the partition was read, validated and sent.
            check_root_reachable(self.output_root, variable="capi_output_root", local_must_exist=False)
            lease = open_lease(CapiStateHook(capi_state_conn_id=self.capi_state_conn_id))
        state = claim_with_wait(
            lease,
            storage.partition,
            context,
            wait_seconds=wait_minutes * 60,
            poll_seconds=poll_seconds,
            log=self.log,
        )
        refuse_mixed_granularity(lease, storage.partition, context)
        removed = [] if setting_flag(self.dry_run, "dry_run") else storage.remove_other_runs()
        self.log.info(
            "Partition %s claimed by run %s%s",
            storage.partition,
            run_owner(context),
            f"; removed the work files of {len(removed)} other runs (their summaries stay)" if removed else "",
        )
        return {"partition": storage.partition, "claimed_at": round(state.heartbeat_at, 3)}


def refuse_mixed_granularity(lease: Any, partition: str, context: Any) -> None:
    """Fail at once (no retry helps) when the partition's day is delivered at the other granularity.

    The run lets go of its claim first: a later run of the partition (after the Variable
    ``capi_allow_mixed_granularity`` is set) need not wait for it to lapse.
    """
    from airflow.sdk import Variable
    from airflow.sdk.exceptions import AirflowFailException

    from liveramp_capi.operators.config_errors import setting_flag
    from liveramp_capi.operators.partition_claim import run_owner
    from liveramp_capi.state.granularity import ALLOW_VARIABLE, MixedGranularity, check_one_granularity

    allowed = setting_flag(Variable.get(ALLOW_VARIABLE, default="false"), ALLOW_VARIABLE)
    owner = run_owner(context)
    try:
        check_one_granularity(lease.engine, partition, lease.read, owner, lease.clock(), allowed=allowed)
    except MixedGranularity as refused:
        lease.release(partition, owner)
        raise AirflowFailException(str(refused)) from None
