"""The progress line of an engine run: what an operator reads on the task log while a shard
sends, most of all when the endpoint throttles (see the README)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from liveramp_capi.delivery.adaptive import InFlightLimit, ThrottleRate
from liveramp_capi.delivery.exchange import RequestStats

__all__ = ["report_progress"]

log = logging.getLogger("liveramp_capi.delivery")


class RunView(Protocol):
    """The parts of a run a progress line reads."""

    @property
    def done(self) -> int: ...
    @property
    def failed(self) -> int: ...
    @property
    def waiting(self) -> int: ...
    @property
    def stats(self) -> RequestStats: ...
    @property
    def rate(self) -> ThrottleRate: ...
    @property
    def slots(self) -> InFlightLimit: ...


async def report_progress(
    run: RunView, interval: float, label: str, remaining: Callable[[], int | str | None] | None
) -> None:
    """Log one line every ``progress_interval_seconds`` while the run lasts."""
    stats = run.stats
    last_requests, last_statuses, last_errors = 0, dict(stats.status_counts), dict(stats.error_counts)
    last_at = time.perf_counter()
    while True:
        await asyncio.sleep(interval)
        now = time.perf_counter()
        statuses, errors = dict(stats.status_counts), dict(stats.error_counts)
        failing = {
            f"HTTP {code}": n - last_statuses.get(code, 0)
            for code, n in statuses.items()
            if not 200 <= code < 300 and n > last_statuses.get(code, 0)
        }
        failing.update(
            {kind: n - last_errors.get(kind, 0) for kind, n in errors.items() if n > last_errors.get(kind, 0)}
        )
        left = remaining() if remaining is not None else None
        rate = run.rate
        log.info(
            "%s: %d done (%d failed), %s remaining, %d in flight, %d waiting to retry; %.0f requests/s, "
            "%d retries, %d throttled (429); rate limit %s, in-flight limit %d; failing: %s",
            label,
            run.done,
            run.failed,
            "unknown" if left is None else (f"{left:,}" if isinstance(left, int) else left),
            run.slots.in_flight,
            run.waiting,
            (stats.requests - last_requests) / max(now - last_at, 1e-9),
            stats.retries,
            stats.throttled,
            _rate_limit(rate),
            int(run.slots.limit),
            ", ".join(f"{k} x{v}" for k, v in sorted(failing.items())) or "nothing",
        )
        last_requests, last_statuses, last_errors, last_at = stats.requests, statuses, errors, now


def _rate_limit(rate: ThrottleRate) -> str:
    if rate.enabled:
        return f"{rate.rate:.0f}/s"
    if rate.withdrawn:
        return "none (the 429s did not follow the rate: refused at random)"
    return "none (never throttled)"
