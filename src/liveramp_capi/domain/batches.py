"""Cutting sessions into request batches for the CAPI adapter.

The adapter accepts several events per request only if they belong to one user session, and
warns that very large batches (1000) may misbehave; a batch therefore never spans two
sessions and holds at most ``max_events`` (default 50, the old TikTok Events 1.0 limit).
"""

from __future__ import annotations

from dataclasses import dataclass
from hashlib import blake2b

from liveramp_capi.domain.sessions import Session

#: The adapter's documented ceiling (TikTok Events API 2.0 takes 1,000 per request).
MAX_BATCH_EVENTS_LIMIT = 1000

#: Conservative default: large batches "may result in unexpected behavior" (seed).
DEFAULT_MAX_BATCH_EVENTS = 50

_BODY_HEAD = b'{"events":['
_BODY_TAIL = b"]}"
_BATCH_PERSON = b"capi-batch-v1"


@dataclass(frozen=True, slots=True)
class Batch:
    """One request's worth of events of a single session.

    :param batch_id: 32 hex chars, deterministic in the partition, the session key and the
        batch's events, so a re-run cuts the same ids and the ledger can skip acknowledged ones.
    :param session_key_hash: hash of the session's grouping key (the shard filter in the ledger).
    :param event_ids: the events' ``event_id`` values in body order.
    :param body: the exact request body, ``{"events":[...]}``.
    """

    batch_id: str
    session_key_hash: int
    event_ids: tuple[str, ...]
    body: bytes

    @property
    def event_count(self) -> int:
        """Number of events in the batch."""
        return len(self.event_ids)


def batch_id_for(partition: str, key: str, event_ids: tuple[str, ...], body: bytes) -> str:
    """Return the deterministic id of a batch.

    Every part is length-prefixed so no separator inside an id can make two batches collide.
    The body is hashed too: event ids are not unique (the seed's mobile examples send
    InstallApp and LaunchAPP of one user both as ``event_id`` "1"), and two one-event sessions
    of one user must not share an id, or acknowledging one would skip the other.

    :param partition: the partition name (``YYYY-MM-DD``).
    :param key: the session grouping key.
    :param event_ids: the batch's event ids in body order.
    :param body: the batch's request body.
    """
    return _batch_id(_framed((partition.encode(), key.encode())), event_ids, body)


def _framed(parts: tuple[bytes, ...]) -> bytes:
    return b"".join([len(part).to_bytes(8, "big") + part for part in parts])


def _batch_id(head: bytes, event_ids: tuple[str, ...], body: bytes) -> str:
    # One hash call over the framed parts: the same bytes (so the same id) as one update per
    # part, without two calls per event on the send path. ``head`` is the framed partition
    # and key, the same for every batch of a session.
    ids = b"".join([len(encoded).to_bytes(8, "big") + encoded for encoded in [e.encode() for e in event_ids]])
    return blake2b(
        b"".join((head, ids, len(body).to_bytes(8, "big"), body)), digest_size=16, person=_BATCH_PERSON
    ).hexdigest()


def request_body(event_jsons: list[bytes]) -> bytes:
    """The request body ``{"events":[...]}`` of these compact event JSONs, in order."""
    return b"".join((_BODY_HEAD, b",".join(event_jsons), _BODY_TAIL))


def cut_batches(
    session: Session, *, partition: str, max_events: int = DEFAULT_MAX_BATCH_EVENTS
) -> list[Batch]:
    """Cut a session into consecutive batches of at most ``max_events``, in session order.

    :param session: one session from :func:`~liveramp_capi.domain.sessions.sessionise`.
    :param partition: the partition name, part of every batch id.
    :param max_events: 1..:data:`MAX_BATCH_EVENTS_LIMIT`.
    :raises ValueError: if ``max_events`` is out of range.
    """
    if not 1 <= max_events <= MAX_BATCH_EVENTS_LIMIT:
        raise ValueError(f"max_events must be between 1 and {MAX_BATCH_EVENTS_LIMIT}")
    entries = session.entries
    head = _framed((partition.encode(), session.key.encode()))
    key_hash = session.key_hash
    batches: list[Batch] = []
    for start in range(0, len(entries), max_events):
        chunk = entries[start : start + max_events]
        event_ids = tuple([entry.event_id for entry in chunk])
        body = b"".join((_BODY_HEAD, b",".join([entry.event_json for entry in chunk]), _BODY_TAIL))
        batches.append(Batch(_batch_id(head, event_ids, body), key_hash, event_ids, body))
    return batches
