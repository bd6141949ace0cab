"""Unit tests of the retry policy, the settings parser and the rate limiter (no network)."""

from __future__ import annotations

import asyncio
import email.utils
import random

import pytest

from liveramp_capi.delivery.ratelimit import RateLimiter
from liveramp_capi.delivery.retry import RetryPolicy, parse_retry_after
from liveramp_capi.delivery.settings import TUNING_KEYS, CapiConfigError, CapiSettings, check_base_url

# -- RetryPolicy ------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 599])
def test_transient_statuses_are_retryable(status: int) -> None:
    assert RetryPolicy.is_retryable_status(status)


@pytest.mark.parametrize("status", [200, 204, 301, 400, 401, 403, 404, 409, 413, 422, 600])
def test_other_statuses_are_not_retryable(status: int) -> None:
    assert not RetryPolicy.is_retryable_status(status)


def test_delay_is_full_jitter_below_the_exponential_bound() -> None:
    policy = RetryPolicy(backoff_base_seconds=0.5, backoff_max_seconds=30.0, rng=random.Random(7))
    for attempt, bound in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (7, 30.0), (200, 30.0)]:
        delays = [policy.delay(attempt) for _ in range(500)]
        assert all(0.0 <= d <= bound for d in delays)
        # full jitter: the draws spread over the whole range, not just its top
        assert min(delays) < bound * 0.1 < bound * 0.9 < max(delays)


def test_delay_is_reproducible_with_a_seeded_rng() -> None:
    first = RetryPolicy(rng=random.Random(42))
    second = RetryPolicy(rng=random.Random(42))
    assert [first.delay(a) for a in range(1, 8)] == [second.delay(a) for a in range(1, 8)]


def test_retry_after_is_a_floor_capped_at_its_maximum() -> None:
    policy = RetryPolicy(backoff_base_seconds=0.5, retry_after_max_seconds=120.0, rng=random.Random(1))
    assert all(policy.delay(1, retry_after=3.0) >= 3.0 for _ in range(100))
    assert all(policy.delay(1, retry_after=3.0) <= 3.0 for _ in range(100))  # jitter bound 0.5 < 3
    assert policy.delay(1, retry_after=10_000.0) == 120.0
    assert policy.delay(1, retry_after=0.0) <= 0.5


def test_zero_backoff_gives_zero_delay() -> None:
    policy = RetryPolicy(backoff_base_seconds=0.0, backoff_max_seconds=0.0)
    assert policy.delay(5) == 0.0


def test_can_retry_counts_the_first_attempt() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert policy.can_retry(1) and policy.can_retry(2)
    assert not policy.can_retry(3)


def test_the_retry_budget_is_time_from_the_first_attempt() -> None:
    policy = RetryPolicy(retry_budget_seconds=60)
    assert policy.can_retry(500, elapsed=10, delay=30)  # no count cap by default
    assert policy.can_retry(2, elapsed=59, delay=1)
    assert not policy.can_retry(2, elapsed=59, delay=1.5)  # the next attempt would start too late
    capped = RetryPolicy(max_attempts=3, retry_budget_seconds=60)
    assert not capped.can_retry(3, elapsed=0, delay=0)


def test_from_settings_copies_the_tuning() -> None:
    settings = CapiSettings(
        max_attempts=9, backoff_base_seconds=0.1, backoff_max_seconds=2, retry_after_max_seconds=5,
        retry_budget_seconds=42,
    )
    policy = RetryPolicy.from_settings(settings, random.Random(0))
    assert (policy.max_attempts, policy.backoff_base_seconds, policy.backoff_max_seconds) == (9, 0.1, 2)
    assert policy.retry_after_max_seconds == 5 and policy.retry_budget_seconds == 42


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 2 ", 2.0),
        ("0", 0.0),
        ("1.5", 1.5),
        (None, None),
        ("", None),
        ("-3", None),
        ("soon", None),
        ("nan", None),
    ],
)
def test_parse_retry_after_delta_seconds(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=1_000.0) == expected


def test_parse_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    header = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(header, now) == pytest.approx(30.0, abs=1.0)
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert parse_retry_after(past, now) == 0.0
    assert RetryPolicy.parse_retry_after(header, now) == pytest.approx(30.0, abs=1.0)


# -- CapiSettings -----------------------------------------------------------------------------


def test_from_extra_pops_tuning_keys_and_keeps_the_rest() -> None:
    extra = {"concurrency": 8, "timeout_seconds": "2.5", "verify_tls": "true", "X-Team": "growth"}
    settings, remaining = CapiSettings.from_extra(extra)
    assert settings.concurrency == 8 and settings.timeout_seconds == 2.5 and settings.verify_tls is True
    assert remaining == {"X-Team": "growth"}
    assert "concurrency" in extra  # the input is not modified
    assert not TUNING_KEYS & remaining.keys()


