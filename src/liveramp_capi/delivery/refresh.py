"""Concurrent calls to LiveRamp's ATS envelope refresh API.

``GET {base}/api/identity/v2/envelope/refresh?pid=<placement>&it=19&iv=<envelope>&ct=..&cv=..``
(or ``gpp`` + ``gpp_sid`` instead of ``ct`` + ``cv``). The answer holds ``envelopes[]`` entries
with ``type``, ``value`` and ``err``; the type-19 entry is the refreshed CAPI-scoped envelope.

Plain Python and aiohttp, no Airflow import. The same retry discipline as the batch sender
(:class:`~liveramp_capi.delivery.retry.RetryPolicy`, :class:`~liveramp_capi.delivery.ratelimit.RateLimiter`):
408, 429, 5xx, timeouts and connection errors are retried with backoff and ``Retry-After``; any
other 4xx, an ``err`` on the type-19 entry, or no type-19 entry at all is a failure for that row.
A row without consent is never sent.

The envelope, the consent string and the IP travel in the query string and headers: no log
line, exception message or outcome reason built here contains the URL or any of them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from yarl import URL

from liveramp_capi.delivery.pool import PoolState, RequestStats, run_pool
from liveramp_capi.delivery.retry import RetryPolicy, parse_retry_after
from liveramp_capi.delivery.settings import TUNING_KEYS, CapiConfigError, CapiSettings, check_base_url
from liveramp_capi.domain.envelopes import StoredEnvelope

__all__ = [
    "CAPI_ENVELOPE_TYPE",
    "REFRESH_PATH",
    "EnvelopeRefresher",
    "RefreshOutcome",
    "RefreshStats",
    "parse_refresh_body",
]

log = logging.getLogger(__name__)

REFRESH_PATH = "/api/identity/v2/envelope/refresh"
#: ``it=19``: the CAPI-scoped (regular ATS) envelope type.
CAPI_ENVELOPE_TYPE = 19
#: Largest refresh answer read; the documented body is a few hundred bytes.
_MAX_BODY_BYTES = 64 * 1024

# Failure reasons: short, stable, free of identifiers (they are stored and counted by reason).
REASON_ERR_ENTRY = "err entry"
REASON_NO_TYPE_19 = "no type-19 envelope"
REASON_BAD_BODY = "invalid response body"
REASON_CONSENT_MISSING = "consent missing"

SleepFunc = Callable[[float], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class RefreshOutcome:
    """Final result of refreshing one row.

    :param row: the row as selected.
    :param envelope: the refreshed type-19 envelope when ``refreshed`` (secret for logs).
    :param refreshed: the API returned a usable type-19 envelope.
    :param skipped: the row was not sent at all (no consent).
    :param reason: why it failed or was skipped (no identifiers), else None.
    :param status: the last HTTP status received, None if no answer arrived.
    :param attempts: requests made for this row.
    """

    row: StoredEnvelope
    envelope: str | None = field(default=None, repr=False)
    refreshed: bool = False
    skipped: bool = False
    reason: str | None = None
    status: int | None = None
    attempts: int = 0


@dataclass(slots=True)
class RefreshStats(RequestStats):
    """Counters of one :meth:`EnvelopeRefresher.refresh` call.

    :param refreshed: rows refreshed.
    :param failed: rows that failed (permanently or after the last retry).
    :param skipped_consent: rows not sent because they hold no consent.
    :param failed_by_reason: failures by reason.

    The request counters come from :class:`~liveramp_capi.delivery.pool.RequestStats`.
    """

    refreshed: int = 0
    failed: int = 0
    skipped_consent: int = 0
    failed_by_reason: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (counts only)."""
        return {
            "refreshed": self.refreshed,
            "failed": self.failed,
            "skipped_consent": self.skipped_consent,
            "failed_by_reason": dict(sorted(self.failed_by_reason.items())),
            **self.request_counts(),
        }


def parse_refresh_body(body: bytes) -> tuple[str | None, str | None]:
    """Read a refresh answer: ``(new envelope, None)`` or ``(None, failure reason)``.

    :param body: the 2xx response body, ``{"envelopes": [{"type": 19, "value": ..., "err": ...}, ...]}``.
    """
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, REASON_BAD_BODY
    entries = payload.get("envelopes") if isinstance(payload, dict) else None
    if not isinstance(entries, list):
        return None, REASON_BAD_BODY
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("type") != CAPI_ENVELOPE_TYPE:
            continue
        if entry.get("err") is not None:
            return None, REASON_ERR_ENTRY
        value = entry.get("value")
        if isinstance(value, str) and value:
            return value, None
        return None, REASON_NO_TYPE_19
    return None, REASON_NO_TYPE_19


_TLS_ERRORS = (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError)


