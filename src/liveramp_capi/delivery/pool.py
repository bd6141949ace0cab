"""A bounded pool of request workers over one aiohttp session: what the batch sender and the
envelope refresher share.

Exactly ``settings.concurrency`` workers pull items from one shared iterator, so an iterable of
millions of items is consumed lazily with at most that many requests in flight. Each caller
supplies the worker that turns one item into requests and an outcome.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import aiohttp

from liveramp_capi.delivery.ratelimit import RateLimiter
from liveramp_capi.delivery.settings import CapiSettings

ItemT = TypeVar("ItemT")


@dataclass(slots=True)
class RequestStats:
    """Request counters every pool run keeps (the sender and the refresher add their own).

    :param requests: HTTP requests attempted, retries included.
    :param retries: requests beyond each item's first.
    :param status_counts: answers by HTTP status.
    :param error_counts: transport failures by kind (``"timeout"``, aiohttp class name).
    :param pauses: times all workers were paused by a 429 / ``Retry-After``.
    :param elapsed_seconds: wall time of the run.
    """

    requests: int = 0
    retries: int = 0
    status_counts: dict[int, int] = field(default_factory=dict)
    error_counts: dict[str, int] = field(default_factory=dict)
    pauses: int = 0
    elapsed_seconds: float = 0.0

    @property
    def requests_per_second(self) -> float:
        """Average request rate over the run."""
        return self.requests / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    def request_counts(self) -> dict[str, Any]:
        """The request counters in JSON-friendly form (status codes as string keys)."""
        return {
            "requests": self.requests,
            "retries": self.retries,
            "status_counts": {str(k): v for k, v in sorted(self.status_counts.items())},
            "error_counts": dict(sorted(self.error_counts.items())),
            "pauses": self.pauses,
            "elapsed_seconds": round(self.elapsed_seconds, 3),
        }


StatsT = TypeVar("StatsT", bound=RequestStats)


class PoolState(Generic[ItemT, StatsT]):
    """Mutable state of one run, shared by the workers of one event loop.

    :param iterator: the items, pulled by whichever worker is free.
    :param on_outcome: the caller's callback, called once per item on the loop thread.
    :param session: the run's HTTP session.
    :param limiter: the run's rate limiter (also paused by 429 / ``Retry-After``).
    :param stats: the run's counters.
    """

    __slots__ = ("error", "iterator", "limiter", "on_outcome", "session", "stats", "stop")

    def __init__(
        self,
        iterator: Iterator[ItemT],
        on_outcome: Callable[..., None],
        session: aiohttp.ClientSession,
        limiter: RateLimiter,
        stats: StatsT,
    ) -> None:
        self.iterator = iterator
        self.on_outcome = on_outcome
        self.session = session
        self.limiter = limiter
        self.stats = stats
        self.stop = False
        self.error: BaseException | None = None

    def fail(self, exc: BaseException) -> None:
        # Keep the first error; workers finish their in-flight item and stop pulling.
        if self.error is None:
            self.error = exc
        self.stop = True


async def run_pool(
    *,
    settings: CapiSettings,
    headers: Mapping[str, str],
    timeout: aiohttp.ClientTimeout,
    sleep: Callable[[float], Awaitable[Any]],
    items: Iterable[ItemT],
    on_outcome: Callable[..., None],
    stats: StatsT,
    worker: Callable[[PoolState[ItemT, StatsT]], Awaitable[None]],
) -> StatsT:
    """Run ``settings.concurrency`` workers over ``items`` and return ``stats``.

    :param settings: concurrency, TLS verification and the request-rate ceiling.
    :param headers: headers of every request.
    :param timeout: the timeout of every request.
    :param sleep: how workers wait (injected by tests).
    :param items: what to send, consumed lazily.
    :param on_outcome: the caller's per-item callback, handed to the workers through the state.
    :param stats: the counters the workers fill in.
    :param worker: the coroutine one worker runs.
    :raises BaseException: the first error a worker recorded with :meth:`PoolState.fail`.
    """
    connector = aiohttp.TCPConnector(
        limit=settings.concurrency,
        limit_per_host=settings.concurrency,
        ssl=settings.verify_tls,  # True: default certificate verification
    )
    limiter = RateLimiter(settings.max_requests_per_second, sleep=sleep)
    started = time.perf_counter()
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        headers=dict(headers),
        # Nothing here needs cookies; a dummy jar skips cookie parsing on every answer.
        cookie_jar=aiohttp.DummyCookieJar(),
        raise_for_status=False,
    ) as session:
        state: PoolState[ItemT, StatsT] = PoolState(iter(items), on_outcome, session, limiter, stats)
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(settings.concurrency):
                    group.create_task(worker(state))
        finally:
            stats.elapsed_seconds = time.perf_counter() - started
            stats.pauses = limiter.pauses
    if state.error is not None:
        raise state.error
    return stats
