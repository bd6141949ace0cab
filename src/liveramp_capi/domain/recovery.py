"""Win back held conversions: deliver them, exactly once, once their user key has a live envelope.

One pass (:func:`recover_held_conversions`), run by the conversions DAG after validation (which
upserts the partition's fresh envelopes) and by the envelope refresh DAG after refreshing:

1. held events older than the attribution window become ``lost``, with that reason;
2. held events whose user key has a live envelope are claimed (a lease: two passes never claim
   one event), a page at a time;
3. each claimed event's fixed recovery batch id is looked up in the delivery ledger under its own
   partition: one acknowledged already (a pass died between the answer and the bookkeeping) is
   marked recovered without being sent again;
4. the rest is marked in flight, sent with the live envelope, and recorded: acknowledged ->
   ledger ``acknowledged`` then ``recovered``; refused for good -> ``lost`` with the refusal;
   anything else goes back to ``held`` for a later pass.

Plain Python: the caller passes the stores (:mod:`liveramp_capi.state`, through the protocols
below) and the sending function (the CAPI hook's ``send_batches``).
"""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from liveramp_capi.domain.batches import Batch
from liveramp_capi.domain.held import REASON_WINDOW_PASSED, HeldConversion

__all__ = ["HeldQueue", "Ledger", "SendBatches", "recover_held_conversions"]

#: ``send(batches, on_outcome) -> stats``: the CAPI hook's ``send_batches``.
SendBatches = Callable[[Iterable[Batch], Callable[[Any, Any], None]], Any]


class HeldQueue(Protocol):
    """What a pass needs of the held conversions table (:class:`~liveramp_capi.state.held_store.HeldConversions`)."""

    def expire_past_window(self, *, now: int, window_seconds: int, lease_seconds: int = ...) -> int: ...

    def claim_recoverable(
        self, *, token: str, now: int, window_seconds: int, limit: int = ..., lease_seconds: int = ...
    ) -> list[HeldConversion]: ...

    def mark_recovered(self, token: str, items: Iterable[HeldConversion], *, now: int, run_id: str | None) -> int: ...

    def release(self, token: str, items: Iterable[HeldConversion], *, now: int) -> int: ...

    def mark_lost(self, token: str, items: Iterable[HeldConversion], reason: str, *, now: int) -> int: ...


class Ledger(Protocol):
    """What a pass needs of the delivery ledger (:class:`~liveramp_capi.state.ledger.DeliveryLedger`)."""

    def acknowledged_among(self, partition: str, batch_ids: Iterable[str]) -> set[str]: ...

    def mark_in_flight(self, partition: str, batches: Sequence[Batch], run_id: str | None) -> None: ...

    def record_acknowledged(
        self, partition: str, batches_with_attempts: Sequence[tuple[Batch, int]], run_id: str | None
    ) -> None: ...

    def record_failed(
        self, partition: str, failures: Sequence[tuple[Batch, int, int | None, str]], run_id: str | None
    ) -> None: ...

#: Outcomes written to the ledger and the held table per call.
_FLUSH_EVERY = 256


def recover_held_conversions(
    held: HeldQueue,
    ledger: Ledger,
    send: SendBatches,
    *,
    now: int,
    window_seconds: int,
    run_id: str | None,
    page_size: int = 2000,
    lease_seconds: int = 600,
) -> dict[str, Any]:
    """Deliver what can be won back, mark what is lost; return counts (no identifiers).

    :param held: the held conversions table.
    :param ledger: the delivery ledger.
    :param send: sends batches and reports each outcome (see :data:`SendBatches`).
    :param now: the pass's time (fixed for the whole pass).
    :param window_seconds: the attribution window; older events are lost.
    :param run_id: the Airflow run / try, recorded with each recovery.
    :param page_size: events claimed at a time.
    :param lease_seconds: how long a claim protects events from other passes.
    """
    token = uuid.uuid4().hex
    counts: Counter[str] = Counter()
    counts["lost_window_passed"] = held.expire_past_window(
        now=now, window_seconds=window_seconds, lease_seconds=lease_seconds
    )
    lost_reasons: Counter[str] = Counter()
    if counts["lost_window_passed"]:
        lost_reasons[REASON_WINDOW_PASSED] += counts["lost_window_passed"]
    seen: set[tuple[str, str]] = set()
    while True:
        claimed = held.claim_recoverable(
            token=token, now=now, window_seconds=window_seconds, limit=page_size, lease_seconds=lease_seconds
        )
        fresh = [item for item in claimed if (item.partition, item.event_key) not in seen]
        repeat = [item for item in claimed if (item.partition, item.event_key) in seen]
        if repeat:  # released earlier in this pass after a transient failure: next pass
            held.release(token, repeat, now=now)
        if not fresh:
            break
        seen.update((item.partition, item.event_key) for item in fresh)
        counts["claimed"] += len(fresh)
        _deliver_page(held, ledger, send, token, fresh, now, run_id, counts, lost_reasons)
        if len(claimed) < page_size:
            break
    result: dict[str, Any] = {name: int(counts[name]) for name in (
        "claimed", "recovered", "recovered_already_acknowledged", "lost_window_passed", "lost_refused",
        "released", "requests", "retries")}
    result["lost_by_reason"] = dict(sorted(lost_reasons.items()))
    return result


