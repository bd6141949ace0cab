"""The adaptive rate and in-flight limit on a simulated clock (no network, no sleeping)."""

from __future__ import annotations

import asyncio

import pytest

from liveramp_capi.delivery.adaptive import InFlightLimit, RateMeter, ThrottleRate


def test_rate_meter_counts_the_last_window_only() -> None:
    meter = RateMeter(1.0, started=100.0)
    for step in range(50):  # 100 events/s for half a second
        meter.add(100.0 + step * 0.01)
    assert meter.rate(100.5) == pytest.approx(100, rel=0.15)  # not diluted by the unlived half
    assert meter.rate(101.2) == pytest.approx(0, abs=50)
    assert meter.rate(103.0) == 0


def _warm(control: ThrottleRate, rate: float, until: float = 1.0) -> float:
    """Send and admit ``rate`` requests/s until ``until``; return the clock."""
    now = 0.0
    while now < until:
        control.on_sent(now)
        assert control.on_admitted(now, now) is None or control.enabled
        now += 1 / rate
    return now


def test_no_pacing_until_429s_stand_out_then_beta_times_what_was_admitted() -> None:
    control = ThrottleRate(0, started=0.0)
    now = _warm(control, 1000)
    assert control.on_throttled(now, sent_at=now) is None  # one in a thousand: not congestion
    for _ in range(20):  # one in 25 (of the last half second): a shard living with strays
        control.on_throttled(now, sent_at=now)
    assert not control.enabled
    rate = None
    while rate is None:  # above 5%: an unpaced shard overrunning a limit (R + 10% refuses 9%)
        rate = control.on_throttled(now, sent_at=now)
    assert control.last_event > ThrottleRate.START_SHARE
    # The first decrease: by the share plus LANDING (at most BETA), of what was admitted.
    assert control.enabled and rate == pytest.approx(ThrottleRate.BETA * 1000, rel=0.1)


def test_one_congestion_event_lowers_the_rate_once() -> None:
    control = ThrottleRate(0, started=0.0)
    now = _warm(control, 500)
    while control.on_throttled(now, sent_at=now) is None:
        pass
    # Answers to requests sent before the decrease are echoes of the old rate.
    assert all(control.on_throttled(now + 0.6, sent_at=now - 0.01) is None for _ in range(100))
    # Sent after it, but before the decrease could show: no second decrease either.
    assert all(control.on_throttled(now + 0.1, sent_at=now + 0.05) is None for _ in range(100))
    assert control.decreases == 1


def test_random_429s_turn_pacing_off_again_and_a_limit_on_top_still_counts() -> None:
    control = ThrottleRate(0, started=0.0)
    now = _warm(control, 1000)
    while control.on_throttled(now, sent_at=now) is None:
        pass
    # From now on one request in ten is refused at random, whatever the rate.
    paced = 0
    for step in range(30_000):
        now += 0.001
        control.on_sent(now)
        if step % 10 == 0:
            control.on_throttled(now, sent_at=now)
        else:
            control.on_admitted(now, now)
        paced += control.enabled
    # Each decrease left the share as it was (a limit's 429s would have vanished): pacing went
    # off again a look after HOLD_OFF; the tolerance lapses every TOLERANCE_SECONDS and pacing
    # is tried once more, so the run was paced about one second in ten.
    assert not control.enabled and control.withdrawn == control.decreases == 3
    assert paced * 0.001 <= 3 * (ThrottleRate.HOLD_OFF + 0.3)
    assert control.tolerated == pytest.approx(0.1, abs=0.03)
    # A share well above the tolerated one (a limit on top of the random refusals) turns
    # pacing on again at once.
    rate, step = None, 0
    while rate is None and step < 2_000:
        now += 0.001
        step += 1
        control.on_sent(now)
        if step % 4 == 0:
            rate = control.on_throttled(now, sent_at=now)
        else:
            control.on_admitted(now, now)
    assert rate is not None and control.enabled and control.decreases == 4 and step < 600


def test_a_decrease_that_quietens_the_429s_keeps_pacing_on() -> None:
    control = ThrottleRate(0, started=0.0)
    now = _warm(control, 1000)
    while control.on_throttled(now, sent_at=now) is None:
        pass
    for _ in range(3_000):  # 3 s of admitted answers at the paced rate: a limit, now respected
        now += 0.001
        control.on_sent(now)
        control.on_admitted(now, now)
    assert control.enabled and control.withdrawn == 0


def test_the_rate_climbs_back_by_equal_steps_that_grow_without_429s() -> None:
    control = ThrottleRate(0, started=0.0)
    now = _warm(control, 500)
    while control.on_throttled(now, sent_at=now) is None:
        pass
    low = control.rate
    rates = []
    for _ in range(1000):  # 10 s of answers at the paced rate
        now += 0.01
        for _ in range(int(control.rate / 100) + 1):
            control.on_sent(now)
        rates.append(control.on_admitted(now, now))
    first_second, tenth_second = rates[99] - low, rates[-1] - rates[-101]
    assert 0 < first_second < tenth_second  # slow near the old limit, faster when none shows
    assert rates[-1] > 2 * low  # a limit that was raised is found again


