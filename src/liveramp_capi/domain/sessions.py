"""Session grouping keys, shard spill files and sessionisation.

The CAPI adapter wants every batch to hold the events of ONE user session. A partition can
hold millions of events, so grouping happens in two passes with bounded memory:

1. while validating, each event is spilled by :class:`ShardWriter` to one of N shard files
   chosen by the hash of its session grouping key, so all events of a user land in one shard;
2. one task per shard reads its file back (:func:`read_shard`), groups and orders the events
   per key and splits identity keys into sessions at inactivity gaps (:func:`sessionise`).

A shard line is ``<header JSON>\\t<event JSON>\\n``. JSON escapes every control character
inside strings, so the first raw tab always ends the header and no raw newline can occur
inside a line; the event JSON is kept as bytes and is never parsed again on the way out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from operator import itemgetter
from types import TracebackType
from typing import Any, BinaryIO, NamedTuple

import orjson

#: Inactivity after which an identity (``u:``) key starts a new session, as in web analytics.
DEFAULT_SESSION_GAP_SECONDS = 1800

#: Spill buffer per shard before it is handed to the stream; bounds memory at N x this.
_FLUSH_BYTES = 64 * 1024

_DEVICE_ID_FIELDS = ("idfa", "idfv", "gaid")


class ShardFormatError(ValueError):
    """A shard file line that cannot be parsed (truncated or corrupted spill file)."""


def session_grouping_key(event: dict[str, Any], session_id: str | None) -> str:
    """Return the key whose events may share a batch.

    An explicit session id wins. Without one, the user's identity stands in: the envelope
    (``user_data.partner_id``) for a web user, the envelope plus device ids for a mobile user,
    and :func:`sessionise` later splits that identity's events at inactivity gaps.

    The key embeds identifiers: it must never be logged or put in an exception message.

    :param event: a validated event (a dict shaped like one element of ``events``).
    :param session_id: the session id supplied with the event, if any.
    """
    if session_id:
        return "s:" + session_id
    user_data = event.get("user_data") or {}
    parts = [user_data.get("partner_id") or ""]
    parts.extend(user_data.get(field) or "" for field in _DEVICE_ID_FIELDS)
    return "u:" + "\x1f".join(str(part) for part in parts)


def key_hash(key: str) -> int:
    """Return a stable 63-bit non-negative hash of a grouping key.

    63 bits so the value fits a signed BIGINT in any database (the ledger filters shards by
    ``session_key_hash % shard_count`` in SQL). Python's ``hash`` is salted per process and so
    unusable across tasks and machines.

    :param key: a key from :func:`session_grouping_key`.
    """
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 1


def plan_shard_count(estimated_events: int, *, events_per_shard: int = 100_000, max_shards: int = 256) -> int:
    """Choose how many shards a partition is spilled into.

    A shard is loaded whole by its task, so ``events_per_shard`` bounds a task's memory; the
    cap bounds the number of open spill files and of mapped tasks.

    :param estimated_events: expected number of valid events (an estimate is fine).
    :param events_per_shard: target events per shard.
    :param max_shards: upper bound on the result.
    """
    if events_per_shard < 1 or max_shards < 1:
        raise ValueError("events_per_shard and max_shards must be >= 1")
    wanted = -(-max(estimated_events, 0) // events_per_shard)
    return max(1, min(max_shards, wanted))


class ShardEntry(NamedTuple):
    """One spilled event (a NamedTuple: cheapest to build and sort by the million).

    :param key: session grouping key (holds identifiers: never log it).
    :param key_hash: :func:`key_hash` of ``key``.
    :param event_time: Unix seconds.
    :param event_id: the event's ``event_id``.
    :param ordinal: position of the event in the partition, for a stable order on ties.
    :param user_key: an opaque per-user key supplied by the validator, if any.
    :param event_json: compact JSON of the event exactly as it will be sent.
    :param envelope_issued_at: Unix time the event's own envelope was issued, if known.
    :param envelope_expires_at: Unix time the event's own envelope expires, if known (see
        :mod:`liveramp_capi.domain.envelopes`); the send step resolves a fresher one or holds it.
    """

    key: str
    key_hash: int
    event_time: int
    event_id: str
    ordinal: int
    user_key: str | None
    event_json: bytes
    envelope_issued_at: int | None = None
    envelope_expires_at: int | None = None


class ShardWriter:
    """Spill events to ``shard_count`` shard streams, routed by the hash of their key.

    All streams are opened up front (a partition touches nearly every shard anyway) and each
    gets a write buffer, so a write is one hash, two small serialisations and an append.
    """

    def __init__(self, shard_count: int, open_shard: Callable[[int], BinaryIO]) -> None:
        """Open every shard stream.

        :param shard_count: number of shards, >= 1 (see :func:`plan_shard_count`).
        :param open_shard: opens the writable binary stream of shard ``i``; the writer closes it.
        """
        if shard_count < 1:
            raise ValueError("shard_count must be >= 1")
        self.shard_count = shard_count
        self._streams: list[BinaryIO] = []
        try:
            for index in range(shard_count):
                self._streams.append(open_shard(index))
        except BaseException:
            for stream in self._streams:
                stream.close()
            raise
        self._buffers: list[list[bytes]] = [[] for _ in range(shard_count)]
        self._buffered: list[int] = [0] * shard_count
        self.counts: list[int] = [0] * shard_count
        self._ordinal = 0
        self._closed = False

    def write(
        self,
        key: str,
        event_time: int,
        event_id: str,
        user_key: str | None,
        event: dict[str, Any],
        envelope_issued_at: int | None = None,
        envelope_expires_at: int | None = None,
    ) -> int:
        """Spill one event and return the index of the shard it went to.

        :param key: session grouping key (:func:`session_grouping_key`).
        :param event_time: the event's Unix time in seconds.
        :param event_id: the event's ``event_id``.
        :param user_key: an opaque per-user key to carry along, or None.
        :param event: the event as it will be sent; serialised here with orjson.
        :param envelope_issued_at: when the event's envelope was issued, if known.
        :param envelope_expires_at: when the event's envelope expires, if known.
        """
        if self._closed:
            raise ValueError("ShardWriter is closed")
        hashed = key_hash(key)
        shard = hashed % self.shard_count
        fields = {"k": key, "h": hashed, "t": event_time, "i": event_id, "n": self._ordinal, "u": user_key}
        # Optional keys only when set: older shard lines (and readers) stay valid.
        if envelope_issued_at is not None:
            fields["e"] = envelope_issued_at
        if envelope_expires_at is not None:
            fields["x"] = envelope_expires_at
        header = orjson.dumps(fields)
        line = b"".join((header, b"\t", orjson.dumps(event), b"\n"))
        self._ordinal += 1
        self.counts[shard] += 1
        self._buffers[shard].append(line)
        size = self._buffered[shard] + len(line)
        if size >= _FLUSH_BYTES:
            self._flush(shard)
        else:
            self._buffered[shard] = size
        return shard

    @property
    def total(self) -> int:
        """Number of events written so far."""
        return self._ordinal

    def _flush(self, shard: int) -> None:
        buffer = self._buffers[shard]
        if buffer:
            self._streams[shard].write(b"".join(buffer))
            buffer.clear()
        self._buffered[shard] = 0

    def close(self) -> None:
        """Flush every buffer and close every stream (idempotent)."""
        if self._closed:
            return
        self._closed = True
        error: BaseException | None = None
        for shard, stream in enumerate(self._streams):
            # Close every stream even if one fails, then report the first failure.
            try:
                self._flush(shard)
            except BaseException as exc:
                error = error or exc
            try:
                stream.close()
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def read_shard(stream: BinaryIO) -> Iterator[ShardEntry]:
    """Yield the entries of one shard stream in file order.

    :param stream: a readable binary stream of a shard written by :class:`ShardWriter`.
    :raises ShardFormatError: on a malformed or truncated line (the message holds the line
        number only: a line holds identifiers).
    """
    loads = orjson.loads
    for number, line in enumerate(stream, start=1):
        try:
            tab = line.index(b"\t")
            header = loads(line[:tab])
            event_json = line[tab + 1 : -1]
            # A line cut short by a crash has no newline; a bare "{...}" check catches a
            # corrupted tail without parsing every event again.
            if line[-1:] != b"\n" or event_json[:1] != b"{" or event_json[-1:] != b"}":
                raise ValueError
            key = header["k"]
            hashed = header["h"]
            event_time = header["t"]
            event_id = header["i"]
            ordinal = header["n"]
            user_key = header["u"]
            issued = header.get("e")
            expires = header.get("x")
            if (
                type(key) is not str
                or type(hashed) is not int
                or type(event_time) is not int
                or type(event_id) is not str
                or type(ordinal) is not int
                or (user_key is not None and type(user_key) is not str)
                or (issued is not None and type(issued) is not int)
                or (expires is not None and type(expires) is not int)
            ):
                raise ValueError
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
            raise ShardFormatError(f"malformed shard line {number}") from None
        yield ShardEntry(key, hashed, event_time, event_id, ordinal, user_key, event_json, issued, expires)


@dataclass(slots=True)
class Session:
    """The events of one user session, in ``(event_time, ordinal)`` order.

    :param key: session grouping key (holds identifiers: never log it).
    :param key_hash: :func:`key_hash` of ``key``.
    :param entries: the session's entries, oldest first.
    """

    key: str
    key_hash: int
    entries: list[ShardEntry]


#: ``(event_time, ordinal)`` of an entry (fields 2 and 4 of :class:`ShardEntry`), a C-level key.
_time_order = itemgetter(2, 4)


def sessionise(
    entries: Iterable[ShardEntry], *, gap_seconds: int = DEFAULT_SESSION_GAP_SECONDS
) -> Iterator[Session]:
    """Group a shard's entries into sessions.

    Loads all entries (a shard is sized to fit memory), groups them by key and orders each
    group by ``(event_time, ordinal)``. An identity key (``u:``) is split into a new session
    wherever two consecutive events are more than ``gap_seconds`` apart; an explicit session
    key (``s:``) is never split. Sessions come out ordered by ``(key_hash, key, first event
    time)`` so re-runs cut the same batches.

    :param entries: the entries of one shard, e.g. from :func:`read_shard`.
    :param gap_seconds: inactivity that ends an identity session.
    """
    if gap_seconds < 0:
        raise ValueError("gap_seconds must be >= 0")
    groups: dict[str, list[ShardEntry]] = {}
    for entry in entries:
        group = groups.get(entry.key)
        if group is None:
            groups[entry.key] = [entry]
        else:
            group.append(entry)

    for key in sorted(groups, key=lambda k: (groups[k][0].key_hash, k)):
        group = groups.pop(key)
        if len(group) > 1:
            group.sort(key=_time_order)
        hashed = group[0].key_hash
        if not key.startswith("u:"):
            yield Session(key, hashed, group)
            continue
        start = 0
        previous = group[0].event_time
        for index in range(1, len(group)):
            event_time = group[index].event_time
            if event_time - previous > gap_seconds:
                yield Session(key, hashed, group[start:index])
                start = index
            previous = event_time
        yield Session(key, hashed, group[start:] if start else group)
