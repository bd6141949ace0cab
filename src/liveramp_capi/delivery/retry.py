"""When to retry a Conversions API request and how long to wait first.

LiveRamp documents neither the status codes nor the rate limits of ``send-events``; this policy
follows common practice: 408, 429 and 5xx (plus timeouts and connection errors, decided by the
sender) are transient, any other 4xx is a permanent verdict on the batch.
"""

from __future__ import annotations

import email.utils
import math
import random
from dataclasses import dataclass, field
from datetime import UTC

from liveramp_capi.delivery.settings import CapiSettings

__all__ = ["RetryPolicy", "parse_retry_after"]


def parse_retry_after(value: str | None, now: float) -> float | None:
    """
    Read a ``Retry-After`` header as a number of seconds to wait from ``now``.

    :param value: the header value: delta-seconds (``"120"``) or an HTTP-date
        (``"Wed, 21 Oct 2015 07:28:00 GMT"``); ``None`` when absent.
    :param now: the current Unix time, used for the HTTP-date form.
    :return: seconds to wait (never negative), or ``None`` when absent or unreadable.
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds) or seconds < 0:
            return None
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        # RFC 9110 HTTP-dates are GMT; parsedate_to_datetime leaves "-0000" naive.
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """
    Retry decisions and backoff delays for one delivery.

    :param max_attempts: optional cap on attempts per item, the first included (0 = no cap).
    :param retry_budget_seconds: how long an item may keep retrying, from its first attempt.
    :param backoff_base_seconds: upper bound of the first backoff delay.
    :param backoff_max_seconds: cap of the exponential upper bound.
    :param retry_after_max_seconds: cap applied to a server-supplied ``Retry-After``.
    :param rng: source of the jitter; inject a seeded ``random.Random`` in tests.
    """

    max_attempts: int = 0
    retry_budget_seconds: float = 600.0
    backoff_base_seconds: float = 0.5
    backoff_max_seconds: float = 2.0
    retry_after_max_seconds: float = 120.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    @classmethod
    def from_settings(cls, settings: CapiSettings, rng: random.Random | None = None) -> RetryPolicy:
        """
        Build the policy from the sender settings.

        :param settings: the sender's tuning.
        :param rng: jitter source; a fresh unseeded ``random.Random`` when ``None``.
        """
        return cls(
            max_attempts=settings.max_attempts,
            retry_budget_seconds=settings.retry_budget_seconds,
            backoff_base_seconds=settings.backoff_base_seconds,
            backoff_max_seconds=settings.backoff_max_seconds,
            retry_after_max_seconds=settings.retry_after_max_seconds,
            rng=rng if rng is not None else random.Random(),
        )

    @staticmethod
    def is_retryable_status(status: int) -> bool:
        """
        Tell whether an HTTP status is worth another attempt (408, 429 and 5xx).

        :param status: the HTTP status code of the answer.
        """
        return status == 408 or status == 429 or 500 <= status <= 599

    def can_retry(self, attempts_made: int, elapsed: float = 0.0, delay: float = 0.0) -> bool:
        """
        Tell whether another attempt is allowed.

        A budget of time rather than a count: a storm of transient failures is ridden out by
        the item itself instead of escalating into a task retry, however many attempts it takes.

        :param attempts_made: attempts already made for the item (1 after the first request).
        :param elapsed: seconds since the item's first attempt started.
        :param delay: the wait before the next attempt; it must start within the budget.
        """
        if self.max_attempts and attempts_made >= self.max_attempts:
            return False
        return elapsed + delay <= self.retry_budget_seconds

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """
        Seconds to wait before the next attempt.

        Full jitter (a uniform draw between 0 and the exponential bound) spreads the retries of
        many workers that failed together, instead of having them hit the server in lock-step.

        :param attempt: attempts already made for this item (1 after the first failure).
        :param retry_after: the server's ``Retry-After`` in seconds, if any; the delay is then at
            least that long, capped at ``retry_after_max_seconds``.
        """
        exponent = max(0, attempt - 1)
        # min() before the power would be clearer, but 2**exponent overflows floats past ~1000.
        bound = self.backoff_max_seconds if exponent >= 64 else self.backoff_base_seconds * (2.0**exponent)
        bound = min(bound, self.backoff_max_seconds)
        jittered = self.rng.uniform(0.0, bound) if bound > 0 else 0.0
        if retry_after is None:
            return jittered
        return max(min(retry_after, self.retry_after_max_seconds), jittered)

    parse_retry_after = staticmethod(parse_retry_after)
