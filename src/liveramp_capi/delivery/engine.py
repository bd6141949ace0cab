"""The request loop of the batch sender and the envelope refresher, written once.

The engine pulls items lazily from one iterator and owns everything between "here is a request"
and "here is the item's outcome": pacing (:class:`~liveramp_capi.delivery.adaptive.ThrottleRate`),
concurrency (:class:`~liveramp_capi.delivery.adaptive.InFlightLimit`), classification (2xx
accepted; 408, 429, 5xx, timeouts and connection errors transient; any other 4xx and TLS
failures permanent for that item), backoff with full jitter, ``Retry-After``, the per-item
retry budget, counters and a periodic progress line. A caller supplies an :class:`Exchange`:
how to build an item's request and how to read a 2xx answer or a failure into its outcome.

Secrets (the configuration ID in the send URL, envelopes and consent in the refresh query) are
never put in a message: aiohttp exceptions render the URL in ``str()``, so only their class name
and the endpoint's ``host:port`` are reported.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

import aiohttp
from yarl import URL

from liveramp_capi.delivery.exchange import Exchange, Failure, Request, RequestStats
from liveramp_capi.delivery.heap import long_lived_heap_frozen
from liveramp_capi.delivery.progress import report_progress
from liveramp_capi.delivery.retry import RetryPolicy, parse_retry_after
from liveramp_capi.delivery.run import EngineRun
from liveramp_capi.delivery.settings import CapiSettings

__all__ = ["Exchange", "Failure", "Request", "RequestEngine", "RequestStats"]

log = logging.getLogger("liveramp_capi.delivery")

ItemT = TypeVar("ItemT")
OutcomeT = TypeVar("OutcomeT")
StatsT = TypeVar("StatsT", bound="RequestStats")
SleepFunc = Callable[[float], Awaitable[Any]]

_TLS_ERRORS = (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError)
#: An attempt is cut short after this many times the long-run latency, never sooner than the
#: minimum (see RequestEngine._attempt_timeout).
_CUT_SHORT_LATENCIES = 30
_CUT_SHORT_MIN = 3.0
#: Workers per in-flight slot (see RequestEngine.__init__).
_WORKERS_PER_SLOT = 4


class RequestEngine:
    """Send every item's request with adaptive pacing and concurrency, retrying transient failures.

    :param settings: ceilings, timeouts, retry budget and backoff.
    :param endpoint: the base URL; only its ``host:port`` is ever reported.
    :param headers: headers of every request.
    :param rng: jitter source of the backoff; seed it in tests.
    :param sleep: coroutine used for backoff and pacing waits; inject a recorder in tests.
    """

    def __init__(
        self,
        settings: CapiSettings,
        endpoint: str,
        headers: Mapping[str, str],
        *,
        rng: random.Random | None = None,
        sleep: SleepFunc = asyncio.sleep,
    ) -> None:
        self.settings = settings
        self.policy = RetryPolicy.from_settings(settings, rng)
        url = URL(endpoint)
        self.host_port = f"{url.host}:{url.port}"
        self._headers = dict(headers)
        self._timeout = aiohttp.ClientTimeout(
            total=settings.timeout_seconds, connect=settings.connect_timeout_seconds
        )
        self._timeout_error = f"timeout after {settings.timeout_seconds} s"
        self._short_timeouts: dict[float, aiohttp.ClientTimeout] = {}
        self._sleep = sleep
        # Items waiting out a backoff or Retry-After hold a worker but no in-flight slot: more
        # workers than slots keep the slots busy while a share of the items waits.
        self._workers = settings.concurrency * (_WORKERS_PER_SLOT if settings.adaptive else 1)

    async def run(
        self,
        items: Iterable[ItemT],
        exchange: Exchange[ItemT, OutcomeT],
        on_outcome: Callable[[ItemT, OutcomeT], None],
        stats: StatsT,
        *,
        label: str = "delivery",
        remaining: Callable[[], int | str | None] | None = None,
    ) -> StatsT:
        """Run every item of ``items`` to an outcome, reported once per item to ``on_outcome``.

        If the iterable or ``on_outcome`` raises, no further item is pulled, the items in flight
        finish (and are reported), then the exception is re-raised; ``stats`` holds the counters.

        :param items: consumed lazily: at most ``concurrency`` items in flight, and at most four
            times that many held in all (the others wait out a backoff or ``Retry-After``).
        :param exchange: builds requests and reads answers.
        :param on_outcome: called on the loop thread with ``(item, outcome)``; keep it fast.
        :param stats: the counters to fill in.
        :param label: names the run in progress lines (e.g. ``"shard 3"``; no secrets).
        :param remaining: tells progress lines how much is left, when the caller knows (a
            number of items, or a text such as ``"1,234 events"``).
        """
        with long_lived_heap_frozen():
            return await self._run(items, exchange, on_outcome, stats, label, remaining)

    async def _run(
        self,
        items: Iterable[ItemT],
        exchange: Exchange[ItemT, OutcomeT],
        on_outcome: Callable[[ItemT, OutcomeT], None],
        stats: StatsT,
        label: str,
        remaining: Callable[[], int | str | None] | None,
    ) -> StatsT:
        settings = self.settings
        connector = aiohttp.TCPConnector(
            # Up to as many again for requests presumed lost (see _presume_lost).
            limit=2 * settings.concurrency,
            limit_per_host=2 * settings.concurrency,
            ssl=settings.verify_tls,  # True: default certificate verification
        )
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        async with aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            headers=self._headers,
            # Nothing here needs cookies; a dummy jar skips cookie parsing on every answer.
            cookie_jar=aiohttp.DummyCookieJar(),
            raise_for_status=False,
        ) as session:
            run: EngineRun[ItemT, OutcomeT, StatsT] = EngineRun(
                iter(items), exchange, on_outcome, session, settings, stats, self._sleep, loop.time()
            )
            reporter = asyncio.create_task(
                report_progress(run, self.settings.progress_interval_seconds, label, remaining)
            )
            try:
                async with asyncio.TaskGroup() as group:
                    run.group = group
                    run.workers = self._workers
                    for _ in range(self._workers):
                        group.create_task(self._worker(run))
            finally:
                reporter.cancel()
                stats.elapsed_seconds = time.perf_counter() - started
                stats.final_rate_limit = run.rate.rate if run.rate.enabled else 0.0
        if run.error is not None:
            raise run.error
        return stats

    async def _worker(self, run: EngineRun[Any, Any, Any]) -> None:
        while not run.stop:
            if run.workers > self._workers + run.lost:
                run.workers -= 1  # a lost request came back: its stand-in worker retires
                return
            try:
                item = next(run.iterator)
            except StopIteration:
                return
            except Exception as exc:  # the producer failed: stop pulling, let others finish
                run.fail(exc)
                return
            outcome = await self._one(run, item)
            run.done += 1
            try:
                run.on_outcome(item, outcome)
            except Exception as exc:
                run.fail(exc)
                return

    async def _one(self, run: EngineRun[Any, Any, Any], item: Any) -> Any:
        loop = asyncio.get_running_loop()
        exchange, stats, slots, rate, policy = run.exchange, run.stats, run.slots, run.rate, self.policy
        status_counts = stats.status_counts
        request = exchange.request(item)
        first = loop.time()
        attempts = 0
        status: int | None = None
        excerpt: bytes | None = None
        timed_out_short = False  # the last attempt was cut short: give the next one the full timeout
        while True:
            await slots.acquire()
            held = [True]
            timer = None
            try:
                await run.limiter.acquire()
                timer = self._watch(run, held)
                attempts += 1
                stats.requests += 1
                sent_at = loop.time()
                rate.on_sent(sent_at)
                retry_after: float | None = None
                throttled = False
                timeout = None if timed_out_short else self._attempt_timeout(run)
                try:
                    async with run.session.request(
                        request.method,
                        request.url,
                        data=request.data,
                        headers=request.headers,
                        allow_redirects=False,
                        timeout=timeout or self._timeout,
                    ) as response:
                        status = response.status
                        status_counts[status] = status_counts.get(status, 0) + 1
                        if 200 <= status < 300:
                            outcome = await exchange.accepted(item, response, attempts)
                            now = loop.time()
                            slots.on_answer(now - sent_at)
                            run.admitted(now, sent_at)
                            return outcome
                        excerpt = await self._read_excerpt(response)
                        if not policy.is_retryable_status(status):
                            now = loop.time()
                            slots.on_answer(now - sent_at)
                            run.admitted(now, sent_at)
                            run.failed += 1
                            return exchange.failed(
                                item, Failure(status, attempts, f"HTTP {status}", excerpt, True)
                            )
                        header = response.headers.get("Retry-After")
                        if header is not None:
                            retry_after = parse_retry_after(header, time.time())
                        throttled = status == 429
                        error = f"HTTP {status}"
                except TimeoutError:
                    error = f"timeout after {timeout.total:g} s" if timeout else self._timeout_error
                    timed_out_short = timeout is not None
                    self._count_error(stats, "timeout")
                except _TLS_ERRORS as exc:
                    # Another attempt cannot fix a certificate problem.
                    kind = type(exc).__name__
                    self._count_error(stats, kind)
                    slots.on_answer(None)
                    run.failed += 1
                    return exchange.failed(
                        item,
                        Failure(status, attempts, f"TLS error ({kind}) with {self.host_port}", None, True),
                    )
                except (aiohttp.ClientError, OSError) as exc:
                    kind = type(exc).__name__
                    error = f"connection error ({kind}) with {self.host_port}"
                    self._count_error(stats, kind)
            finally:
                if timer is not None:
                    timer.cancel()
                if held[0]:
                    slots.release()
                else:
                    run.lost -= 1

            now = loop.time()
            delay = policy.delay(attempts, retry_after)
            if throttled:
                stats.throttled += 1
                run.throttled(now, sent_at, delay if retry_after is None else min(retry_after, delay))
            else:
                # 5xx and lost answers count against the in-flight limit only when most fail.
                slots.on_answer(None)
                rate.on_failed(now, sent_at)
                run.note_refused(now, True)
            if not policy.can_retry(attempts, now - first, delay):
                run.failed += 1
                return exchange.failed(
                    item, Failure(status, attempts, f"retries exhausted: {error}", excerpt, False)
                )
            stats.retries += 1
            if delay > 0:
                run.waiting += 1
                try:
                    await self._sleep(delay)
                finally:
                    run.waiting -= 1

    def _attempt_timeout(self, run: EngineRun[Any, Any, Any]) -> aiohttp.ClientTimeout | None:
        """A shorter timeout for this attempt when the usual latency is known, else ``None``.

        A stalled answer (a dropped connection the server never closes) costs a whole
        ``timeout_seconds`` before its retry, and a shard's last batches wait for their slowest
        one: under the faults mix the send tasks spent their last 10-20 s on a few stalls. An
        attempt is cut after ``max(3 s, 30 x`` the long-run latency), and the item's next attempt
        gets the full timeout again, so a server that really got slow costs each item one short
        attempt, never a loop of them.
        """
        if not self.settings.adaptive or not run.slots.long_latency:
            return None
        after = round(max(_CUT_SHORT_MIN, _CUT_SHORT_LATENCIES * run.slots.long_latency), 1)
        if after >= self.settings.timeout_seconds:
            return None
        timeout = self._short_timeouts.get(after)
        if timeout is None:
            timeout = aiohttp.ClientTimeout(total=after, connect=self.settings.connect_timeout_seconds)
            self._short_timeouts[after] = timeout
        return timeout

    def _watch(self, run: EngineRun[Any, Any, Any], held: list[bool]) -> asyncio.TimerHandle | None:
        """Presume a request lost once it outlives many times the usual latency.

        A request that hangs until its timeout (a dropped answer, a stalled server) would hold
        its in-flight slot and its worker all that time: one stall in 200 requests with a 10 s
        timeout ties up most of 64 slots. After ``max(1 s, 10 x`` the long-run latency) its
        slot is freed and a stand-in worker takes the next item; the request itself still runs
        to its answer or timeout (at most ``concurrency`` such requests, the connection pool's
        second half).
        """
        if not self.settings.adaptive:
            return None
        after = max(1.0, 10 * run.slots.long_latency)
        if after >= self.settings.timeout_seconds:
            return None

        def presume_lost() -> None:
            if not held[0] or run.lost >= self.settings.concurrency:
                return
            held[0] = False
            run.slots.release()
            run.lost += 1
            if run.group is not None and not run.stop and run.workers < self._workers + run.lost:
                run.workers += 1
                run.group.create_task(self._worker(run))

        return asyncio.get_running_loop().call_later(after, presume_lost)

    async def _read_excerpt(self, response: aiohttp.ClientResponse) -> bytes | None:
        limit = self.settings.body_excerpt_bytes
        if limit <= 0:
            return None
        chunks = bytearray()
        try:
            while len(chunks) < limit:
                chunk = await response.content.read(limit - len(chunks))
                if not chunk:
                    break
                chunks += chunk
        except (aiohttp.ClientError, TimeoutError, OSError):
            pass  # the status alone decides; a truncated excerpt is fine
        return bytes(chunks)

    @staticmethod
    def _count_error(stats: RequestStats, kind: str) -> None:
        stats.error_counts[kind] = stats.error_counts.get(kind, 0) + 1
