"""A 60-day daily-refresh simulation of a population with mixed consents (capi_devtools.bench_envelopes)
on a real SQLite store: no envelope is used past its lifetime while a refresh could have renewed
it, and refresh calls stay within 2x of the minimum."""

from __future__ import annotations

from capi_devtools.bench_envelopes import simulate
from liveramp_capi.domain.consent import LifetimeRule


def test_conservative_rule_never_sends_a_dead_envelope_and_refreshes_within_twice_the_minimum() -> None:
    result = simulate(users=600, days=60, seed=7)
    print("\n", result.as_dict())
    assert result.conversions > 1000 and result.sent > 0
    assert result.sent_dead_refreshable == 0, "a conversion went out with an envelope a refresh could have renewed"
    assert result.held_refreshable == 0, "a conversion was held although a refresh could have kept its envelope"
    # Users without consent are never refreshed; their conversions wait for a new visit instead.
    assert result.sent_dead_not_refreshable == 0 and result.held_not_refreshable > 0
    assert result.lazy_minimum_calls <= result.refresh_calls <= 2 * result.lazy_minimum_calls
    assert result.refresh_calls <= 2 * result.true_minimum_calls
    # Every refreshable shape was refreshed; consent-less users never were.
    for shape, counts in result.by_shape.items():
        assert (counts["refresh_calls"] > 0) == bool(counts["refreshable"]), shape


def test_the_30_day_rule_sends_californians_dead_envelopes() -> None:
    # What the conservative rule prevents: with 30 days assumed, Californians on a US Privacy
    # string (or without consent) go out with envelopes that died on day 15.
    result = simulate(users=600, days=60, seed=7, rule=LifetimeRule.NO_CALIFORNIA_TRAFFIC)
    assert result.sent_dead_refreshable > 0
    assert result.by_shape["usp ct=3, Californian"]["sent_with_expired_envelope"] > 0
    assert result.by_shape["tcf (EU)"]["sent_with_expired_envelope"] == 0
