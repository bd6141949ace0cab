"""Concurrent calls to LiveRamp's ATS envelope refresh API.

``GET {base}/api/identity/v2/envelope/refresh?pid=<placement>&it=19&iv=<envelope>&ct=..&cv=..``
(or ``gpp`` + ``gpp_sid`` instead of ``ct`` + ``cv``). The answer holds ``envelopes[]`` entries
with ``type``, ``value`` and ``err``; the type-19 entry is the refreshed CAPI-scoped envelope.

Plain Python and aiohttp, no Airflow import. The request loop is the batch sender's
(:class:`~liveramp_capi.delivery.engine.RequestEngine`): adaptive pacing and concurrency, 408,
429, 5xx, timeouts and connection errors retried with backoff and ``Retry-After`` within the
retry budget; any other 4xx, an ``err`` on the type-19 entry, or no type-19 entry at all is a
failure for that row. A row without consent is never sent.

The envelope, the consent string and the IP travel in the query string and headers: no log
line, exception message or outcome reason built here contains the URL or any of them.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from yarl import URL

from liveramp_capi.delivery.engine import Failure, Request, RequestEngine, RequestStats
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

    The request counters come from :class:`~liveramp_capi.delivery.engine.RequestStats`.
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


class EnvelopeRefresher:
    """Refresh envelopes through the shared request engine.

    :param base_url: e.g. ``https://api.rlcdn.com``.
    :param placement_id: the ATS placement id (``pid``).
    :param settings: ceilings, timeouts, retry budget and backoff (``max_batch_events`` unused).
    :param origin: the ``Origin`` header that passed LiveRamp's privacy review, if any.
    :param extra_headers: further headers; tuning keys are dropped.
    :param rng: jitter source; seed it in tests.
    :param sleep: coroutine used for backoff and pacing waits.
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
        self._url = URL(base + REFRESH_PATH)
        self._pid = placement_id.strip()
        headers = {"Accept": "application/json"}
        for name, value in (extra_headers or {}).items():
            if name not in TUNING_KEYS:
                headers[name] = value
        if origin:
            headers["Origin"] = origin
        self._engine = RequestEngine(settings, base, headers, rng=rng, sleep=sleep)
        self.policy = self._engine.policy

    def __repr__(self) -> str:
        return f"{type(self).__name__}(concurrency={self.settings.concurrency})"

    async def refresh(
        self,
        rows: Iterable[StoredEnvelope],
        on_outcome: Callable[[RefreshOutcome], None],
        *,
        label: str = "refresh",
    ) -> RefreshStats:
        """Refresh every row of ``rows`` and report each result to ``on_outcome``.

        ``rows`` is consumed lazily: at most ``settings.concurrency`` rows are in flight and
        four times that many held (plus whatever page the iterable itself holds).

        :param rows: rows to refresh (a generator over store pages is fine).
        :param on_outcome: called once per row on the event loop thread; keep it fast.
        :param label: names the run in the progress lines.
        :return: the counters.
        """
        stats = RefreshStats()

        def count(row: StoredEnvelope, outcome: RefreshOutcome) -> None:
            if outcome.skipped:
                stats.skipped_consent += 1
            elif outcome.refreshed:
                stats.refreshed += 1
            else:
                stats.failed += 1
                reason = outcome.reason or "failed"
                stats.failed_by_reason[reason] = stats.failed_by_reason.get(reason, 0) + 1
            on_outcome(outcome)

        def with_consent() -> Iterator[StoredEnvelope]:
            for row in rows:
                if row.consent is None or not row.consent.query():
                    # Never refresh an envelope without the consent captured with it.
                    count(row, RefreshOutcome(row, skipped=True, reason=REASON_CONSENT_MISSING))
                else:
                    yield row

        return await self._engine.run(with_consent(), self, count, stats, label=label)

    def refresh_sync(
        self, rows: Iterable[StoredEnvelope], on_outcome: Callable[[RefreshOutcome], None]
    ) -> RefreshStats:
        """Run :meth:`refresh` in a fresh event loop.

        :param rows: see :meth:`refresh`.
        :param on_outcome: see :meth:`refresh`.
        """
        return asyncio.run(self.refresh(rows, on_outcome))

    # -- the engine's Exchange ----------------------------------------------------------------

    def request(self, row: StoredEnvelope) -> Request:
        """The row's GET: envelope and consent in the query, the user's IP in ``X-Forwarded-For``."""
        query = {"pid": self._pid, "it": str(CAPI_ENVELOPE_TYPE), "iv": row.envelope}
        query.update(row.consent.query() if row.consent is not None else {})
        headers = {"X-Forwarded-For": row.client_ip} if row.client_ip else None
        return Request("GET", self._url.with_query(query), headers=headers)

    async def accepted(
        self, row: StoredEnvelope, response: aiohttp.ClientResponse, attempts: int
    ) -> RefreshOutcome:
        """A 2xx: refreshed when the body holds a usable type-19 envelope, else failed for good."""
        envelope, reason = parse_refresh_body(await response.content.read(_MAX_BODY_BYTES))
        if envelope is not None:
            return RefreshOutcome(row, envelope, refreshed=True, status=response.status, attempts=attempts)
        return RefreshOutcome(row, reason=reason, status=response.status, attempts=attempts)

    def failed(self, row: StoredEnvelope, failure: Failure) -> RefreshOutcome:
        """A refused or abandoned row (the error text holds no identifier)."""
        return RefreshOutcome(row, reason=failure.error, status=failure.status, attempts=failure.attempts)