def test_defaults() -> None:
    settings, remaining = CapiSettings.from_extra({})
    assert settings == CapiSettings()
    assert (settings.concurrency, settings.max_attempts, settings.max_batch_events) == (64, 0, 50)
    assert settings.retry_budget_seconds == 600 and settings.adaptive and settings.progress_interval_seconds == 15
    assert remaining == {}


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": 1025}, "concurrency"),
        ({"concurrency": True}, "concurrency"),
        ({"concurrency": "many"}, "concurrency"),
        ({"max_batch_events": 1001}, "max_batch_events"),
        ({"max_batch_events": 0}, "max_batch_events"),
        ({"timeout_seconds": 0}, "timeout_seconds"),
        ({"timeout_seconds": "inf"}, "timeout_seconds"),
        ({"max_attempts": -1}, "max_attempts"),
        ({"retry_budget_seconds": 0}, "retry_budget_seconds"),
        ({"progress_interval_seconds": 0}, "progress_interval_seconds"),
        ({"adaptive": "sometimes"}, "adaptive"),
        ({"max_requests_per_second": -1}, "max_requests_per_second"),
        ({"backoff_base_seconds": 5, "backoff_max_seconds": 1}, "backoff_max_seconds"),
        ({"verify_tls": "maybe"}, "verify_tls"),
        ({"body_excerpt_bytes": -1}, "body_excerpt_bytes"),
    ],
)
def test_invalid_tuning_values_name_the_key(extra: dict, key: str) -> None:
    with pytest.raises(CapiConfigError, match=key):
        CapiSettings.from_extra(extra)


def test_verify_tls_false_only_for_loopback() -> None:
    for url in ("http://127.0.0.1:8099", "https://localhost", "http://[::1]:1", "http://127.9.9.9"):
        settings, _ = CapiSettings.from_extra({"verify_tls": False}, base_url=url)
        assert settings.verify_tls is False
    with pytest.raises(CapiConfigError, match="loopback"):
        CapiSettings.from_extra({"verify_tls": False}, base_url="https://capi.analytics.rlcdn.com")
    with pytest.raises(CapiConfigError, match="loopback"):
        check_base_url("https://10.0.0.1", verify_tls=False)


@pytest.mark.parametrize(
    "url", ["ftp://host", "capi.analytics.rlcdn.com", "https://", "https://h/?q=1", "http://h:notaport"]
)
def test_base_url_must_be_http_or_https_with_a_host(url: str) -> None:
    with pytest.raises(CapiConfigError):
        check_base_url(url)


def test_check_base_url_strips_trailing_slashes() -> None:
    assert check_base_url("https://capi.analytics.rlcdn.com/") == "https://capi.analytics.rlcdn.com"


# -- RateLimiter ------------------------------------------------------------------------------


class FakeClock:
    """Deterministic clock + sleep pair: sleeping advances the clock."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_unlimited_limiter_never_waits() -> None:
    clock = FakeClock()
    limiter = RateLimiter(0, sleep=clock.sleep, clock=clock.time)

    async def run() -> None:
        for _ in range(1000):
            await limiter.acquire()

    asyncio.run(run())
    assert clock.sleeps == [] and limiter.unlimited


def test_token_bucket_paces_to_the_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10, sleep=clock.sleep, clock=clock.time)

    async def run() -> list[float]:
        starts = []
        for _ in range(21):
            await limiter.acquire()
            starts.append(clock.now)
        return starts

    starts = asyncio.run(run())
    assert starts[-1] - starts[0] == pytest.approx(2.0)
    for earlier, later in zip(starts, starts[1:], strict=False):
        assert later - earlier == pytest.approx(0.1)


def test_burst_allows_back_to_back_requests_then_paces() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10, burst=5, sleep=clock.sleep, clock=clock.time)

    async def run() -> list[float]:
        starts = []
        for _ in range(10):
            await limiter.acquire()
            starts.append(clock.now)
        return starts

    starts = asyncio.run(run())
    assert starts[:5] == [100.0] * 5
    assert starts[9] == pytest.approx(100.5)


def test_pause_holds_every_caller_and_is_never_shortened() -> None:
    clock = FakeClock()
    limiter = RateLimiter(0, sleep=clock.sleep, clock=clock.time)
    limiter.pause_for(3.0)
    limiter.pause_for(1.0)  # shorter: ignored
    assert limiter.pauses == 1

    async def run() -> None:
        await limiter.acquire()

    asyncio.run(run())
    assert clock.now == pytest.approx(103.0)


def test_limiter_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        RateLimiter(-1)
    with pytest.raises(ValueError):
        RateLimiter(1, burst=0)


def test_limiter_with_real_loop_clock() -> None:
    async def run() -> float:
        limiter = RateLimiter(50)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.gather(*(limiter.acquire() for _ in range(11)))
        return loop.time() - started

    assert asyncio.run(run()) >= 0.19  # 11 slots at 50/s: the last one starts 0.2 s after the first