def _deliver_page(
    held: HeldQueue,
    ledger: Ledger,
    send: SendBatches,
    token: str,
    items: list[HeldConversion],
    now: int,
    run_id: str | None,
    counts: Counter[str],
    lost_reasons: Counter[str],
) -> None:
    by_partition: dict[str, list[HeldConversion]] = defaultdict(list)
    for item in items:
        by_partition[item.partition].append(item)
    to_send: dict[str, tuple[HeldConversion, Batch]] = {}
    for partition, group in sorted(by_partition.items()):
        acknowledged = ledger.acknowledged_among(partition, [item.batch_id for item in group])
        done = [item for item in group if item.batch_id in acknowledged]
        if done:
            held.mark_recovered(token, done, now=now, run_id=run_id)
            counts["recovered_already_acknowledged"] += len(done)
        pending = [(item, item.batch()) for item in group if item.batch_id not in acknowledged]
        if pending:
            ledger.mark_in_flight(partition, [batch for _, batch in pending], run_id)
            to_send.update({batch.batch_id: (item, batch) for item, batch in pending})
    if not to_send:
        return

    acks: list[tuple[HeldConversion, Batch, int]] = []

    def flush_acks() -> None:
        grouped: dict[str, list[tuple[Batch, int]]] = defaultdict(list)
        for item, batch, attempts in acks:
            grouped[item.partition].append((batch, attempts))
        for partition, pairs in grouped.items():
            ledger.record_acknowledged(partition, pairs, run_id)
        held.mark_recovered(token, [item for item, _, _ in acks], now=now, run_id=run_id)
        counts["recovered"] += len(acks)
        acks.clear()

    failures: list[tuple[HeldConversion, Batch, Any]] = []

    def on_outcome(batch: Any, outcome: Any) -> None:
        item, own = to_send[batch.batch_id]
        if outcome.acknowledged:
            acks.append((item, own, int(outcome.attempts)))
            if len(acks) >= _FLUSH_EVERY:
                flush_acks()
        else:
            failures.append((item, own, outcome))

    try:
        stats = send([batch for _, batch in to_send.values()], on_outcome)
    finally:
        # Whatever happened, what was acknowledged is recorded.
        if acks:
            flush_acks()
    counts["requests"] += int(getattr(stats, "requests", 0))
    counts["retries"] += int(getattr(stats, "retries", 0))
    if not failures:
        return
    by_partition_failed: dict[str, list[tuple[Batch, int, int | None, str]]] = defaultdict(list)
    for item, batch, outcome in failures:
        by_partition_failed[item.partition].append(
            (batch, int(outcome.attempts), outcome.status, outcome.error or "failed")
        )
    for partition, rows in by_partition_failed.items():
        ledger.record_failed(partition, rows, run_id)
    refused = [(item, outcome) for item, _, outcome in failures if outcome.permanent]
    for item, outcome in refused:
        reason = f"refused by the adapter: {outcome.error or 'HTTP ' + str(outcome.status)}"
        held.mark_lost(token, [item], reason, now=now)
        lost_reasons[reason] += 1
    counts["lost_refused"] += len(refused)
    transient = [item for item, _, outcome in failures if not outcome.permanent]
    if transient:
        held.release(token, transient, now=now)
        counts["released"] += len(transient)
