"""How fast and how wide the engine sends: a request rate that follows 429 answers and an in-flight
limit that follows latency, each below an optional hard ceiling of the connection.

* :class:`ThrottleRate` is the client-side token bucket of the AWS SDKs' adaptive retry mode:
  off until 429s stand out (more than 5% of a whole half second's answers), then AIMD: on a
  congestion event (more than 2% of the last half second's answers were 429) the rate drops by
  that share plus a margin (at least a tenth), then climbs back by absolute steps that grow the
  longer no 429 comes. One congestion event lowers the rate once: 429s of requests sent before
  the last decrease are echoes of the old rate, and no second decrease comes within
  ``HOLD_OFF``. The steps up and the hold-off are absolute (requests/s per second; seconds), the
  same for every shard, so several shards against one server limit converge to equal shares
  without talking to each other. A decrease after which the share of 429s stays the same turns
  pacing off again: those 429s come at random, whatever the rate.
* :class:`InFlightLimit` is a gradient limit in the spirit of Netflix's concurrency-limits: it
  doubles while the answers' median latency stays near its long-run level (slow start), grows by
  ``sqrt(limit)`` per window afterwards, and shrinks by a fifth when latency doubles or most
  requests of a window fail.

Everything here runs on one event loop thread; nothing is thread-safe.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque

__all__ = ["InFlightLimit", "RateMeter", "ThrottleRate"]


class RateMeter:
    """Events per second over a sliding window, kept in ten slots (no per-event allocation).

    :param window: the window in seconds.
    :param started: clock time of the meter's start, so an early reading is not diluted.
    """

    __slots__ = ("_counts", "_head", "_slot", "_started", "_window")

    def __init__(self, window: float, started: float) -> None:
        self._window = window
        self._slot = window / 10
        self._counts = [0] * 10
        self._head = math.floor(started / self._slot)
        self._started = started

    def _advance(self, now: float) -> None:
        slot = math.floor(now / self._slot)
        if slot <= self._head:
            return
        for index in range(self._head + 1, min(slot, self._head + 10) + 1):
            self._counts[index % 10] = 0
        self._head = slot

    def add(self, now: float, count: int = 1) -> None:
        """Count ``count`` events at ``now``."""
        self._advance(now)
        self._counts[self._head % 10] += count

    def count(self, now: float) -> int:
        """Events in the window."""
        self._advance(now)
        return sum(self._counts)

    def rate(self, now: float) -> float:
        """Events per second over the window (over the time since the start when shorter)."""
        self._advance(now)
        # The ten slots cover nine whole slots plus the part of the current one lived so far.
        oldest = (self._head - 9) * self._slot
        span = max(now - max(oldest, self._started), self._slot / 10)
        return sum(self._counts) / span


class ThrottleRate:
    """AIMD request rate driven by the share of 429 answers.

    Every shard against one limit sees the same share of 429s, so all of them decrease
    together, each by the same factor; between decreases each climbs by the same absolute
    steps. Equal steps up and proportional steps down is what makes shards converge to equal
    shares without a coordinator (Chiu and Jain): each cycle shrinks the gap between a large and
    a small shard by the decrease factor, while the climb adds the same to both.

    An endpoint may also refuse a share of requests at random, whatever the rate (the faults
    mix: one in ten). Pacing would only slow such a run down (each decrease at the random share,
    once a second, holds the rate at a small fraction of what the endpoint admits), so every
    decrease is reviewed ``HOLD_OFF`` later: when the share of 429s among answers to the requests
    sent since is about the share that caused it (see ``UNFOLLOWED``), pacing goes off again and
    that share is tolerated for a while: only a share well above it (``WORSE``) starts pacing.

    :param ceiling: the connection's hard ceiling in requests/s (0 = none).
    :param started: clock time of the run's start.
    """

    #: The largest factor of a decrease (the smallest step down). The step is the share of 429s
    #: seen (what the shards together sent beyond the limit) plus ``LANDING``, so one decrease
    #: lands all shards together just below the limit instead of far below it.
    BETA = 0.9
    LANDING = 0.05
    #: The smallest factor of one decrease, however many 429s came back.
    DEEPEST = 0.5
    #: The additive increase in requests/s per second, the same for every shard (hence fair),
    #: growing the longer no 429 comes (``RAMP``), so a limit that was raised is found again
    #: (200 requests/s higher after about 4.6 s, 700 after 10 s).
    STEP = 20.0
    RAMP = 4.0
    #: The rate never drops below this, so a fully refused endpoint is still probed.
    FLOOR = 1.0
    #: The window over which the share of 429s is read.
    WINDOW = 0.5
    #: No second decrease this soon after one: the same for every shard, hence fair.
    HOLD_OFF = 1.0
    #: The share of 429s in the window above which a 429 is a congestion event, not a stray one.
    MARGIN = 0.02
    #: Fewer 429s than this in the window are noise, whatever their share: a shard sending 50
    #: requests/s hears 25 answers a half second, where one 429 is already 4%. Without it a small
    #: shard decreases far more often than a large one and never climbs to its fair share.
    EVIDENCE = 3
    #: Pacing starts only above this share of a whole window's answers: an unpaced shard that
    #: overruns a limit sees far more (R = 2,000 against 64 requests every 20 ms: 37%; R + 10%:
    #: 9%), while a few strays are better served by delaying just those.
    START_SHARE = 0.05
    #: A decrease is taken back when the share of 429s after it is still this much of
    #: the share that caused it: the 429s do not follow the rate (a limit's 429s vanish once the
    #: rate is below it). Only then is a share above ``WORSE`` times the tolerated one plus
    #: ``MARGIN`` a congestion event, for ``TOLERANCE_SECONDS``; after that pacing may start
    #: again at ``START_SHARE`` and be reviewed again, so a share misjudged as random (another
    #: shard overrunning a limit while this one slowed down) costs at most that long.
    UNFOLLOWED = 0.6
    WORSE = 1.5
    TOLERANCE_SECONDS = 10.0
    #: How long a review waits for enough answers (50 in the window) before giving up on it.
    REVIEW_WAIT = 2.0
    #: Only a share up to this is ever taken for random refusals: more is a limit overrun,
    #: whoever overruns it.
    RANDOM_AT_MOST = 0.25

    def __init__(self, ceiling: float, started: float) -> None:
        self.ceiling = ceiling
        self.enabled = False  # no client-side pacing until the endpoint first throttles
        self.rate = 0.0
        self.decreases = 0
        self.last_event = 0.0  # the share of 429s that caused the last decrease
        self.tolerated = 0.0  # a share of 429s seen not to follow the rate
        self.withdrawn = 0  # times pacing went off again (see UNFOLLOWED)
        self._review_at: float | None = None  # when to check that the last decrease helped
        self._look_slot = -1
        self._tolerated_until = 0.0
        self._base = 0.0  # the rate set by the last decrease
        self._epoch = started
        self._started = started
        self._sent = RateMeter(1.0, started)
        self._admitted = RateMeter(1.0, started)
        self._answers = RateMeter(self.WINDOW, started)
        self._refusals = RateMeter(self.WINDOW, started)

    @property
    def noise(self) -> float:
        """The share of 429s at or below which a 429 is no congestion event."""
        return self.WORSE * self.tolerated + self.MARGIN if self.tolerated else self.MARGIN

    def on_sent(self, now: float) -> None:
        """Note one request leaving."""
        self._sent.add(now)

    def on_admitted(self, now: float, sent_at: float | None = None) -> float | None:
        """Note an answer other than 429; returns the new rate when pacing is on. Pacing may go
        off here (``withdrawn`` grows; then ``None``)."""
        self._admitted.add(now)
        if sent_at is None or sent_at >= self._epoch:
            self._answers.add(now)
        if not self.enabled:
            return None
        if self._review_at is not None:
            slot = int(now * 8)
            if slot != self._look_slot:  # eight looks a second are enough
                self._look_slot = slot
                if self._withdraw(now):
                    return None
        elapsed = max(0.0, now - self._epoch)
        rate = self._base + self.STEP * elapsed * (1 + elapsed / self.RAMP)
        if self.ceiling:
            rate = min(rate, self.ceiling)
        self.rate = max(rate, self.FLOOR)
        return self.rate

    def on_failed(self, now: float, sent_at: float) -> None:
        """Note an answer that is neither admitted nor 429 (5xx, timeout, lost connection):
        it counts in the share of 429s, not in the admitted rate."""
        if sent_at >= self._epoch:
            self._answers.add(now)

    def on_throttled(self, now: float, sent_at: float) -> float | None:
        """Note a 429; returns the new (lower) rate when it is a new congestion event. Pacing
        may go off here too (``withdrawn`` grows)."""
        if sent_at < self._epoch:
            return None  # sent before the last decrease: an echo of the old rate
        self._answers.add(now)
        self._refusals.add(now)
        if self.enabled and self._review_at is not None:
            self._withdraw(now)
            if self.enabled and self._review_at is not None:
                return None  # the last decrease has not shown yet (or too few answers tell)
        answers = self._answers.count(now)
        refusals = self._refusals.count(now)
        if refusals < self.EVIDENCE:
            return None
        share = refusals / max(answers, 1)
        if self.tolerated and not self.enabled and now >= self._tolerated_until:
            self.tolerated = 0.0  # look again: was it random after all?
        if share <= self.noise:
            return None  # strays, or the share the endpoint refuses whatever the rate
        if not self.enabled:
            # A share above START_SHARE counts over a whole window only: in the first moments a
            # token bucket's burst hides how far beyond its limit the shard sends.
            full = now >= self._started + self.WINDOW and answers >= 50
            if not ((full and share > self.START_SHARE) or (answers >= 10 and share > 0.5)):
                return None  # too few answers yet, or a share an unpaced shard lives with
            # First throttle: what the endpoint admitted is the best guess of its limit.
            current = max(self._admitted.rate(now), self.FLOOR)
            factor = min(self.BETA, max(self.DEEPEST, 1 - share - self.LANDING))
            self.tolerated = 0.0  # paced, every shard must hear the same congestion events
        else:
            # The paced rate, or what was really sent when less (workers waiting out Retry-After).
            current = min(self.rate, max(self._sent.rate(now), self.FLOOR))
            factor = min(self.BETA, max(self.DEEPEST, 1 - share - self.LANDING))
        self._review_at = now + self.HOLD_OFF
        self._epoch = now
        self.enabled = True
        self.decreases += 1
        self.last_event = share
        rate = max(current * factor, self.FLOOR)
        self.rate = self._base = min(rate, self.ceiling) if self.ceiling else rate
        return self.rate

    def _withdraw(self, now: float) -> bool:
        """Turn pacing off when the last decrease did not change the share of 429s
        (see ``UNFOLLOWED``); the rate becomes the ceiling (0 = none). True when it did."""
        if self._review_at is None or now < self._review_at:
            return False
        answers = self._answers.count(now)
        if answers < 50:
            if now >= self._review_at + self.REVIEW_WAIT:
                self._review_at = None  # too slow to tell: take the 429s as following the rate
            return False
        self._review_at = None
        share = self._refusals.count(now) / answers
        if share < self.UNFOLLOWED * self.last_event:
            return False  # the share fell with the rate: a limit
        if max(share, self.last_event) > self.RANDOM_AT_MOST:
            return False  # too many to be random: a limit overrun, whoever overruns it
        self.enabled = False
        self.withdrawn += 1
        self.tolerated = max(self.last_event, share)
        self._tolerated_until = now + self.TOLERANCE_SECONDS
        self.rate = self._base = self.ceiling
        return True


class InFlightLimit:
    """An adaptive limit on requests in flight, with the waiting room of an asyncio semaphore.

    :param ceiling: the hard ceiling (the connection's ``concurrency``).
    :param adaptive: ``False`` pins the limit at the ceiling.
    """

    #: Latency this many times its long-run level means a queue is building somewhere.
    TOLERANCE = 2.0
    DECREASE = 0.8
    INITIAL = 16

    def __init__(self, ceiling: int, adaptive: bool = True) -> None:
        self.ceiling = ceiling
        self.adaptive = adaptive
        self.limit = float(min(ceiling, self.INITIAL) if adaptive else ceiling)
        self.in_flight = 0
        self.decreases = 0
        self._slow_start = True
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._latencies: list[float] = []
        self._failures = 0
        self._peak = 0
        self._long_latency = 0.0

    @property
    def long_latency(self) -> float:
        """The long-run median latency of answers (0 before the first window)."""
        return self._long_latency

    async def acquire(self) -> None:
        """Wait for a free slot."""
        if self.in_flight < self.limit and not self._waiters:
            self._take()
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just before the cancellation
            raise

    def _take(self) -> None:
        self.in_flight += 1
        if self.in_flight > self._peak:
            self._peak = self.in_flight

    def release(self) -> None:
        """Give a slot back and hand free slots to waiters."""
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters and self.in_flight < self.limit:
            waiter = waiters.popleft()
            if not waiter.done():
                self._take()
                waiter.set_result(None)

    def on_answer(self, latency: float | None) -> None:
        """Note one finished request: its latency when answered, ``None`` when it failed
        without a usable answer (timeout, connection error, 5xx)."""
        if not self.adaptive:
            return
        if latency is None:
            self._failures += 1
        else:
            self._latencies.append(latency)
        if len(self._latencies) + self._failures >= max(self.limit, 8):
            self._end_window()

    def _end_window(self) -> None:
        samples = sorted(self._latencies)
        failures, total = self._failures, len(samples) + self._failures
        binding = self._peak >= 0.9 * self.limit
        self._latencies, self._failures, self._peak = [], 0, self.in_flight
        if failures * 2 > total:
            self._shrink()  # most requests fail: more of them will not help
            return
        median = samples[len(samples) // 2]
        if not self._long_latency:
            self._long_latency = median
        elif median > self.TOLERANCE * self._long_latency:
            self._shrink()
            # Let the long-run level follow a lasting change, as Netflix's gradient does.
            self._long_latency = 0.9 * self._long_latency + 0.1 * median
            return
        self._long_latency = 0.9 * self._long_latency + 0.1 * median
        if binding:
            grown = self.limit * 2 if self._slow_start else self.limit + math.sqrt(self.limit)
            self.limit = min(float(self.ceiling), grown)
            self._wake()

    def _shrink(self) -> None:
        self._slow_start = False
        self.decreases += 1
        self.limit = max(1.0, self.limit * self.DECREASE)
