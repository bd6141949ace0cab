"""Concurrent delivery of pre-serialized batches to LiveRamp's ``send-events`` endpoint.

Plain Python and aiohttp, no Airflow import, so it can be benchmarked and tested alone.

The ATS configuration ID sits in the URL path and lets anyone write events into the advertiser's
account, so it is treated as a secret: no log line, exception message or ``DeliveryOutcome.error``
built here contains the URL. aiohttp exceptions render the URL in ``str()``; only their class
name is ever reported.

Delivery is at-least-once: a request that timed out may still have been accepted, and the retry
delivers it again. TikTok deduplicates the same event name + ``event_id`` within 48 hours.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
from yarl import URL

from liveramp_capi.delivery.engine import Failure, Request, RequestEngine, RequestStats
from liveramp_capi.delivery.settings import TUNING_KEYS, CapiConfigError, CapiSettings, check_base_url

__all__ = ["BatchSender", "DeliveryOutcome", "DeliveryStats", "OutgoingBatch"]

log = logging.getLogger(__name__)

SleepFunc = Callable[[float], Awaitable[Any]]


class OutgoingBatch(Protocol):
    """
    One request's worth of events, already serialized.

    :ivar batch_id: caller-chosen identifier, echoed in the outcome (must not hold secrets).
    :ivar event_count: number of events in ``body``, for the statistics.
    :ivar body: the complete JSON request body ``{"events": [...]}``.
    """

    @property
    def batch_id(self) -> str: ...

    @property
    def event_count(self) -> int: ...

    @property
    def body(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class DeliveryOutcome:
    """
    Final result of one batch.

    :param batch_id: the batch's identifier.
    :param acknowledged: the endpoint answered 2xx.
    :param status: the last HTTP status received, ``None`` if no answer ever arrived.
    :param attempts: requests made for this batch.
    :param error: sanitized reason of a failure (``"HTTP 400"``, ``"timeout after 10.0 s"``,
        ``"connection error (ClientOSError) with host:443"``, ``"retries exhausted: HTTP 503"``);
        never holds the URL path, the configuration ID or event data.
    :param response_excerpt: start of the last error response body (at most
        ``body_excerpt_bytes``); it is the server's text and may echo event data, so keep it
        out of logs.
    :param permanent: the batch was refused for good (non-retryable 4xx, TLS failure); ``False``
        for acknowledged batches and when retries ran out.
    """

    batch_id: str
    acknowledged: bool
    status: int | None
    attempts: int
    error: str | None = None
    response_excerpt: str | None = None
    permanent: bool = False


@dataclass(slots=True)
class DeliveryStats(RequestStats):
    """
    Counters of one :meth:`BatchSender.deliver` call.

    :param batches_acknowledged: batches answered 2xx.
    :param batches_failed: batches that failed (permanently or after the last retry).
    :param batches_failed_permanent: the subset refused for good.
    :param events_acknowledged: events in acknowledged batches.
    :param events_failed: events in failed batches.

    The request counters come from :class:`~liveramp_capi.delivery.engine.RequestStats`.
    """

    batches_acknowledged: int = 0
    batches_failed: int = 0
    batches_failed_permanent: int = 0
    events_acknowledged: int = 0
    events_failed: int = 0

    @property
    def batches(self) -> int:
        """Batches that received an outcome."""
        return self.batches_acknowledged + self.batches_failed

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (status codes as string keys), e.g. for XCom."""
        return {
            "batches_acknowledged": self.batches_acknowledged,
            "batches_failed": self.batches_failed,
            "batches_failed_permanent": self.batches_failed_permanent,
            "events_acknowledged": self.events_acknowledged,
            "events_failed": self.events_failed,
            **self.request_counts(),
        }


