"""Cutting sessions into request batches for the CAPI adapter.

The adapter accepts several events per request only if they belong to one user session, and
warns that very large batches (1000) may misbehave; a batch therefore never spans two
sessions and holds at most ``max_events`` (default 50, the old TikTok Events 1.0 limit).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from liveramp_capi.domain.sessions import Session

#: The adapter's documented ceiling (TikTok Events API 2.0 takes 1,000 per request).
MAX_BATCH_EVENTS_LIMIT = 1000

#: Conservative default: large batches "may result in unexpected behavior" (seed).
DEFAULT_MAX_BATCH_EVENTS = 50

_BODY_HEAD = b'{"events":['
_BODY_TAIL = b"]}"


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
    digest = hashlib.blake2b(digest_size=16, person=b"capi-batch-v1")
    for part in (partition.encode(), key.encode(), *(event_id.encode() for event_id in event_ids), body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


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
    batches: list[Batch] = []
    for start in range(0, len(entries), max_events):
        chunk = entries[start : start + max_events]
        event_ids = tuple(entry.event_id for entry in chunk)
        body = request_body([entry.event_json for entry in chunk])
        batches.append(
            Batch(
                batch_id=batch_id_for(partition, session.key, event_ids, body),
                session_key_hash=session.key_hash,
                event_ids=event_ids,
                body=body,
            )
        )
    return batches