def test_a_decrease_follows_the_share_of_429s() -> None:
    decreased = []
    for refused_every in (40, 4):  # 2.5% and 25% of answers refused
        control = ThrottleRate(0, started=0.0)
        now = _warm(control, 1000)
        while control.on_throttled(now, sent_at=now) is None:
            pass
        for _ in range(1200):  # the decrease quietens the 429s (a limit, not random refusals)
            now += 0.001
            control.on_sent(now)
            control.on_admitted(now, now)
        now += ThrottleRate.WINDOW  # a pause: the share below is that of the new answers alone
        before, rate, step = control.rate, None, 0
        while rate is None:
            now += 0.001
            step += 1
            control.on_sent(now)
            if step % refused_every == 0:
                before = control.rate
                rate = control.on_throttled(now, sent_at=now)
            else:
                control.on_admitted(now, now)
        decreased.append(rate / before)
    mild, steep = decreased
    assert steep < mild <= ThrottleRate.BETA + 0.01


def test_the_ceiling_and_the_floor_hold() -> None:
    control = ThrottleRate(50, started=0.0)
    now = _warm(control, 400)
    rate = None
    while rate is None:
        rate = control.on_throttled(now, sent_at=now)
    assert rate <= 50
    for step in range(1000):
        control.on_sent(now + step / 100)
        assert control.on_admitted(now + step / 100, now + step / 100) <= 50
    refused = ThrottleRate(0, started=0.0)
    rates = [refused.on_throttled(0.5, sent_at=0.1) for _ in range(60)]
    assert next(r for r in rates if r is not None) == ThrottleRate.FLOOR  # nothing was ever admitted


def _simulate_shared_bucket(
    limit: float, seconds: float, head_start: float, unpaced_share: float = 3.0
) -> list[float]:
    """Two shards against one token bucket (burst limit/10), 10 ms steps; one starts late.
    Unpaced, a shard sends ``unpaced_share`` times the limit.

    Returns each shard's admitted requests/s over the last 10 simulated seconds.
    """
    step = 0.01
    tokens, burst = limit / 10, limit / 10
    shards = [ThrottleRate(0, started=0.0), ThrottleRate(0, started=head_start)]
    unpaced = unpaced_share * limit  # what a shard sends while not paced
    admitted = [0, 0]
    credit = [0.0, 0.0]
    now = 0.0
    while now < seconds:
        tokens = min(burst, tokens + limit * step)
        sends = []
        for index, shard in enumerate(shards):
            if now < head_start * index:
                continue
            credit[index] += (shard.rate if shard.enabled else unpaced) * step
            count = int(credit[index])
            credit[index] -= count
            # Spread each shard's requests over the step, so neither always arrives first.
            sends += [(now + step * (k + 0.5) / count, index) for k in range(count)]
        for sent_at, index in sorted(sends):
            shard = shards[index]
            shard.on_sent(sent_at)
            if tokens >= 1:
                tokens -= 1
                shard.on_admitted(sent_at + 0.02)
                if now >= seconds - 10:
                    admitted[index] += 1
            else:
                shard.on_throttled(sent_at + 0.02, sent_at=sent_at)
        now += step
    return [count / 10 for count in admitted]


@pytest.mark.parametrize(
    ("limit", "head_start", "unpaced_share"),
    [(400, 5, 3.0), (2000, 5, 3.0), (400, 1, 1.1), (2000, 1, 1.1), (2000, 1, 1.3), (2000, 0, 1.1)],
)
def test_two_shards_converge_to_a_fair_share_without_talking(
    limit: float, head_start: float, unpaced_share: float
) -> None:
    # The second shard starts late, when the first one holds the whole limit. A shard that
    # overruns the limit only a little (1.1x) sees a share of 429s like random refusals: the
    # first one, slowed by its decrease while the other still overruns, must not take the
    # share for random and leave the other to every decrease.
    first, second = _simulate_shared_bucket(limit, seconds=60, head_start=head_start, unpaced_share=unpaced_share)
    assert first + second >= 0.9 * limit
    assert min(first, second) >= 0.4 * limit, (first, second)
    assert min(first, second) / max(first, second) >= 0.8


def test_in_flight_limit_slow_start_then_shrinks_when_latency_doubles() -> None:
    limit = InFlightLimit(256)
    assert limit.limit == InFlightLimit.INITIAL

    async def fill_and_answer(latency: float) -> None:
        count = int(limit.limit)
        for _ in range(count):
            await limit.acquire()
        for _ in range(count):
            limit.release()
            limit.on_answer(latency)

    async def scenario() -> list[float]:
        seen = []
        for _ in range(5):
            await fill_and_answer(0.05)
            seen.append(limit.limit)
        await fill_and_answer(0.2)  # four times the usual latency: a queue somewhere
        seen.append(limit.limit)
        return seen

    seen = asyncio.run(scenario())
    assert seen[:5] == [32, 64, 128, 256, 256]  # doubles while binding, capped at the ceiling
    assert seen[5] == pytest.approx(256 * InFlightLimit.DECREASE)


def test_in_flight_limit_shrinks_when_most_requests_fail_and_is_pinned_when_not_adaptive() -> None:
    limit = InFlightLimit(64)
    for _ in range(16):
        limit.on_answer(None)
    assert limit.limit == pytest.approx(16 * InFlightLimit.DECREASE)
    pinned = InFlightLimit(64, adaptive=False)
    for _ in range(200):
        pinned.on_answer(None)
    assert pinned.limit == 64


def test_in_flight_limit_queues_waiters_beyond_the_limit() -> None:
    async def scenario() -> tuple[int, int]:
        limit = InFlightLimit(2, adaptive=False)
        await limit.acquire()
        await limit.acquire()
        waiter = asyncio.ensure_future(limit.acquire())
        await asyncio.sleep(0)
        blocked = int(not waiter.done())
        limit.release()
        await waiter
        return blocked, limit.in_flight

    assert asyncio.run(scenario()) == (1, 2)
