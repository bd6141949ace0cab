"""BatchSender against the local stand-in over real loopback HTTP (no aiohttp mocking)."""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import socket
import time
from collections.abc import Iterator

import orjson
import pytest

from liveramp_capi.delivery.sender import BatchSender, DeliveryOutcome
from liveramp_capi.delivery.settings import CapiConfigError, CapiSettings
from liveramp_capi.domain.batches import Batch

FAST_RETRY = {"backoff_base_seconds": 0.01, "backoff_max_seconds": 0.05}


def make_batches(count: int, events_per_batch: int = 2, prefix: str = "b") -> Iterator[Batch]:
    for i in range(count):
        events = [
            {
                "event_manager": ["tiktok"],
                "event_id": f"{prefix}{i}-{k}",
                "event_type": "AddToCart",
                "event_time": 1714692283,
                "user_data": {"partner_id": f"ENVELOPE-SECRET-{i}-{k}"},
            }
            for k in range(events_per_batch)
        ]
        yield Batch(f"{prefix}{i}", 0, tuple(str(e["event_id"]) for e in events), orjson.dumps({"events": events}))


class Collector:
    def __init__(self) -> None:
        self.outcomes: dict[str, DeliveryOutcome] = {}
        self.calls = collections.Counter[str]()

    def __call__(self, batch: Batch, outcome: DeliveryOutcome) -> None:
        assert batch.batch_id == outcome.batch_id
        self.calls[batch.batch_id] += 1
        self.outcomes[batch.batch_id] = outcome


def sender_for(standin, config_id: str | None = None, **settings) -> BatchSender:
    return BatchSender(
        standin.url,
        config_id or standin.config_id,
        CapiSettings(**settings),
        rng=random.Random(1),
    )


def assert_no_secret(text: str, standin) -> None:
    assert standin.config_id not in text
    assert "ENVELOPE-SECRET" not in text


def test_delivers_every_batch_once(standin) -> None:
    collector = Collector()
    stats = sender_for(standin, concurrency=8).deliver_sync(make_batches(200, 3), collector)
    assert stats.batches_acknowledged == 200 and stats.events_acknowledged == 600
    assert stats.batches_failed == 0 and stats.requests == 200 and stats.retries == 0
    assert stats.status_counts == {200: 200}
    assert set(collector.calls.values()) == {1} and len(collector.calls) == 200
    assert all(
        o.acknowledged and o.status == 200 and o.attempts == 1 and o.error is None
        for o in collector.outcomes.values()
    )
    ids = standin.received_event_ids()
    assert sorted(ids) == sorted(f"b{i}-{k}" for i in range(200) for k in range(3))


def test_headers_and_body_reach_the_server_unchanged(standin) -> None:
    batch = next(make_batches(1))
    sender = BatchSender(
        standin.url,
        standin.config_id,
        CapiSettings(concurrency=1),
        extra_headers={"X-Team": "growth", "concurrency": "9"},
    )
    sender.deliver_sync([batch], Collector())
    [received] = standin.received()
    assert received["events"] == orjson.loads(batch.body)["events"]
    assert received["config_id"] == standin.config_id


