"""Held conversions: events not sent because their envelope had expired, kept to be won back.

When every envelope an event could use has expired, the send step does not send it; it records
it (:mod:`liveramp_capi.state.held_store`, next to the ledger) before any batch
of its session goes out. From then on this table owns the event: a rerun of its partition skips
it, and :func:`~liveramp_capi.domain.recovery.recover_held_conversions` delivers it once a live
envelope for the same user key appears in the envelope store (a later partition brought one, or
a refresh renewed one), as long as the event is still inside the attribution window.

States: ``held`` (waiting for a fresh envelope) -> ``delivering`` (claimed by one recovery run,
under a lease) -> ``recovered`` (acknowledged by the adapter), or ``lost`` with a reason (no
user key to match, the attribution window passed, or the adapter refused it). Each event has a
fixed recovery batch id, recorded in the delivery ledger under its own partition, so a recovery
interrupted after the adapter accepted it never sends it again.

A held event keeps its identifiers: it is a secret for logs; only counts leave the store.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import orjson

from liveramp_capi.domain.batches import Batch
from liveramp_capi.domain.sessions import ShardEntry

HELD = "held"
DELIVERING = "delivering"
RECOVERED = "recovered"
LOST = "lost"
STATES: tuple[str, ...] = (HELD, DELIVERING, RECOVERED, LOST)

REASON_NO_USER_KEY = "no user key: no fresher envelope can be matched to it"
REASON_WINDOW_PASSED = "attribution window passed before a fresh envelope arrived"


def event_key(event_type: str, event_id: str) -> str:
    """The table key of an event: TikTok deduplicates on event name + ``event_id``."""
    digest = hashlib.blake2b(digest_size=16, person=b"capi-held-v1")
    for part in (event_type.encode(), event_id.encode()):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def event_type_of(entry: ShardEntry) -> str:
    """The entry's ``event_type`` (empty when it has none)."""
    value = orjson.loads(entry.event_json).get("event_type")
    return value if isinstance(value, str) else ""


@dataclass(frozen=True, slots=True)
class HeldConversion:
    """One held event as claimed for recovery, with the live envelope of its user key.

    :param partition: the partition the event came in.
    :param event_key: :func:`event_key` of the event.
    :param event_id: its ``event_id``.
    :param session_key_hash: its session's key hash (the ledger's shard filter).
    :param batch_id: its fixed recovery batch id.
    :param event_json: the event as spilled (secret for logs).
    :param envelope: the live envelope that replaces its expired one (secret for logs).
    """

    partition: str
    event_key: str
    event_id: str
    session_key_hash: int
    batch_id: str
    event_json: bytes = field(repr=False)
    envelope: str = field(repr=False)

    def batch(self) -> Batch:
        """The one-event batch that delivers it, carrying the live envelope."""
        event = orjson.loads(self.event_json)
        user_data = event.get("user_data")
        if isinstance(user_data, dict):
            user_data["partner_id"] = self.envelope
        body = b'{"events":[' + orjson.dumps(event) + b"]}"
        return Batch(self.batch_id, self.session_key_hash, (self.event_id,), body)


class HeldIndex:
    """The held events of one send shard, to tell the send step which entries it no longer owns.

    :param states: ``{event_key: (state, reason)}`` of the shard's held rows.
    :param event_ids: their ``event_id`` values (only entries with one of these are parsed).
    """

    def __init__(self, states: dict[str, tuple[str, str | None]], event_ids: set[str] | None = None) -> None:
        self._states = states
        self._event_ids = event_ids

    def state_of(self, entry: ShardEntry) -> tuple[str, str | None] | None:
        """``(state, reason)`` when the entry is held (in any state), else None.

        Parses the event only when the shard has held events at all.
        """
        if not self._states or (self._event_ids is not None and entry.event_id not in self._event_ids):
            return None
        return self._states.get(event_key(event_type_of(entry), entry.event_id))