class BatchSender:
    """
    Send batches to ``{base_url}/send-events/{config_id}`` through the shared request engine.

    :param base_url: e.g. ``https://capi.analytics.rlcdn.com`` (http or https).
    :param config_id: the ATS configuration ID (secret; percent-encoded into the path).
    :param settings: ceilings, timeouts, retry budget and backoff.
    :param extra_headers: added to every request after ``Content-Type``; tuning keys are dropped.
    :param rng: jitter source of the backoff; seed it in tests.
    :param sleep: coroutine used for backoff and pacing waits; inject a recorder in tests.
    """

    def __init__(
        self,
        base_url: str,
        config_id: str,
        settings: CapiSettings,
        *,
        extra_headers: Mapping[str, str] | None = None,
        rng: random.Random | None = None,
        sleep: SleepFunc = asyncio.sleep,
    ) -> None:
        if not isinstance(config_id, str) or not config_id.strip():
            raise CapiConfigError("the ATS configuration ID is empty")
        base = check_base_url(base_url, verify_tls=settings.verify_tls)
        self.settings = settings
        self._url = URL(f"{base}/send-events/{quote(config_id, safe='')}", encoded=True)
        self._secrets = (config_id, quote(config_id, safe=""))
        headers = {"Content-Type": "application/json"}
        for name, value in (extra_headers or {}).items():
            if name not in TUNING_KEYS:
                headers[name] = value
        self._engine = RequestEngine(settings, base, headers, rng=rng, sleep=sleep)
        self.policy = self._engine.policy

    def __repr__(self) -> str:
        # The URL holds the configuration ID: show neither.
        return f"{type(self).__name__}(concurrency={self.settings.concurrency})"

    async def deliver(
        self,
        batches: Iterable[OutgoingBatch],
        on_outcome: Callable[[OutgoingBatch, DeliveryOutcome], None],
        *,
        label: str = "send",
        remaining: Callable[[], int | str | None] | None = None,
    ) -> DeliveryStats:
        """
        Deliver every batch of ``batches`` and report each result to ``on_outcome``.

        ``batches`` is consumed lazily by workers sharing one iterator: at most
        ``settings.concurrency`` batches are in flight and at most four times that many are held
        at any time (the rest wait out a backoff or ``Retry-After``). If the iterable or
        ``on_outcome`` raises, no further batch is pulled, the batches in flight finish (and are
        reported), then the exception is re-raised.

        :param batches: the batches; a generator is fine (and recommended for large partitions).
        :param on_outcome: called exactly once per pulled batch, synchronously on the event
            loop thread; it must be fast and non-blocking (e.g. append to a buffer), because
            every worker waits while it runs.
        :param label: names the run in the progress lines (e.g. ``"shard 3"``).
        :param remaining: how much is left, for the progress lines (batches, or a text such as
            ``"1,234 events"``).
        :return: the delivery counters.
        """
        stats = DeliveryStats()

        def count(batch: OutgoingBatch, outcome: DeliveryOutcome) -> None:
            if outcome.acknowledged:
                stats.batches_acknowledged += 1
                stats.events_acknowledged += batch.event_count
            else:
                stats.batches_failed += 1
                stats.events_failed += batch.event_count
                if outcome.permanent:
                    stats.batches_failed_permanent += 1
            on_outcome(batch, outcome)

        return await self._engine.run(batches, self, count, stats, label=label, remaining=remaining)

    def deliver_sync(
        self,
        batches: Iterable[OutgoingBatch],
        on_outcome: Callable[[OutgoingBatch, DeliveryOutcome], None],
        **progress: Any,
    ) -> DeliveryStats:
        """
        Run :meth:`deliver` in a fresh event loop; not callable from inside a running loop.

        :param batches: see :meth:`deliver`.
        :param on_outcome: see :meth:`deliver`.
        :param progress: ``label`` and ``remaining``, see :meth:`deliver`.
        """
        return asyncio.run(self.deliver(batches, on_outcome, **progress))

    # -- the engine's Exchange ----------------------------------------------------------------

    def request(self, batch: OutgoingBatch) -> Request:
        """The batch's POST."""
        return Request("POST", self._url, batch.body)

    async def accepted(
        self, batch: OutgoingBatch, response: aiohttp.ClientResponse, attempts: int
    ) -> DeliveryOutcome:
        """A 2xx: acknowledged (the small body is read so the connection goes back to the pool)."""
        await response.read()
        return DeliveryOutcome(batch.batch_id, True, response.status, attempts)

    def failed(self, batch: OutgoingBatch, failure: Failure) -> DeliveryOutcome:
        """A refused or abandoned batch, with an excerpt of the answer free of the configuration ID."""
        excerpt = None
        if failure.excerpt is not None:
            excerpt = failure.excerpt.decode("utf-8", errors="replace")
            # Some servers echo the request path; keep the configuration ID out of the excerpt.
            for secret in self._secrets:
                excerpt = excerpt.replace(secret, "***")
        return DeliveryOutcome(
            batch.batch_id, False, failure.status, failure.attempts, failure.error, excerpt, failure.permanent
        )
