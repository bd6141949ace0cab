"""Send: one shard of a partition's sessions delivered to the CAPI adapter, through the ledger.

:func:`deliver_shard` sends; :func:`plan_shard` is a dry run's send step (the batches a real run
would send, written as a plan). Plain Python: the operator passes the hook's ``send_batches``.

A send task runs three threads: the event loop (sends, and marks and acknowledges through the
writer), the ledger writer (every ledger and held-table write, in order) and the planner
(:mod:`.shard_planner`: cuts the sessions into batches a few groups ahead).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from liveramp_capi.delivery.heap import collector_paused, long_lived_heap_frozen
from liveramp_capi.domain.batches import Batch
from liveramp_capi.domain.dry_run import PLAN_COUNTERS, overlay_envelopes, plan_line
from liveramp_capi.domain.send_plan import plan_session
from liveramp_capi.domain.sessions import read_shard, sessionise
from liveramp_capi.domain.summary import SHARD_COUNTERS
from liveramp_capi.pipeline.errors import PermanentStepFailure, StepFailed
from liveramp_capi.pipeline.ports import Claim
from liveramp_capi.pipeline.shard_planner import ShardPlanner

if TYPE_CHECKING:
    from liveramp_capi.state.envelope_store import EnvelopeStore
    from liveramp_capi.state.held_store import HeldConversions
    from liveramp_capi.state.ledger import DeliveryLedger
    from liveramp_capi.storage import PartitionStorage

#: How many batches are marked in flight, and how many outcomes are written, per ledger call.
#: Larger groups mean fewer round trips; the next group is marked while this one is sent, so a
#: crash leaves at most twice this many batches "in flight" beyond the requests really on the wire.
_LEDGER_GROUP = 256
#: Acknowledgements are also written when the oldest unwritten one is this old, so a SIGKILL
#: loses (and a rerun re-sends) at most about this much of acknowledged work.
_ACK_FLUSH_SECONDS = 0.5

_LOG = logging.getLogger(__name__)

#: Sends batches, calling back once per outcome (the CAPI hook's ``send_batches``).
SendBatches = Callable[..., Any]

_BRIEF = ("shard", "partition", "events", "delivered_this_run_events", "failed_events")
_PLAN_BRIEF = ("shard", "partition", "events", "planned_batches", "planned_events")


@dataclass(frozen=True, slots=True)
class ShardConfig:
    """One send task's settings.

    :param max_batch_events: events per batch (the connection's, or the operator's override).
    :param conn_id: the CAPI connection, named in a refused configuration's message.
    """

    shard: int
    max_batch_events: int
    conn_id: str
    session_gap_seconds: int = 1800
    dry_run: bool = False


@dataclass(frozen=True, slots=True)
class ShardResult:
    """The shard's result as written (counters, tries) and the engine's statistics (None in a dry run)."""

    result: dict[str, Any]
    stats: Any

    def brief(self) -> dict[str, Any]:
        """The counts worth passing on (XCom)."""
        return {k: self.result[k] for k in (_PLAN_BRIEF if self.result.get("dry_run") else _BRIEF)}


class DeliveryFailed(StepFailed):
    """Batches of the shard failed for good; ``result`` holds what was delivered all the same."""

    def __init__(self, done: ShardResult, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.done = done
        # A permanent refusal (4xx) will not heal by retrying the task; exhausted retries may.
        self.permanent = permanent


class ConfigurationRefused(PermanentStepFailure):
    """The endpoint answered 404: it does not know the ATS configuration ID; nothing more was sent."""

    def __init__(self, done: ShardResult, message: str) -> None:
        super().__init__(message)
        self.done = done


def plan_shard(
    config: ShardConfig, storage: PartitionStorage, ledger: DeliveryLedger, envelope_store: EnvelopeStore,
    held: HeldConversions,
) -> ShardResult:
    """A dry run's send step: the batches a real run would send now, written as a plan; nothing sent or recorded."""
    shard, max_events = config.shard, config.max_batch_events
    partition, layout = storage.partition, storage.layout
    shard_count = int(storage.read_json(layout.validation)["shard_count"])
    storage.remove(layout.result(shard), layout.plan_part(shard))
    # Read-only look-ups, the same a real send makes: acknowledged batches are not planned,
    # events the held table owns are not either.
    acknowledged = ledger.acknowledged_batch_runs(partition, shard, shard_count)
    held_index = held.shard_index(partition, shard, shard_count)
    with storage.open_read(layout.shard(shard)) as stream:
        sessions = list(sessionise(read_shard(stream), gap_seconds=config.session_gap_seconds))
    now = int(time.time())
    keys = {entry.user_key for session in sessions for entry in session.entries if entry.user_key}
    stored = envelope_store.resolve(keys, now=now, include_expired=True)
    with storage.open_read(layout.envelope_overlay) as overlay:
        stored = overlay_envelopes(stored, overlay, keys, now)
    counts: Counter[str] = Counter(sessions=len(sessions))
    lines: list[bytes] = []
    for session in sessions:
        counts["events"] += len(session.entries)
        plan = plan_session(session, stored, now, partition=partition, max_events=max_events,
                            acknowledged=acknowledged, held=held_index)
        plan.add_counts(counts)
        for batch in plan.batches:
            counts["planned_batches"] += 1
            counts["planned_events"] += batch.event_count
            lines.append(plan_line(shard, batch.batch_id, batch.event_count))
    with storage.open_output(layout.plan_part(shard)) as out:
        out.write(b"".join(line + b"\n" for line in lines))
    result = {"shard": shard, "partition": partition, "dry_run": True, **{k: int(counts[k]) for k in PLAN_COUNTERS}}
    storage.write_json(layout.result(shard), result)
    _LOG.info(
        "Dry run, shard %d: %d sessions, %d batches (%d events) planned, %d events delivered earlier, "
        "%d would be held (envelope expired); nothing sent",
        shard, counts["sessions"], counts["planned_batches"], counts["planned_events"],
        counts["previously_delivered_events"], counts["envelope_expired_events"],
    )
    return ShardResult(result, None)


