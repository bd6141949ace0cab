"""Request pacing shared by all sender workers of one event loop.

Two mechanisms live in one object because every worker must consult both before each request:

* a token bucket (implemented as GCRA: each caller reserves the next free slot, at most a short
  horizon ahead, and sleeps until it, so no lock and no background refill task are needed), and
* a shared "not before" instant: when one worker is told 429 + ``Retry-After``, every worker
  holds its next request until then, instead of each discovering the throttle on its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

__all__ = ["RateLimiter"]

#: How far ahead a caller may book a slot, and how often a caller further back looks again.
_HORIZON = 0.25
_RECHECK = 0.25


class RateLimiter:
    """
    Asyncio token bucket with a shared pause.

    Not thread-safe: use one instance per event loop (all calls happen on the loop thread, and
    no ``await`` separates reading and updating the state).

    :param rate_per_second: sustained request rate; ``0`` means unlimited (only pauses apply).
    :param burst: requests allowed back-to-back after an idle period; default 1, which keeps
        every 1-second window at or below ``rate_per_second + 1`` requests.
    :param sleep: coroutine used to wait; injectable for tests.
    :param clock: monotonic clock in seconds; defaults to the running loop's ``time()``.
    """

    def __init__(
        self,
        rate_per_second: float,
        burst: int | None = None,
        *,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if rate_per_second < 0:
            raise ValueError(f"rate_per_second must be >= 0, got {rate_per_second!r}")
        if burst is not None and burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst!r}")
        self.rate_per_second = float(rate_per_second)
        self.burst = burst or 1
        self._interval = 1.0 / self.rate_per_second if self.rate_per_second > 0 else 0.0
        # A caller may be up to (burst - 1) intervals ahead of the theoretical schedule.
        self._tolerance = self._interval * (self.burst - 1)
        self._tat = float("-inf")  # theoretical arrival time of the next request
        self._not_before = float("-inf")
        self._sleep = sleep
        self._clock = clock
        self.pauses = 0

    def set_rate(self, rate_per_second: float, burst: int | None = None) -> None:
        """
        Change the sustained rate (the adaptive controller does, after each decision).

        :param rate_per_second: the new rate; ``0`` means unlimited.
        :param burst: the new burst; unchanged when ``None``.
        """
        if rate_per_second < 0:
            raise ValueError(f"rate_per_second must be >= 0, got {rate_per_second!r}")
        if burst is not None:
            self.burst = max(1, burst)
        self.rate_per_second = float(rate_per_second)
        self._interval = 1.0 / self.rate_per_second if self.rate_per_second > 0 else 0.0
        self._tolerance = self._interval * (self.burst - 1)

    def _now(self) -> float:
        if self._clock is not None:
            return self._clock()
        return asyncio.get_running_loop().time()

    @property
    def unlimited(self) -> bool:
        """Whether no rate ceiling is configured (pauses may still apply)."""
        return self._interval == 0.0

    def pause_until(self, instant: float) -> None:
        """
        Hold every caller of :meth:`acquire` until ``instant`` (clock time); never shortens a pause.

        :param instant: clock time (see ``clock``) before which no request may start.
        """
        if instant > self._not_before:
            self._not_before = instant
            self.pauses += 1

    def pause_for(self, seconds: float) -> None:
        """
        Hold every caller of :meth:`acquire` for ``seconds`` from now (e.g. a 429's ``Retry-After``).

        :param seconds: length of the pause.
        """
        if seconds > 0:
            self.pause_until(self._now() + seconds)

    def _reserve(self, now: float) -> float:
        """Reserve the next slot and return how long the caller must wait for it."""
        tat = max(self._tat, now)
        self._tat = tat + self._interval
        return max(now, tat - self._tolerance) - now

    async def acquire(self) -> None:
        """Wait until the caller may send one request."""
        now = self._now()
        if not self._interval and now >= self._not_before:
            return  # the common, unlimited case: no coroutine switch at all
        # Bounded, so an injected sleep that does not advance the clock cannot spin forever.
        for _ in range(8):
            if now < self._not_before:
                # A pause can be extended while we sleep (another 429): check again after it.
                await self._sleep(self._not_before - now)
                now = self._now()
                continue
            if not self._interval:
                return
            # Slots are reserved only a short horizon ahead: the adaptive controller changes the
            # rate several times a second, and a slot booked far ahead at an old, low rate would
            # keep its caller waiting long after the rate went up.
            ahead = max(now, self._tat - self._tolerance) - now
            if ahead <= _HORIZON:
                wait = self._reserve(now)
                if wait > 0:
                    await self._sleep(wait)
                return
            await self._sleep(min(ahead - _HORIZON, _RECHECK))
            now = self._now()
        if self._interval:
            # Looked often enough: book the next slot however far ahead, and wait for it.
            wait = self._reserve(now)
            if wait > 0:
                await self._sleep(wait)
