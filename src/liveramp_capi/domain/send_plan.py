"""What the send step does with one session: which batches go out, which events are held.

Batch ids are cut from the session *as spilled* (every event, held or not), so they depend on
the partition's input only: a rerun cuts the same ids, finds the ones the ledger holds as
acknowledged and skips them, whatever expired or was refreshed in between. The events of a
batch that still has to go out are resolved against the envelope store at send time
(:func:`~liveramp_capi.domain.envelopes.resolve_session`): an event whose every usable
envelope has expired is held (:mod:`liveramp_capi.domain.held`) and left out of the body.
Events the held table owns already (held by an earlier run: waiting, recovered or lost) are
never sent by the send step again.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, MutableMapping
from dataclasses import dataclass, field

import orjson

from liveramp_capi.domain.batches import Batch, cut_batches, request_body
from liveramp_capi.domain.envelopes import EnvelopeOnFile, resolve_session
from liveramp_capi.domain.held import HELD, LOST, REASON_NO_USER_KEY, HeldIndex
from liveramp_capi.domain.sessions import Session, ShardEntry

__all__ = ["SessionPlan", "expired_line", "plan_session"]


@dataclass(slots=True)
class SessionPlan:
    """The send step's decisions for one session.

    :param batches: batches to send now (acknowledged ones are left out).
    :param hold: events held now: record them before any batch of the session is sent.
    :param held_earlier: events the held table owns already, with their ``(state, reason)``.
    :param previously_delivered: events of batches the ledger holds as acknowledged by an earlier run.
    :param delivered_earlier_tries: events of batches acknowledged by an earlier try of this run.
    :param replaced: events sent with the store's fresher envelope.
    """

    batches: list[Batch] = field(default_factory=list)
    hold: list[ShardEntry] = field(default_factory=list)
    held_earlier: list[tuple[ShardEntry, tuple[str, str | None]]] = field(default_factory=list)
    previously_delivered: int = 0
    delivered_earlier_tries: int = 0
    replaced: int = 0

    def add_counts(self, counts: MutableMapping[str, int]) -> None:
        """Add this session's figures to the send step's counters (``envelope_expired_events``
        counts every event not sent for its envelope: held now or by an earlier run)."""
        counts["envelope_replaced_events"] += self.replaced
        counts["previously_delivered_events"] += self.previously_delivered
        counts["delivered_earlier_tries_events"] += self.delivered_earlier_tries
        counts["envelope_expired_events"] += len(self.hold) + len(self.held_earlier)
        counts["envelope_held_earlier_events"] += len(self.held_earlier)

    def expired_lines(self, partition: str, shard: int) -> list[bytes]:
        """The ``envelope_expired.jsonl`` lines of the session's held events, with their state."""
        lines = [
            expired_line(partition, shard, entry, HELD) if entry.user_key
            else expired_line(partition, shard, entry, LOST, REASON_NO_USER_KEY)
            for entry in self.hold
        ]
        lines.extend(expired_line(partition, shard, entry, *fate) for entry, fate in self.held_earlier)
        return lines


def plan_session(
    session: Session,
    stored: Mapping[str, EnvelopeOnFile],
    now: int,
    *,
    partition: str,
    max_events: int,
    acknowledged: Collection[str] | Mapping[str, str | None],
    held: HeldIndex,
    this_run: str = "",
) -> SessionPlan:
    """Decide what happens to each event of one session.

    :param session: one session of the shard.
    :param stored: unexpired store rows of the shard's user keys.
    :param now: the send time.
    :param partition: the partition name.
    :param max_events: events per batch.
    :param acknowledged: the shard's acknowledged batch ids (ledger), or a mapping of them to the
        ledger run id that acknowledged them (``<run_id>#<try>``).
    :param this_run: the ledger run id prefix of this run (``<run_id>#``): batches it acknowledged
        in an earlier try count as this run's deliveries, not an earlier run's.
    :param held: the shard's held events (:meth:`~liveramp_capi.state.held_store.HeldConversions.shard_index`).
    """
    plan = SessionPlan()
    entries = session.entries
    for number, slot in enumerate(cut_batches(session, partition=partition, max_events=max_events)):
        chunk = entries[number * max_events : (number + 1) * max_events]
        rest: list[ShardEntry] = []
        for entry in chunk:
            state = held.state_of(entry)
            if state is None:
                rest.append(entry)
            else:
                plan.held_earlier.append((entry, state))
        if slot.batch_id in acknowledged:
            by = acknowledged.get(slot.batch_id) if isinstance(acknowledged, Mapping) else None
            if this_run and (by or "").startswith(this_run):
                plan.delivered_earlier_tries += len(rest)
            else:
                plan.previously_delivered += len(rest)
            continue
        if not rest:
            continue
        resolved = resolve_session(Session(session.key, session.key_hash, rest), stored, now)
        plan.hold.extend(resolved.expired)
        plan.replaced += resolved.replaced
        if resolved.resolved is None:
            continue
        sent = resolved.resolved.entries
        if len(sent) == len(chunk) and not resolved.replaced:
            plan.batches.append(slot)
            continue
        body = request_body([entry.event_json for entry in sent])
        plan.batches.append(
            Batch(slot.batch_id, session.key_hash, tuple(entry.event_id for entry in sent), body)
        )
    return plan


def expired_line(
    partition: str, shard: int, entry: ShardEntry, state: str, reason: str | None = None
) -> bytes:
    """One line of ``envelope_expired.jsonl``: a held event, its fate so far, and the event itself.

    :param partition: the partition name.
    :param shard: the shard index.
    :param entry: the held event.
    :param state: ``held``, ``delivering``, ``recovered`` or ``lost`` (see :mod:`~liveramp_capi.domain.held`).
    :param reason: why it was lost, if it was.
    """
    head = {
        "partition": partition,
        "shard": shard,
        "event_id": entry.event_id,
        "code": "envelope_expired",
        "reason": "envelope expired",
        "envelope_expires_at": entry.envelope_expires_at,
        "held": state,
    }
    if reason:
        head["lost_reason"] = reason
    return b"".join((orjson.dumps(head)[:-1], b',"record":', entry.event_json, b"}"))