def test_transient_faults_are_retried_until_each_batch_is_recorded_once(standin, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    standin.config(
        error_rate=0.2,
        throttle_rate=0.1,
        retry_after_seconds=0,
        drop_rate=0.1,
        stall_rate=0.05,
        stall_seconds=5,
        seed=3,
    )
    collector = Collector()
    sender = sender_for(standin, concurrency=16, max_attempts=15, timeout_seconds=0.5, **FAST_RETRY)
    stats = sender.deliver_sync(make_batches(300), collector)
    assert stats.batches_acknowledged == 300, (
        stats,
        collections.Counter(o.error for o in collector.outcomes.values()),
    )
    assert stats.retries > 0 and stats.requests == 300 + stats.retries
    assert {429, 200} <= stats.status_counts.keys() and {500, 502, 503} & stats.status_counts.keys()
    assert "timeout" in stats.error_counts
    assert {"ServerDisconnectedError", "ClientPayloadError"} & stats.error_counts.keys()
    assert set(collector.calls.values()) == {1}
    # stalled and dropped requests were never recorded: exactly one copy of each event arrived
    ids = standin.received_event_ids()
    assert len(ids) == len(set(ids)) == 600
    assert_no_secret(caplog.text, standin)


def test_accepted_then_timed_out_batches_are_delivered_at_least_once(standin) -> None:
    standin.config(accept_then_stall_rate=0.3, stall_seconds=5, seed=5)
    collector = Collector()
    stats = sender_for(
        standin, concurrency=8, max_attempts=12, timeout_seconds=0.3, **FAST_RETRY
    ).deliver_sync(make_batches(40), collector)
    assert stats.batches_acknowledged == 40
    ids = collections.Counter(standin.received_event_ids())
    assert set(ids) == {f"b{i}-{k}" for i in range(40) for k in range(2)}
    assert max(ids.values()) > 1  # duplicates: TikTok deduplicates by event_id within 48 h


def test_rejected_batch_fails_permanently_with_status_and_excerpt(standin) -> None:
    standin.config(reject_event_ids=["b3-1"])
    collector = Collector()
    stats = sender_for(standin, concurrency=4).deliver_sync(make_batches(10), collector)
    bad = collector.outcomes["b3"]
    assert not bad.acknowledged and bad.permanent and bad.status == 400 and bad.attempts == 1
    assert bad.error == "HTTP 400"
    assert bad.response_excerpt is not None and "invalid event" in bad.response_excerpt
    assert stats.batches_failed == stats.batches_failed_permanent == 1 and stats.events_failed == 2
    assert stats.batches_acknowledged == 9


def test_excerpt_is_truncated(standin) -> None:
    standin.config(reject_event_ids=["b0-0"])
    collector = Collector()
    sender_for(standin, concurrency=1, body_excerpt_bytes=10).deliver_sync(make_batches(1), collector)
    assert collector.outcomes["b0"].response_excerpt == '{"error":"'


def test_unknown_configuration_id_is_permanent_and_never_echoed(standin) -> None:
    collector = Collector()
    secret = "cfg-wrong-5b1e77/x y"
    stats = sender_for(standin, config_id=secret, concurrency=2).deliver_sync(make_batches(3), collector)
    assert stats.batches_failed_permanent == 3
    for outcome in collector.outcomes.values():
        assert outcome.status == 404 and outcome.error == "HTTP 404" and outcome.permanent
        assert secret not in repr(outcome)
    assert secret not in repr(sender_for(standin, config_id=secret))


def test_retry_after_is_honoured_by_the_requested_delay(standin) -> None:
    standin.config(throttle_rate=1.0, retry_after_seconds=7)
    delays: list[float] = []

    async def recording_sleep(seconds: float) -> None:
        delays.append(seconds)
        if len(delays) == 1:
            standin.config(throttle_rate=0.0)  # blocking call on the loop: fine in a test

    collector = Collector()
    sender = BatchSender(
        standin.url,
        standin.config_id,
        CapiSettings(concurrency=1, **FAST_RETRY),
        rng=random.Random(0),
        sleep=recording_sleep,
    )
    stats = sender.deliver_sync(make_batches(1), collector)
    assert collector.outcomes["b0"].acknowledged and collector.outcomes["b0"].attempts == 2
    assert delays and delays[0] >= 7.0
    assert stats.pauses == 1 and stats.status_counts == {429: 1, 200: 1}


def test_retry_after_real_wait_and_exhaustion(standin) -> None:
    standin.config(throttle_rate=1.0, retry_after_seconds=1)
    collector = Collector()
    started = time.monotonic()
    stats = sender_for(standin, concurrency=2, max_attempts=2, **FAST_RETRY).deliver_sync(
        make_batches(2), collector
    )
    assert time.monotonic() - started >= 1.0
    for outcome in collector.outcomes.values():
        assert outcome.error == "retries exhausted: HTTP 429"
        assert outcome.status == 429 and outcome.attempts == 2 and not outcome.permanent
    assert stats.batches_failed == 2 and stats.batches_failed_permanent == 0
    assert standin.received() == []


def test_a_429_pauses_all_workers(standin) -> None:
    # One 429 with Retry-After 1 s: every other worker must hold its next request too.
    standin.config(throttle_rate=1.0, retry_after_seconds=1)
    sender = sender_for(standin, concurrency=8, **FAST_RETRY)
    requests_during_pause: list[int] = []

    async def scenario() -> None:
        async def turn_off_throttle_soon() -> None:
            await asyncio.sleep(0.2)
            await asyncio.to_thread(standin.config, throttle_rate=0.0)
            requests_during_pause.append(standin.stats()["requests"])

        task = asyncio.create_task(turn_off_throttle_soon())
        await sender.deliver(make_batches(50), Collector())
        await task

    started = time.monotonic()
    asyncio.run(scenario())
    assert time.monotonic() - started >= 1.0
    stats = standin.stats()
    assert stats["batches"] == 50
    # only the first wave (<= concurrency) was throttled before everyone paused
    assert stats["requests_by_status"]["429"] <= 8
    assert requests_during_pause[0] <= 8


def test_request_rate_ceiling(standin) -> None:
    collector = Collector()
    started = time.monotonic()
    stats = sender_for(standin, concurrency=32, max_requests_per_second=50).deliver_sync(
        make_batches(120), collector
    )
    assert time.monotonic() - started >= 2.0  # 120 requests at 50/s
    assert stats.batches_acknowledged == 120
    assert standin.stats()["max_rps"] <= 50 + 3


def test_concurrency_bound(standin) -> None:
    standin.config(latency_ms=50)
    stats = sender_for(standin, concurrency=5).deliver_sync(make_batches(100), Collector())
    assert stats.batches_acknowledged == 100
    assert 2 <= standin.stats()["max_in_flight"] <= 5


def test_iterable_is_consumed_lazily(standin) -> None:
    standin.config(latency_ms=5)
    pulled = 0
    reported = 0
    max_outstanding = 0

    def source() -> Iterator[Batch]:
        nonlocal pulled
        for batch in make_batches(200):
            pulled += 1
            yield batch

    def on_outcome(batch: Batch, outcome: DeliveryOutcome) -> None:
        nonlocal reported, max_outstanding
        reported += 1
        max_outstanding = max(max_outstanding, pulled - reported + 1)

    sender_for(standin, concurrency=4).deliver_sync(source(), on_outcome)
    assert reported == pulled == 200
    # 4 in flight at most; up to 4 x 4 held while some wait out a backoff (none here).
    assert max_outstanding <= 16


def test_producer_error_stops_pulling_and_is_reraised(standin) -> None:
    def source() -> Iterator[Batch]:
        yield from make_batches(20)
        raise RuntimeError("source broke")

    collector = Collector()
    sender = sender_for(standin, concurrency=4)
    with pytest.raises(RuntimeError, match="source broke"):
        sender.deliver_sync(source(), collector)
    assert len(collector.calls) == 20 and set(collector.calls.values()) == {1}


def test_callback_error_is_reraised_after_in_flight_batches(standin) -> None:
    seen: list[str] = []

    def on_outcome(batch: Batch, outcome: DeliveryOutcome) -> None:
        seen.append(batch.batch_id)
        if len(seen) == 3:
            raise ValueError("sink full")

    with pytest.raises(ValueError, match="sink full"):
        sender_for(standin, concurrency=4).deliver_sync(make_batches(1000), on_outcome)
    assert 3 <= len(seen) <= 3 + 4 * 4 - 1 and len(seen) == len(set(seen))


def test_timeouts_are_reported_without_the_url(standin, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    standin.config(stall_rate=1.0, stall_seconds=5)
    collector = Collector()
    stats = sender_for(
        standin, concurrency=2, max_attempts=2, timeout_seconds=0.3, **FAST_RETRY
    ).deliver_sync(make_batches(2), collector)
    for outcome in collector.outcomes.values():
        assert outcome.error == "retries exhausted: timeout after 0.3 s"
        assert outcome.status is None and outcome.attempts == 2
    assert stats.error_counts == {"timeout": 4}
    assert_no_secret(caplog.text, standin)


def test_connection_refused_is_retried_then_reported_by_class_name(caplog) -> None:
    caplog.set_level(logging.DEBUG)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    secret = "cfg-closed-port-9d8c7b"
    delays: list[float] = []

    async def no_sleep(seconds: float) -> None:
        delays.append(seconds)

    collector = Collector()
    sender = BatchSender(
        f"http://127.0.0.1:{port}", secret, CapiSettings(concurrency=2, max_attempts=3), sleep=no_sleep
    )
    stats = sender.deliver_sync(make_batches(2), collector)
    for outcome in collector.outcomes.values():
        assert outcome.error == f"retries exhausted: connection error (ClientConnectorError) with 127.0.0.1:{port}"
        assert outcome.attempts == 3 and not outcome.acknowledged and not outcome.permanent
        assert secret not in repr(outcome)
    assert len(delays) == 4 and stats.retries == 4
    assert secret not in caplog.text


def test_invalid_arguments_are_refused_without_secrets() -> None:
    with pytest.raises(CapiConfigError, match="empty"):
        BatchSender("http://127.0.0.1:1", " ", CapiSettings())
    with pytest.raises(CapiConfigError, match="loopback"):
        BatchSender("https://capi.analytics.rlcdn.com", "cfg-secret", CapiSettings(verify_tls=False))
    with pytest.raises(CapiConfigError, match="http or https"):
        BatchSender("ftp://127.0.0.1", "cfg-secret", CapiSettings())


def test_deliver_inside_a_running_loop(standin) -> None:
    async def scenario() -> int:
        stats = await sender_for(standin, concurrency=3).deliver(make_batches(9), Collector())
        return stats.batches_acknowledged

    assert asyncio.run(scenario()) == 9
