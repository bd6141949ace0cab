"""What the request engine and its callers exchange: the request of an item, why an item
failed, the caller's side of the loop (:class:`Exchange`) and the counters of a run."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import aiohttp
from yarl import URL

__all__ = ["Exchange", "Failure", "Request", "RequestStats"]

ItemT = TypeVar("ItemT", contravariant=True)
OutcomeT = TypeVar("OutcomeT", covariant=True)


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request of an item (the same for every attempt).

    :param method: ``"POST"`` or ``"GET"``.
    :param url: the full URL (may hold secrets: never logged).
    :param data: the body, if any.
    :param headers: headers added to the session's.
    """

    method: str
    url: URL
    data: bytes | None = None
    headers: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    """Why an item failed, as the engine classified it.

    :param status: the last HTTP status received, ``None`` if no answer arrived.
    :param attempts: requests made for the item.
    :param error: a sanitized reason (``"HTTP 400"``, ``"retries exhausted: timeout after 10 s"``).
    :param excerpt: start of the last error answer's body (the server's text: keep out of logs).
    :param permanent: refused for good (4xx other than 408/429, TLS); ``False`` when the retry
        budget ran out.
    """

    status: int | None
    attempts: int
    error: str
    excerpt: bytes | None
    permanent: bool


class Exchange(Protocol[ItemT, OutcomeT]):
    """What a caller of the engine supplies: building the request, reading the answer."""

    def request(self, item: ItemT) -> Request:
        """The item's request."""
        ...

    async def accepted(self, item: ItemT, response: aiohttp.ClientResponse, attempts: int) -> OutcomeT:
        """Read a 2xx answer into the item's outcome (reading the body frees the connection)."""
        ...

    def failed(self, item: ItemT, failure: Failure) -> OutcomeT:
        """The outcome of an item the engine gave up on."""
        ...


@dataclass(slots=True)
class RequestStats:
    """Request counters every engine run keeps (the sender and the refresher add their own).

    :param requests: HTTP requests attempted, retries included.
    :param retries: requests beyond each item's first.
    :param throttled: answers 429.
    :param status_counts: answers by HTTP status.
    :param error_counts: transport failures by kind (``"timeout"``, aiohttp class name).
    :param pauses: times a 429 held every request because most were being refused.
    :param rate_decreases: times a 429 lowered the adaptive request rate.
    :param pacing_withdrawals: times pacing went off again because the 429s did not follow the
        rate (an endpoint refusing a share at random).
    :param final_rate_limit: the adaptive rate at the end (requests/s; 0 = never throttled).
    :param elapsed_seconds: wall time of the run.
    """

    requests: int = 0
    retries: int = 0
    throttled: int = 0
    status_counts: dict[int, int] = field(default_factory=dict)
    error_counts: dict[str, int] = field(default_factory=dict)
    pauses: int = 0
    rate_decreases: int = 0
    pacing_withdrawals: int = 0
    final_rate_limit: float = 0.0
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
            "throttled": self.throttled,
            "status_counts": {str(k): v for k, v in sorted(self.status_counts.items())},
            "error_counts": dict(sorted(self.error_counts.items())),
            "pauses": self.pauses,
            "rate_decreases": self.rate_decreases,
            "pacing_withdrawals": self.pacing_withdrawals,
            "final_rate_limit": round(self.final_rate_limit, 1),
            "elapsed_seconds": round(self.elapsed_seconds, 3),
        }
