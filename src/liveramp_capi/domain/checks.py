"""Checks beyond the schema: the event-time window and duplicate event ids within a run."""

from __future__ import annotations

from liveramp_capi.domain.violations import Violation

_DAY = 86_400


class EventTimeWindow:
    """Accept events from ``max_age_days`` ago up to a small clock skew into the future.

    TikTok does not attribute events older than 28 days (FACTS.md), so sending them only wastes
    requests; stale events are rejected one by one, never a whole batch.

    :param now: the reference time, Unix seconds (the run's logical time, for reproducible reruns).
    :param max_age_days: oldest accepted age in days (``max_event_age_days``).
    :param max_future_skew_seconds: how far in the future an event may be (client clocks drift).
    """

    def __init__(self, now: int, *, max_age_days: int = 28, max_future_skew_seconds: int = 300) -> None:
        self.now = int(now)
        self.max_age_days = max_age_days
        self.max_future_skew_seconds = max_future_skew_seconds
        self.oldest = self.now - max_age_days * _DAY
        self.latest = self.now + max_future_skew_seconds

    def check(self, event_time: int) -> Violation | None:
        """Return a violation when ``event_time`` is outside the window, else None.

        :param event_time: the event's Unix seconds.
        """
        if event_time > self.latest:
            ahead = event_time - self.now
            return Violation(
                "event_time_future",
                "/event_time",
                f"event_time is {ahead} s in the future (more than {self.max_future_skew_seconds} s "
                "of allowed clock skew); check the exporter's clock and time zone",
            )
        if event_time < self.oldest:
            age_days = (self.now - event_time) // _DAY
            return Violation(
                "event_time_too_old",
                "/event_time",
                f"event_time is {age_days} days old; TikTok accepts events up to {self.max_age_days} "
                "days old (max_event_age_days)",
            )
        return None


class DuplicateEventIds:
    """Remember the events (``event_type`` + ``event_id``) seen in this run, as 64-bit hashes.

    A Python int in a set costs about 60 bytes against 100+ for a typical id string. Two
    different ids share a 64-bit hash with probability about n^2 / 2^65: roughly
    3e-8 at one million ids (one dropped event in some 30 million such runs), which is
    acceptable for a deduplication that TikTok repeats anyway (same event + event_id in 48 h).
    """

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: set[int] = set()

    def __len__(self) -> int:
        return len(self._seen)

    def seen_before(self, event_id: str, event_type: str = "") -> bool:
        """Record an event; return True when the same event was already recorded.

        An event is the same when its ``event_type`` and ``event_id`` match: that is TikTok's own
        deduplication key, and the seed itself reuses ``event_id`` "1" for an ``InstallApp``, a
        ``LaunchAPP`` and a ``CheckOut`` that are three different conversions.

        :param event_id: the event's id.
        :param event_type: the event's name.
        """
        # Python's own 64-bit hash (SipHash on str): randomised per process but stable within
        # one, which is all a single validate run needs, and ~10x cheaper than a blake2b digest.
        digest = hash((event_type, event_id))
        if digest in self._seen:
            return True
        self._seen.add(digest)
        return False