# The shard's sessions live until the task ends: the collector stays off them (and off Airflow's
# heap) from the moment they are built (see delivery/heap.py).
@long_lived_heap_frozen()
def deliver_shard(
    config: ShardConfig,
    storage: PartitionStorage,
    ledger: DeliveryLedger,
    envelope_store: EnvelopeStore,
    held: HeldConversions,
    send_batches: SendBatches,
    claim: Claim,
    *,
    airflow_run_id: str,
    try_number: int,
) -> ShardResult:
    """Deliver one session shard through the ledger; write its result, failed and held-back events.

    The delivery ledger decides what is sent: events of batches acknowledged by an earlier run
    are skipped, so a rerun sends only the remainder. Every batch is tried.

    :param send_batches: the CAPI hook's ``send_batches`` (the request engine).
    :param airflow_run_id: the run; with ``try_number`` it names this try in the ledger.
    :raises ConfigurationRefused: at the first 404 (the endpoint does not know the configuration ID).
    :raises DeliveryFailed: when batches failed for good (permanent when all of them were refused).
    """
    shard, max_events = config.shard, config.max_batch_events
    run_id = f"{airflow_run_id}#{try_number}"
    partition, layout = storage.partition, storage.layout
    this_run = f"{airflow_run_id}#"
    shard_count = int(storage.read_json(layout.validation)["shard_count"])
    # The tries of this run that came before this one, so the run's counts add up over tries.
    earlier_tries = []
    if storage.exists(layout.result(shard)):
        earlier_tries = list(storage.read_json(layout.result(shard)).get("tries", []))
    # A result or failure list from an earlier try must not be counted for this one.
    storage.remove(layout.result(shard), layout.failed_part(shard), layout.expired_part(shard))

    # Ledger and held-table work runs on one writer thread, in submission order, so the event
    # loop never waits on the database while requests are in flight. A batch is only handed to
    # the loop once the write marking it in flight has committed.
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ledger-shard-{shard}")
    try:
        # Batches are cut deterministically from the shard, so a rerun cuts the same batches and
        # skips the acknowledged ones by id. (Skipping by event_id would be wrong: ids repeat
        # across event types, the seed's own app examples all use "1".) Who acknowledged them
        # decides whether they count as this run's deliveries (an earlier try) or an earlier run's.
        # Events held by an earlier run belong to the held table (recovery delivers them).
        # The database answers these on the writer thread while this one reads the shard.
        looked_up = writer.submit(
            lambda: (
                ledger.acknowledged_batch_runs(partition, shard, shard_count),
                ledger.unresolved_batches(partition, shard, shard_count),
                held.shard_index(partition, shard, shard_count),
            )
        )
        # The sessions live until the task ends: collections while reading them are wasted work,
        # and they are frozen once read (see delivery/heap.py).
        with collector_paused(), storage.open_read(layout.shard(shard)) as stream:
            sessions = list(sessionise(read_shard(stream), gap_seconds=config.session_gap_seconds))
        # Envelope resolution: the freshest unexpired envelope per user key, the record's own or
        # the store's; one look-up for the shard (chunked), decided at send time. Events held now
        # are recorded in the held table before any batch of their session is sent.
        now = int(time.time())
        with collector_paused():
            stored = envelope_store.live_envelopes(
                {entry.user_key for session in sessions for entry in session.entries if entry.user_key}, now=now
            )
        acknowledged, unknown_outcome, held_index = looked_up.result()
    except BaseException:
        writer.shutdown(wait=True)
        raise
    if unknown_outcome:
        _LOG.warning(
            "Shard %d: %d batches were in flight when an earlier try stopped; their outcome is unknown, "
            "so they are sent again (TikTok deduplicates event_id within 48 hours)",
            shard,
            len(unknown_outcome),
        )
    expired_lines: list[bytes] = []

    counts: Counter[str] = Counter(
        sessions=len(sessions), unknown_outcome_batches=len(unknown_outcome)
    )
    pending_acks: list[tuple[Batch, int]] = []
    ack_flush_at = [time.monotonic() + _ACK_FLUSH_SECONDS]
    failures: list[tuple[Batch, int, int | None, str]] = []
    not_sent: list[tuple[Batch, int, int | None, str]] = []
    failed_lines: list[bytes] = []
    # Set by a 404: send-events does not know the configuration ID, so every batch would fail.
    abort: list[int] = []

    ack_writes: deque[Future[None]] = deque()

    def mark(group: list[Batch], holds: list[Any]) -> None:
        # A run that lost its claim to another run must not put one more batch on the wire.
        claim.ensure_held()
        if holds:
            held.hold(partition, holds, now=now)
        ledger.mark_in_flight(partition, group, run_id)

    def batches(planner: ShardPlanner) -> Iterator[Batch]:
        marking: tuple[Future[None], list[Batch]] | None = None
        holds: list[Any] = []
        for planned in planner:
            counts.update(planned.counts)
            expired_lines.extend(planned.expired_lines)
            holds.extend(planned.holds)
            if abort:
                # The endpoint refused the configuration itself: nothing more is sent.
                counts["not_sent_events"] += sum(batch.event_count for batch in planned.batches)
                continue
            if not planned.batches:
                continue
            # The next group is marked while this one goes out.
            submitted = writer.submit(mark, planned.batches, holds), planned.batches
            holds = []
            if marking is not None:
                yield from _in_flight(*marking)
            marking = submitted
        if marking is not None:
            yield from _in_flight(*marking)
        if holds:
            writer.submit(held.hold, partition, holds, now=now).result()

    def _in_flight(marked: Future[None], group: list[Batch]) -> Iterator[Batch]:
        marked.result()  # committed (or its error raised here) before any batch of it is sent
        for batch in group:
            if abort:
                # Marked but never sent: recorded as failed (not unknown), so the rerun sends it
                # without counting it as a possible duplicate.
                counts["not_sent_events"] += batch.event_count
                not_sent.append((batch, 0, None, "not sent: the endpoint refused the configuration ID"))
                continue
            counts["batches"] += 1
            yield batch

    def on_outcome(batch: Any, outcome: Any) -> None:
        if outcome.acknowledged:
            pending_acks.append((batch, outcome.attempts))
            counts["delivered_events"] += batch.event_count
            # Flushed by count or by age: a killed task re-sends only what it could not record.
            if len(pending_acks) >= _LEDGER_GROUP or time.monotonic() >= ack_flush_at[0]:
                ack_writes.append(writer.submit(ledger.record_acknowledged, partition, list(pending_acks), run_id))
                pending_acks.clear()
                ack_flush_at[0] = time.monotonic() + _ACK_FLUSH_SECONDS
                while ack_writes and ack_writes[0].done():
                    ack_writes.popleft().result()  # a failed write stops the run
            return
        counts["failed_batches"] += 1
        counts["permanently_failed_batches"] += int(bool(outcome.permanent))
        if outcome.status == 404:
            abort.append(outcome.status)
        counts["failed_events"] += batch.event_count
        failures.append((batch, outcome.attempts, outcome.status, outcome.error or "failed"))
        failed_lines.append(
            orjson.dumps(
                {
                    "partition": partition,
                    "shard": shard,
                    "batch_id": batch.batch_id,
                    "event_count": batch.event_count,
                    "event_ids": list(batch.event_ids),
                    "http_status": outcome.status,
                    "error": outcome.error,
                    "permanent": outcome.permanent,
                    "attempts": outcome.attempts,
                    "response_excerpt": outcome.response_excerpt,
                }
            )
        )

    shard_events = sum(len(session.entries) for session in sessions)
    # Every event ends in exactly one of these; what is left is still to be decided.
    resolved = ("delivered_events", "delivered_earlier_tries_events", "previously_delivered_events",
                "failed_events", "envelope_expired_events", "not_sent_events")
    planner = ShardPlanner(
        sessions,
        lambda session: plan_session(session, stored, now, partition=partition, max_events=max_events,
                                     acknowledged=acknowledged, held=held_index, this_run=this_run),
        lambda plan: plan.expired_lines(partition, shard),
        group_size=_LEDGER_GROUP, name=f"planner-shard-{shard}",
    )
    try:
        with planner:
            stats = send_batches(  # a progress line every progress_interval_seconds (connection extra)
                batches(planner), on_outcome, label=f"shard {shard}",
                remaining=lambda: f"{shard_events - sum(counts[key] for key in resolved):,} events",
            )
    finally:
        # Acknowledgements already queued are written even when the run failed.
        writer.shutdown(wait=True)
    while ack_writes:
        ack_writes.popleft().result()
    if pending_acks:
        ledger.record_acknowledged(partition, pending_acks, run_id)
    if failures or not_sent:
        ledger.record_failed(partition, failures + not_sent, run_id)
    if failures:
        with storage.open_output(layout.failed_part(shard)) as out:
            out.write(b"\n".join(failed_lines) + b"\n")
    if expired_lines:
        with storage.open_output(layout.expired_part(shard)) as out:
            out.write(b"\n".join(expired_lines) + b"\n")
    counts["batches_sent"] = counts["batches"]
    counts["requests"] = int(getattr(stats, "requests", 0))
    counts["retries"] = int(getattr(stats, "retries", 0))
    counts["delivered_this_run_events"] = counts["delivered_events"] + counts["delivered_earlier_tries_events"]

    this_try = {
        "try": int(try_number),
        **{name: int(counts[name]) for name in ("delivered_events", "failed_events", "batches", "requests", "retries")},
    }
    tries = [t for t in earlier_tries if t.get("try") != this_try["try"]] + [this_try]
    # Every counter is written, zeros included, so readers never guess what a missing key means.
    names = dict.fromkeys((*SHARD_COUNTERS, "permanently_failed_batches", "delivered_this_run_events", *counts))
    result = {"shard": shard, "partition": partition, **{k: int(counts[k]) for k in names}, "tries": tries}
    storage.write_json(layout.result(shard), result)
    _LOG.info(
        "Shard %d: %d sessions, %d batches sent, %d events delivered by this try, %d by earlier tries of this "
        "run, %d by earlier runs, %d events in %d failed batches, %d not sent, %d held back (envelope "
        "expired), %d with the store's fresher envelope, %d requests, %d retries",
        shard,
        counts["sessions"],
        counts["batches"],
        counts["delivered_events"],
        counts["delivered_earlier_tries_events"],
        counts["previously_delivered_events"],
        counts["failed_events"],
        counts["failed_batches"],
        counts["not_sent_events"],
        counts["envelope_expired_events"],
        counts["envelope_replaced_events"],
        counts["requests"],
        counts["retries"],
    )
    done = ShardResult(result, stats)
    if abort:
        raise ConfigurationRefused(
            done,
            f"shard {shard}: LiveRamp's send-events answered 404 Not Found: it does not know the ATS "
            f"configuration ID in connection {config.conn_id} (its password field). Nothing more "
            f"was sent ({counts['not_sent_events']} events held back, {counts['delivered_events']} delivered "
            "by this try). Copy the ID from LiveRamp Console > ATS > configuration > Admin into the "
            "connection, then clear this run's failed tasks.",
        )
    if failures:
        reasons = Counter(error for _, _, _, error in failures)
        summary = ", ".join(f"{reason} x{n}" for reason, n in reasons.most_common(5))
        message = (
            f"shard {shard}: {len(failures)} of {counts['batches']} batches sent ({counts['failed_events']} "
            f"events) failed for good ({summary}); {counts['delivered_events']} events were delivered by this "
            f"try, {counts['delivered_earlier_tries_events'] + counts['previously_delivered_events']} before it. "
            f"See {layout.folder}/{layout.failed} after the report; a rerun sends only what was not acknowledged."
        )
        raise DeliveryFailed(done, message, permanent=counts["permanently_failed_batches"] == len(failures))
    return done
