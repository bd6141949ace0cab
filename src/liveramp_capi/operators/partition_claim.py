"""The partition claim as Airflow tasks use it: the run owns its partition while it works on it.

Every task of ``tiktok_conversions`` that reads, writes or sends a partition's data holds the
claim (:mod:`liveramp_capi.state.lease`) while it works. The owner is the DAG run, so the tasks
and task tries of one run share it; a second run of the same partition waits in
``claim_partition`` until the first one is done, or fails with a message naming the run that
holds it. A claim held by a run that Airflow reports as ended is taken over at once.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Any

from airflow.sdk.exceptions import AirflowFailException

from liveramp_capi.state.lease import LeaseKeeper, LeaseState, PartitionHeld, PartitionLease

#: How long a claim lives after its last heartbeat unless the Variable says otherwise.
DEFAULT_LEASE_MINUTES = 10.0
LEASE_MINUTES_VARIABLE = "capi_partition_lease_minutes"
_ENDED_RUN_STATES = frozenset({"success", "failed"})
_LOG = logging.getLogger(__name__)


def run_owner(context: Any) -> str:
    """The claim's owner for this task's run: ``dag_id/run_id``."""
    return f"{context['ti'].dag_id}/{context['run_id']}"


def holder_of(context: Any) -> str:
    """Where a heartbeat comes from, for another run's message: task, map index, try, host."""
    ti = context["ti"]
    map_index = getattr(ti, "map_index", -1)
    task = ti.task_id if map_index is None or map_index < 0 else f"{ti.task_id}[{map_index}]"
    return f"{task} try {ti.try_number} on {socket.gethostname()}"


def lease_minutes() -> float:
    """The lease's time to live from the Variable ``capi_partition_lease_minutes`` (default 10).

    :raises AirflowFailException: when the Variable is not a positive number of minutes.
    """
    from airflow.sdk import Variable

    raw = Variable.get(LEASE_MINUTES_VARIABLE, default=str(DEFAULT_LEASE_MINUTES))
    try:
        minutes = float(raw)
    except (TypeError, ValueError):
        minutes = -1.0
    if not minutes > 0:
        raise AirflowFailException(
            f"Variable {LEASE_MINUTES_VARIABLE} must be a positive number of minutes, e.g. 10 (got {str(raw)[:20]!r})"
        )
    return minutes


def open_lease(state_hook: Any) -> PartitionLease:
    """The partition lease in the state database behind ``state_hook``, its table created if missing."""
    lease = PartitionLease(state_hook.get_engine(), ttl_seconds=lease_minutes() * 60)
    lease.ensure_schema()
    return lease


def _has_ended(owner: str, context: Any) -> bool:
    """Whether Airflow reports the run behind ``owner`` as finished (unknown counts as running)."""
    dag_id, _, run_id = owner.partition("/")
    if not run_id:
        return False
    try:
        state = context["ti"].get_dagrun_state(dag_id=dag_id, run_id=run_id)
    except Exception as err:
        # A run this deployment does not know (another metadata DB) or a failed query: wait for
        # the claim to lapse rather than risk taking it from a live run.
        _LOG.info("Could not ask Airflow about run %s (%s)", owner, type(err).__name__)
        return False
    return getattr(state, "value", str(state)) in _ENDED_RUN_STATES


def try_claim(lease: PartitionLease, partition: str, context: Any) -> LeaseState:
    """Take or renew the partition's claim for this run, once.

    :raises PartitionHeld: when another run holds it and has not ended.
    """
    owner = run_owner(context)
    holder = holder_of(context)
    state = lease.acquire(partition, owner, holder)
    if not state.acquired and _has_ended(state.owner, context):
        state = lease.acquire(partition, owner, holder, take_over_from=state.owner)
    if not state.acquired:
        raise PartitionHeld(state, lease.clock())
    return state


@contextlib.contextmanager
def holding_partition(state_hook: Any, partition: str, context: Any) -> Iterator[LeaseKeeper]:
    """Confirm this run's claim and keep it alive (heartbeats) for the duration of the block.

    :raises AirflowFailException: when another live run holds the partition (no retry helps).
    """
    lease = open_lease(state_hook)
    try:
        try_claim(lease, partition, context)
    except PartitionHeld as held:
        raise AirflowFailException(
            f"{held}: this run no longer owns the partition and stops here, to send nothing twice"
        ) from None
    with LeaseKeeper(lease, partition, run_owner(context), holder_of(context)) as keeper:
        yield keeper


class RunClaim:
    """This run's claim on its partition, for a pipeline step (:class:`liveramp_capi.pipeline.ports.Ownership`)."""

    def __init__(self, lease: PartitionLease, partition: str, context: Any) -> None:
        self.lease, self.partition, self.context = lease, partition, context

    def claim(self) -> LeaseState:
        return try_claim(self.lease, self.partition, self.context)

    def release(self) -> None:
        self.lease.release(self.partition, run_owner(self.context))

    def check_one_granularity(self) -> None:
        from liveramp_capi.state.granularity import check_one_granularity

        lease = self.lease
        check_one_granularity(lease.engine, self.partition, lease.read, run_owner(self.context), lease.clock())
