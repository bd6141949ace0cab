"""Send: one shard of a partition's sessions delivered to the CAPI adapter, through the ledger."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from liveramp_capi import metrics
from liveramp_capi.operators.config_errors import permanent_config_errors

#: How many batches are marked in flight, and how many outcomes are written, per ledger call.
#: Larger groups mean fewer round trips; the next group is marked while this one is sent, so a
#: crash leaves at most twice this many batches "in flight" beyond the requests really on the wire.
_LEDGER_GROUP = 256
#: Acknowledgements are also written when the oldest unwritten one is this old, so a SIGKILL
#: loses (and a rerun re-sends) at most about this much of acknowledged work.
_ACK_FLUSH_SECONDS = 0.5


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
    :param landing_root: URL of the landing root (templated; used only to check the partition).
    :param output_root: URL of the output root (templated).
    :param liveramp_capi_conn_id: the CAPI adapter connection.
    :param capi_state_conn_id: the state database connection.
    :param session_gap_seconds: inactivity that ends an envelope-keyed session.
    :param max_batch_events: overrides the connection's ``max_batch_events`` (1..1000).
    :param dry_run: plan the shard's batches exactly as a real run would and write the plan;
        send nothing and write nothing to the state database (templated).
    """

    template_fields: Sequence[str] = ("partition", "landing_root", "output_root", "dry_run")
    ui_color = "#e6f4ea"

    def __init__(
        self,
        *,
        shard: int,
        partition: str,
        landing_root: str,
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
        self.landing_root = landing_root
        self.output_root = output_root
        self.liveramp_capi_conn_id = liveramp_capi_conn_id
        self.capi_state_conn_id = capi_state_conn_id
        self.session_gap_seconds = session_gap_seconds
        self.max_batch_events = max_batch_events
        # A templated field that shadows BaseOperator.dry_run(), which nothing calls on a send task.
        self.dry_run = dry_run  # type: ignore[method-assign,assignment]

    def execute(self, context: Any) -> dict[str, Any]:
        from liveramp_capi.hooks.capi import LiveRampCapiHook
        from liveramp_capi.hooks.state import CapiStateHook
        from liveramp_capi.operators.config_errors import setting_flag
        from liveramp_capi.operators.partition_claim import holding_partition
        from liveramp_capi.storage import PartitionStorage

        shard = int(self.shard)
        dry_run = setting_flag(self.dry_run, "dry_run")
        with permanent_config_errors():
            storage = PartitionStorage(self.landing_root, self.output_root, self.partition, context["run_id"])
        partition = storage.partition
        run_id = f"{context['run_id']}#{context['ti'].try_number}"

        # Nothing is sent without a ledger: an unreachable state database stops the task here.
        state = CapiStateHook(capi_state_conn_id=self.capi_state_conn_id)
        with permanent_config_errors(self.capi_state_conn_id), state.opened("sent"):
            ledger = state.get_ledger()
            envelope_store = state.get_envelope_store()
            held = state.get_held_conversions()

        capi = LiveRampCapiHook(liveramp_capi_conn_id=self.liveramp_capi_conn_id)
        with permanent_config_errors(self.liveramp_capi_conn_id):
            settings = capi.get_settings()
        max_events = int(self.max_batch_events or settings.max_batch_events)

        with holding_partition(state, partition, context) as claim:
            if dry_run:
                return self._plan(storage, ledger, envelope_store, held, shard, max_events)
            return self._deliver(context, storage, ledger, envelope_store, held, capi, claim, shard, max_events, run_id)

    def _plan(self, storage: Any, ledger: Any, envelope_store: Any, held: Any, shard: int, max_events: int) -> dict[str, Any]:
        """A dry run's send step: the batches a real run would send now, written as a plan; nothing sent or recorded."""
        import time

        from liveramp_capi.domain.dry_run import PLAN_COUNTERS, overlay_envelopes, plan_line
        from liveramp_capi.domain.send_plan import plan_session
        from liveramp_capi.domain.sessions import read_shard, sessionise

        partition, layout = storage.partition, storage.layout
        shard_count = int(storage.read_json(layout.validation)["shard_count"])
        for stale in (layout.result(shard), layout.plan_part(shard)):
            if storage.exists(stale):
                (storage.output_dir / stale).unlink()
        # Read-only look-ups, the same a real send makes: acknowledged batches are not planned,
        # events the held table owns are not either.
        acknowledged = ledger.acknowledged_batch_runs(partition, shard, shard_count)
        held_index = held.shard_index(partition, shard, shard_count)
        with storage.output(layout.shard(shard)).open("rb") as stream:
            sessions = list(sessionise(read_shard(stream), gap_seconds=self.session_gap_seconds))
        now = int(time.time())
        keys = {entry.user_key for session in sessions for entry in session.entries if entry.user_key}
        stored = envelope_store.resolve(keys, now=now, include_expired=True)
        with storage.output(layout.envelope_overlay).open("rb") as overlay:
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
        self.log.info(
            "Dry run, shard %d: %d sessions, %d batches (%d events) planned, %d events delivered earlier, "
            "%d would be held (envelope expired); nothing sent",
            shard, counts["sessions"], counts["planned_batches"], counts["planned_events"],
            counts["previously_delivered_events"], counts["envelope_expired_events"],
        )
        return {k: result[k] for k in ("shard", "partition", "events", "planned_batches", "planned_events")}

    def _deliver(
        self,
        context: Any,
        storage: Any,
        ledger: Any,
        envelope_store: Any,
        held: Any,
        capi: Any,
        claim: Any,
        shard: int,
        max_events: int,
        run_id: str,
    ) -> dict[str, Any]:
        import time
        from collections import deque
        from concurrent.futures import Future, ThreadPoolExecutor

        import orjson

        from liveramp_capi.delivery.heap import collector_paused
        from liveramp_capi.domain.batches import Batch
        from liveramp_capi.domain.send_plan import plan_session
        from liveramp_capi.domain.sessions import read_shard, sessionise
        from liveramp_capi.domain.summary import SHARD_COUNTERS

        partition, layout = storage.partition, storage.layout
        this_run = f"{context['run_id']}#"
        shard_count = int(storage.read_json(layout.validation)["shard_count"])
        # The tries of this run that came before this one, so the run's counts add up over tries.
        earlier_tries = []
        if storage.exists(layout.result(shard)):
            earlier_tries = list(storage.read_json(layout.result(shard)).get("tries", []))
        # A result or failure list from an earlier try must not be counted for this one.
        for stale in (layout.result(shard), layout.failed_part(shard), layout.expired_part(shard)):
            if storage.exists(stale):
                (storage.output_dir / stale).unlink()

        # Batches are cut deterministically from the shard, so a rerun cuts the same batches and
        # skips the acknowledged ones by id. (Skipping by event_id would be wrong: ids repeat
        # across event types, the seed's own app examples all use "1".) Who acknowledged them
        # decides whether they count as this run's deliveries (an earlier try) or an earlier run's.
        acknowledged = ledger.acknowledged_batch_runs(partition, shard, shard_count)
        unknown_outcome = ledger.unresolved_batches(partition, shard, shard_count)
        if unknown_outcome:
            self.log.warning(
                "Shard %d: %d batches were in flight when an earlier try stopped; their outcome is unknown, "
                "so they are sent again (TikTok deduplicates event_id within 48 hours)",
                shard,
                len(unknown_outcome),
            )
        # The sessions live until the task ends: collections while reading them are wasted work
        # (the engine keeps the collector off them while sending, see delivery/heap.py).
        with collector_paused(), storage.output(layout.shard(shard)).open("rb") as stream:
            sessions = list(sessionise(read_shard(stream), gap_seconds=self.session_gap_seconds))
        # Envelope resolution: the freshest unexpired envelope per user key, the record's own or
        # the store's; one look-up for the shard (chunked), decided at send time.
        now = int(time.time())
        with collector_paused():
            stored = envelope_store.resolve(
                {entry.user_key for session in sessions for entry in session.entries if entry.user_key}, now=now
            )
        expired_lines: list[bytes] = []
        # Events held by an earlier run belong to the held table (recovery delivers them);
        # events held now are recorded there before any batch of their session is sent.
        held_index = held.shard_index(partition, shard, shard_count)
        pending_holds: list[Any] = []

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

        # Ledger and held-table writes run on one writer thread, in submission order, so the
        # event loop never waits on the database while requests are in flight. A batch is only
        # handed to the loop once the write marking it in flight has committed.
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ledger-shard-{shard}")
        ack_writes: deque[Future[None]] = deque()

        def mark(group: list[Batch], holds: list[Any]) -> None:
            # A run that lost its claim to another run must not put one more batch on the wire.
            claim.ensure_held()
            if holds:
                held.hold(partition, holds, now=now)
            ledger.mark_in_flight(partition, group, run_id)

        def submit_mark(group: list[Batch]) -> tuple[Future[None], list[Batch]]:
            holds = list(pending_holds)
            pending_holds.clear()
            return writer.submit(mark, group, holds), group

        def batches() -> Iterator[Batch]:
            group: list[Batch] = []
            marking: tuple[Future[None], list[Batch]] | None = None
            for session in sessions:
                counts["events"] += len(session.entries)
                plan = plan_session(session, stored, now, partition=partition, max_events=max_events,
                                    acknowledged=acknowledged, held=held_index, this_run=this_run)
                plan.add_counts(counts)
                pending_holds.extend(plan.hold)
                expired_lines.extend(plan.expired_lines(partition, shard))
                for batch in plan.batches:
                    if abort:
                        # The endpoint refused the configuration itself: nothing more is sent.
                        counts["not_sent_events"] += batch.event_count
                        continue
                    group.append(batch)
                    if len(group) >= _LEDGER_GROUP:
                        # The next group is marked while this one goes out.
                        submitted = submit_mark(group)
                        if marking is not None:
                            yield from _in_flight(*marking)
                        marking, group = submitted, []
            if group:
                submitted = submit_mark(group)
                if marking is not None:
                    yield from _in_flight(*marking)
                marking = submitted
            if marking is not None:
                yield from _in_flight(*marking)
            if pending_holds:
                holds = list(pending_holds)
                pending_holds.clear()
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
        try:
            stats = capi.send_batches(  # a progress line every progress_interval_seconds (connection extra)
                batches(), on_outcome, label=f"shard {shard}",
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
        metrics.delivered(counts, stats)

        this_try = {
            "try": int(context["ti"].try_number),
            **{name: int(counts[name]) for name in ("delivered_events", "failed_events", "batches", "requests", "retries")},
        }
        tries = [t for t in earlier_tries if t.get("try") != this_try["try"]] + [this_try]
        # Every counter is written, zeros included, so readers never guess what a missing key means.
        names = dict.fromkeys((*SHARD_COUNTERS, "permanently_failed_batches", "delivered_this_run_events", *counts))
        result = {"shard": shard, "partition": partition, **{k: int(counts[k]) for k in names}, "tries": tries}
        storage.write_json(layout.result(shard), result)
        self.log.info(
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
        if abort:
            raise AirflowFailException(
                f"shard {shard}: LiveRamp's send-events answered 404 Not Found: it does not know the ATS "
                f"configuration ID in connection {self.liveramp_capi_conn_id} (its password field). Nothing more "
                f"was sent ({counts['not_sent_events']} events held back, {counts['delivered_events']} delivered "
                "by this try). Copy the ID from LiveRamp Console > ATS > configuration > Admin into the "
                "connection, then clear this run's failed tasks."
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
            # A permanent refusal (4xx) will not heal by retrying the task; exhausted retries may.
            if counts["permanently_failed_batches"] == len(failures):
                raise AirflowFailException(message)
            raise AirflowException(message)
        return {k: result[k] for k in ("shard", "partition", "events", "delivered_this_run_events", "failed_events")}