class EnvelopeRefresher:
    """Refresh envelopes with bounded concurrency, retries, a rate ceiling and ``Retry-After``.

    :param base_url: e.g. ``https://api.rlcdn.com``.
    :param placement_id: the ATS placement id (``pid``).
    :param settings: concurrency, timeouts, retry and rate tuning (``max_batch_events`` unused).
    :param origin: the ``Origin`` header that passed LiveRamp's privacy review, if any.
    :param extra_headers: further headers; tuning keys are dropped.
    :param rng: jitter source; seed it in tests.
    :param sleep: coroutine used for backoff waits.
    """

    def __init__(
        self,
        base_url: str,
        placement_id: str,
        settings: CapiSettings,
        *,
        origin: str | None = None,
        extra_headers: Mapping[str, str] | None = None,
        rng: random.Random | None = None,
        sleep: SleepFunc = asyncio.sleep,
    ) -> None:
        if not isinstance(placement_id, str) or not placement_id.strip():
            raise CapiConfigError("the placement id (pid) is empty")
        base = check_base_url(base_url, verify_tls=settings.verify_tls)
        self.settings = settings
        self.policy = RetryPolicy.from_settings(settings, rng)
        self._url = URL(base + REFRESH_PATH)
        self._pid = placement_id.strip()
        headers = {"Accept": "application/json"}
        for name, value in (extra_headers or {}).items():
            if name not in TUNING_KEYS:
                headers[name] = value
        if origin:
            headers["Origin"] = origin
        self._headers = headers
        self._timeout = aiohttp.ClientTimeout(
            total=settings.timeout_seconds, connect=settings.connect_timeout_seconds
        )
        self._sleep = sleep
        self.last_stats: RefreshStats | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(concurrency={self.settings.concurrency})"

    def _query(self, row: StoredEnvelope) -> dict[str, str]:
        query = {"pid": self._pid, "it": str(CAPI_ENVELOPE_TYPE), "iv": row.envelope}
        query.update(row.consent.query() if row.consent is not None else {})
        return query

    async def refresh(
        self, rows: Iterable[StoredEnvelope], on_outcome: Callable[[RefreshOutcome], None]
    ) -> RefreshStats:
        """Refresh every row of ``rows`` and report each result to ``on_outcome``.

        ``rows`` is consumed lazily by ``settings.concurrency`` workers, so at most that many
        rows are held (plus whatever page the iterable itself holds).

        :param rows: rows to refresh (a generator over store pages is fine).
        :param on_outcome: called once per row on the event loop thread; keep it fast.
        :return: the counters.
        """
        stats = RefreshStats()
        self.last_stats = stats
        return await run_pool(
            settings=self.settings,
            headers=self._headers,
            timeout=self._timeout,
            sleep=self._sleep,
            items=rows,
            on_outcome=on_outcome,
            stats=stats,
            worker=self._worker,
        )

    def refresh_sync(
        self, rows: Iterable[StoredEnvelope], on_outcome: Callable[[RefreshOutcome], None]
    ) -> RefreshStats:
        """Run :meth:`refresh` in a fresh event loop.

        :param rows: see :meth:`refresh`.
        :param on_outcome: see :meth:`refresh`.
        """
        return asyncio.run(self.refresh(rows, on_outcome))

    async def _worker(self, state: PoolState[Any, RefreshStats]) -> None:
        stats = state.stats
        while not state.stop:
            try:
                row = next(state.iterator)
            except StopIteration:
                return
            except Exception as exc:  # the producer failed: stop pulling, let others finish
                state.fail(exc)
                return
            if row.consent is None or not row.consent.query():
                # Never refresh an envelope without the consent captured with it.
                outcome = RefreshOutcome(row, skipped=True, reason=REASON_CONSENT_MISSING)
                stats.skipped_consent += 1
            else:
                outcome = await self._refresh_one(state, row)
                if outcome.refreshed:
                    stats.refreshed += 1
                else:
                    stats.failed += 1
                    reason = outcome.reason or "failed"
                    stats.failed_by_reason[reason] = stats.failed_by_reason.get(reason, 0) + 1
            try:
                state.on_outcome(outcome)
            except Exception as exc:
                state.fail(exc)
                return

    async def _refresh_one(self, state: PoolState[Any, RefreshStats], row: StoredEnvelope) -> RefreshOutcome:
        session = state.session
        limiter = state.limiter
        stats = state.stats
        policy = self.policy
        url = self._url.with_query(self._query(row))
        headers = {"X-Forwarded-For": row.client_ip} if row.client_ip else None
        attempts = 0
        status: int | None = None
        while True:
            await limiter.acquire()
            attempts += 1
            stats.requests += 1
            retry_after: float | None = None
            try:
                async with session.get(url, headers=headers, allow_redirects=False) as response:
                    status = response.status
                    stats.status_counts[status] = stats.status_counts.get(status, 0) + 1
                    body = await response.content.read(_MAX_BODY_BYTES)
                    if 200 <= status < 300:
                        envelope, reason = parse_refresh_body(body)
                        if envelope is not None:
                            return RefreshOutcome(row, envelope, refreshed=True, status=status, attempts=attempts)
                        return RefreshOutcome(row, reason=reason, status=status, attempts=attempts)
                    if not policy.is_retryable_status(status):
                        return RefreshOutcome(row, reason=f"HTTP {status}", status=status, attempts=attempts)
                    header = response.headers.get("Retry-After")
                    if header is not None:
                        retry_after = parse_retry_after(header, time.time())
                    error = f"HTTP {status}"
            except TimeoutError:
                error = "timeout"
                stats.error_counts["timeout"] = stats.error_counts.get("timeout", 0) + 1
            except _TLS_ERRORS as exc:
                kind = type(exc).__name__
                stats.error_counts[kind] = stats.error_counts.get(kind, 0) + 1
                return RefreshOutcome(row, reason=f"TLS error ({kind})", status=status, attempts=attempts)
            except (aiohttp.ClientError, OSError) as exc:
                # str(exc) of aiohttp errors holds the URL, hence the envelope: class name only.
                kind = type(exc).__name__
                error = f"connection error ({kind})"
                stats.error_counts[kind] = stats.error_counts.get(kind, 0) + 1
            if not policy.can_retry(attempts):
                return RefreshOutcome(row, reason=f"retries exhausted: {error}", status=status, attempts=attempts)
            delay = policy.delay(attempts, retry_after)
            if status == 429 or retry_after is not None:
                limiter.pause_for(delay if retry_after is None else min(retry_after, delay))
            stats.retries += 1
            if delay > 0:
                await self._sleep(delay)
