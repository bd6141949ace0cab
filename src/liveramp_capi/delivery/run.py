"""The state of one engine run and its pacing: the adaptive rate and in-flight limit, the
client-side token bucket they drive, and when a 429 holds every request."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Generic, TypeVar

import aiohttp

from liveramp_capi.delivery.adaptive import InFlightLimit, RateMeter, ThrottleRate
from liveramp_capi.delivery.exchange import Exchange, RequestStats
from liveramp_capi.delivery.ratelimit import RateLimiter
from liveramp_capi.delivery.settings import CapiSettings

__all__ = ["EngineRun"]

log = logging.getLogger("liveramp_capi.delivery")

ItemT = TypeVar("ItemT")
OutcomeT = TypeVar("OutcomeT")
StatsT = TypeVar("StatsT", bound=RequestStats)
SleepFunc = Callable[[float], Awaitable[Any]]

#: Share of refused answers (429, 5xx, no answer) in the last second above which a 429 holds
#: every request, not only its own: the endpoint is refusing most of what it gets.
_HOLD_ALL_SHARE = 0.5


class EngineRun(Generic[ItemT, OutcomeT, StatsT]):
    """Mutable state of one run, shared by the workers of one event loop, and how its pacing
    reacts to each answer."""

    __slots__ = (
        "adaptive",
        "answers",
        "done",
        "group",
        "lost",
        "workers",
        "error",
        "exchange",
        "failed",
        "iterator",
        "limiter",
        "on_outcome",
        "rate",
        "refused",
        "session",
        "slots",
        "started",
        "stats",
        "stop",
        "waiting",
    )

    def __init__(
        self,
        iterator: Iterator[ItemT],
        exchange: Exchange[ItemT, OutcomeT],
        on_outcome: Callable[[ItemT, OutcomeT], None],
        session: aiohttp.ClientSession,
        settings: CapiSettings,
        stats: StatsT,
        sleep: SleepFunc,
        now: float,
    ) -> None:
        self.iterator = iterator
        self.exchange = exchange
        self.on_outcome = on_outcome
        self.session = session
        self.stats = stats
        self.adaptive = settings.adaptive
        self.limiter = RateLimiter(settings.max_requests_per_second, sleep=sleep)
        self.rate = ThrottleRate(settings.max_requests_per_second, now)
        self.slots = InFlightLimit(settings.concurrency, settings.adaptive)
        self.answers = RateMeter(1.0, now)
        self.refused = RateMeter(1.0, now)
        self.started = now
        self.done = 0
        self.failed = 0
        self.lost = 0  # requests presumed lost: still open, no longer counted in flight
        self.workers = 0
        self.group: asyncio.TaskGroup | None = None
        self.waiting = 0
        self.stop = False
        self.error: BaseException | None = None

    def fail(self, exc: BaseException) -> None:
        # Keep the first error; workers finish their in-flight item and stop pulling.
        if self.error is None:
            self.error = exc
        self.stop = True

    def admitted(self, now: float, sent_at: float) -> None:
        """An answer other than 429: let the adaptive rate climb."""
        self.note_refused(now, False)
        if self.adaptive:
            withdrawn = self.rate.withdrawn
            new_rate = self.rate.on_admitted(now, sent_at)
            if self.rate.withdrawn != withdrawn:
                self._pacing_off()
            if new_rate is not None:
                self.limiter.set_rate(new_rate, _burst(new_rate))

    def throttled(self, now: float, sent_at: float, hold: float) -> None:
        """A 429: delay this item (the caller sleeps), lower the rate, and hold everyone only
        when most answers of the last second were refusals."""
        share = self.note_refused(now, True)
        if self.adaptive:
            withdrawn = self.rate.withdrawn
            new_rate = self.rate.on_throttled(now, sent_at)
            if self.rate.withdrawn != withdrawn:
                self._pacing_off()
            if new_rate is not None:
                self.stats.rate_decreases += 1
                self.limiter.set_rate(new_rate, _burst(new_rate))
                log.debug(
                    "request rate lowered to %.0f/s: %.1f%% of answers 429 over the last %.1f s",
                    new_rate,
                    100 * self.rate.last_event,
                    self.rate.WINDOW,
                )
        if (share > _HOLD_ALL_SHARE or not self.adaptive) and hold > 0:
            before = self.limiter.pauses
            self.limiter.pause_for(hold)
            self.stats.pauses += self.limiter.pauses - before

    def _pacing_off(self) -> None:
        self.stats.pacing_withdrawals += 1
        ceiling = self.rate.ceiling
        self.limiter.set_rate(ceiling, 1)  # as the run started: the ceiling alone
        log.info(
            "request pacing off again: %.1f%% of answers are still 429 at the lower rate, so they "
            "do not follow the rate (pacing returns above %.1f%%)",
            100 * self.rate.tolerated,
            100 * self.rate.noise,
        )

    def note_refused(self, now: float, refused: bool) -> float:
        """Record one answer and return the share of refusals over the last second."""
        self.answers.add(now)
        if not refused:
            return 0.0
        self.refused.add(now)
        return self.refused.rate(now) / max(self.answers.rate(now), 1e-9)


def _burst(rate: float) -> int:
    # About 20 ms of requests back to back: smooth enough for a token bucket of burst R/10.
    return max(1, int(rate / 50))
