"""Envelope lifetimes over 60 days: a daily-refresh simulation of a population with mixed consents.

Each simulated user has a consent shape *and* a true jurisdiction the pipeline cannot see (a US
Privacy string is sent by Californians and by other Americans alike). Every day, at the
conversions run, some users visit (their page capture brings a new envelope: an upsert) and some
have an offline conversion (sent through the real send-time resolution: the store's envelope or
the record's own, or held back); at the refresh run the real store selects what is due
(``iter_due``, a share of each envelope's own lifetime) and stores the refreshed envelopes (the
refresh API always answers here; rows without consent are never refreshed). The simulation keeps
its own truth table of every envelope's real expiry and counts:

* conversions sent with an envelope that had truly expired (must be 0 where a refresh was possible);
* conversions held although a refresh could have kept the envelope alive (must be 0);
* refresh calls per envelope per month, against two minima: the lazy policy (refresh at the last
  daily run before expiry) under the configured rule, and the same knowing every user's true
  jurisdiction (what no pipeline can know; the price of the conservative rule).

Run on its own: ``python -m capi_devtools.bench_envelopes [--users 5000] [--rule conservative]``;
``make bench`` prints its rows.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from liveramp_capi.domain.consent import DAY_SECONDS, Consent, LifetimeRule, lifetime_seconds
from liveramp_capi.domain.envelopes import EnvelopeRecord, RefreshResult, resolve_session
from liveramp_capi.domain.sessions import Session, ShardEntry, key_hash
from liveramp_capi.state.database import make_engine
from liveramp_capi.state.envelope_store import EnvelopeStore

HOUR = 3600
T0 = 1_798_761_600  # 2027-01-01 00:00 UTC: any fixed day; the store is driven with explicit times
CV_TCF = "CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA"

#: (shape, consent, truly Californian, share of the population)
POPULATION: tuple[tuple[str, Consent | None, bool, float], ...] = (
    ("tcf (EU)", Consent(ct=4, cv=CV_TCF), False, 0.25),
    ("usp ct=3, Californian", Consent(ct=3, cv="1YNN"), True, 0.15),
    ("usp ct=3, other state", Consent(ct=3, cv="1YNN"), False, 0.15),
    ("gpp 7,8 (California)", Consent(gpp="DBABMA~x", gpp_sid="7,8"), True, 0.10),
    ("gpp 9 (Virginia)", Consent(gpp="DBABMA~x", gpp_sid="9"), False, 0.10),
    ("gpp 7 (national), Californian", Consent(gpp="DBABMA~x", gpp_sid="7"), True, 0.05),
    ("no consent, Californian", None, True, 0.10),
    ("no consent, other state", None, False, 0.10),
)


@dataclass(slots=True)
class User:
    key: str
    consent: Consent | None
    californian: bool
    first_envelope: str
    first_issued: int

    @property
    def true_lifetime(self) -> int:
        return (15 if self.californian else 30) * DAY_SECONDS


@dataclass(slots=True)
class SimulationResult:
    """Counts of one simulated run (no identifiers)."""

    users: int
    days: int
    rule: str
    remaining_share: float
    refresh_calls: int = 0
    lazy_minimum_calls: int = 0
    true_minimum_calls: int = 0
    conversions: int = 0
    sent: int = 0
    sent_dead_refreshable: int = 0
    sent_dead_not_refreshable: int = 0
    held_refreshable: int = 0
    held_not_refreshable: int = 0
    by_shape: dict[str, Counter[str]] = field(default_factory=dict)

    @property
    def refreshable_users(self) -> int:
        return sum(c["users"] for c in self.by_shape.values() if c["refreshable"])

    @property
    def calls_per_envelope_month(self) -> float:
        return self.refresh_calls / max(self.refreshable_users, 1) / (self.days / 30)

    def as_dict(self) -> dict[str, Any]:
        return {
            "users": self.users, "days": self.days, "rule": self.rule, "remaining_share": self.remaining_share,
            "refresh_calls": self.refresh_calls, "lazy_minimum_calls": self.lazy_minimum_calls,
            "true_minimum_calls": self.true_minimum_calls,
            "refresh_calls_per_envelope_per_month": round(self.calls_per_envelope_month, 3),
            "conversions": self.conversions, "sent": self.sent,
            "sent_with_expired_envelope_refreshable": self.sent_dead_refreshable,
            "sent_with_expired_envelope_not_refreshable": self.sent_dead_not_refreshable,
            "held_refreshable": self.held_refreshable, "held_not_refreshable": self.held_not_refreshable,
            "by_shape": {shape: dict(counts) for shape, counts in self.by_shape.items()},
        }


def _entry(user: User, event_time: int, number: int, rule: LifetimeRule) -> ShardEntry:
    # An offline conversion carries the envelope captured at the user's first visit.
    event = {"event_id": f"c{number}", "event_type": "Purchase", "event_time": event_time,
             "user_data": {"partner_id": user.first_envelope}}
    expires = user.first_issued + lifetime_seconds(user.consent, rule)
    return ShardEntry(user.key, key_hash(user.key), event_time, event["event_id"], number, user.key,
                      orjson.dumps(event), user.first_issued, expires)


def simulate(
    *,
    users: int = 2000,
    days: int = 60,
    rule: LifetimeRule = LifetimeRule.CONSERVATIVE,
    remaining_share: float = 1 / 3,
    visit_rate: float = 0.03,
    conversion_rate: float = 0.05,
    seed: int = 13,
    database: Path | None = None,
) -> SimulationResult:
    """Run the simulation on a fresh SQLite store and return its counts.

    :param users: population size (shapes in :data:`POPULATION` proportions).
    :param days: simulated days (one conversions run at 03:00, one refresh run at 05:30, daily).
    :param rule: the store's lifetime rule.
    :param remaining_share: the refresh selection share.
    :param visit_rate: daily chance that a user visits (a new envelope arrives with a record).
    :param conversion_rate: daily chance that a user has an offline conversion.
    :param seed: random seed.
    :param database: the SQLite file (default: a temporary one).
    """
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as scratch:
        engine = make_engine(f"sqlite:///{database or Path(scratch) / 'sim.db'}")
        store = EnvelopeStore(engine, rule)
        store.ensure_schema()
        result = SimulationResult(users, days, rule.value, remaining_share)
        population: list[User] = []
        shape_of: dict[str, str] = {}
        truth: dict[str, int] = {}  # envelope value -> true expiry
        lazy: dict[str, int] = {}  # user -> expiry under the lazy policy and the rule
        lazy_true: dict[str, int] = {}  # user -> expiry under the lazy policy, knowing the jurisdiction
        cumulative = 0.0
        bounds = []
        for shape, consent, californian, share in POPULATION:
            cumulative += share
            bounds.append((cumulative, shape, consent, californian))
            result.by_shape[shape] = Counter(refreshable=int(consent is not None))
        records = []
        for number in range(users):
            draw = rng.random() * cumulative
            _, shape, consent, californian = next(b for b in bounds if draw < b[0])
            issued = T0 - rng.randint(0, 12 * DAY_SECONDS)
            user = User(f"user-{number:06d}", consent, californian, f"first-{number}", issued)
            population.append(user)
            shape_of[user.key] = shape
            result.by_shape[shape]["users"] += 1
            truth[user.first_envelope] = issued + user.true_lifetime
            lazy[user.key] = issued + lifetime_seconds(consent, rule)
            lazy_true[user.key] = issued + user.true_lifetime
            records.append(EnvelopeRecord(user.key, user.first_envelope, issued, consent, lifetime_rule=rule))
        store.upsert(records, now=T0)
        refreshable = {u.key for u in population if u.consent is not None}
        by_key = {u.key: u for u in population}
        conversion_number = 0
        envelope_number = 0

        for day in range(days):
            run = T0 + day * DAY_SECONDS + 3 * HOUR
            # Conversions run: yesterday's visits bring new envelopes, then offline conversions go out.
            visits = []
            for user in population:
                if rng.random() < visit_rate:
                    issued = run - rng.randint(3 * HOUR, 24 * HOUR)
                    envelope_number += 1
                    value = f"visit-{envelope_number}"
                    truth[value] = issued + user.true_lifetime
                    lazy[user.key] = max(lazy[user.key], issued + lifetime_seconds(user.consent, rule))
                    lazy_true[user.key] = max(lazy_true[user.key], issued + user.true_lifetime)
                    visits.append(EnvelopeRecord(user.key, value, issued, user.consent, lifetime_rule=rule))
            store.upsert(visits, now=run)
            converting = [u for u in population if rng.random() < conversion_rate]
            stored = store.resolve([u.key for u in converting], now=run)
            for user in converting:
                conversion_number += 1
                result.conversions += 1
                entry = _entry(user, run - HOUR, conversion_number, rule)
                resolved = resolve_session(Session(user.key, key_hash(user.key), [entry]), stored, run)
                counts = result.by_shape[shape_of[user.key]]
                counts["conversions"] += 1
                if resolved.expired:
                    counts["held"] += 1
                    if user.key in refreshable:
                        result.held_refreshable += 1
                    else:
                        result.held_not_refreshable += 1
                    continue
                result.sent += 1
                used = orjson.loads(resolved.resolved.entries[0].event_json)["user_data"]["partner_id"]
                if truth[used] <= run:
                    counts["sent_with_expired_envelope"] += 1
                    if user.key in refreshable:
                        result.sent_dead_refreshable += 1
                    else:
                        result.sent_dead_not_refreshable += 1

            # Refresh run: the real selection and bookkeeping; the API always answers.
            refresh_at = T0 + day * DAY_SECONDS + 5 * HOUR + 30 * 60
            store.mark_expired_by_state(now=refresh_at)
            done = []
            for page in store.iter_due(now=refresh_at, remaining_share=remaining_share):
                for row in page:
                    if row.consent is None:
                        continue
                    envelope_number += 1
                    value = f"refresh-{envelope_number}"
                    truth[value] = refresh_at + by_key[row.user_key].true_lifetime
                    done.append(RefreshResult(row, new_envelope=value))
                    result.by_shape[shape_of[row.user_key]]["refresh_calls"] += 1
            result.refresh_calls += len(done)
            store.record_refreshed(done, now=refresh_at)
            for key in refreshable:
                user = by_key[key]
                if refresh_at < lazy[key] <= refresh_at + DAY_SECONDS:
                    lazy[key] = refresh_at + lifetime_seconds(user.consent, rule)
                    result.lazy_minimum_calls += 1
                if refresh_at < lazy_true[key] <= refresh_at + DAY_SECONDS:
                    lazy_true[key] = refresh_at + user.true_lifetime
                    result.true_minimum_calls += 1
        engine.dispose()
    return result


def envelope_rows(row_type: Any, *, quick: bool = False) -> list[Any]:
    """The simulation's rows for ``make bench`` (``row_type`` is bench.py's ``Row``).

    :param row_type: the table row class.
    :param quick: a smaller population.
    """
    users = 400 if quick else 5000
    result = simulate(users=users)
    old = simulate(users=users, rule=LifetimeRule.NO_CALIFORNIA_TRAFFIC)
    ratio = result.refresh_calls / max(result.lazy_minimum_calls, 1)
    true_ratio = result.refresh_calls / max(result.true_minimum_calls, 1)
    refreshable = sum(c["conversions"] for c in result.by_shape.values() if c["refreshable"])
    live = refreshable - result.sent_dead_refreshable - result.held_refreshable
    live_share = 100 * live / max(refreshable, 1)
    label = f"envelopes ({result.days} days, {users:,} users, mixed consent)"
    return [
        row_type(f"{label}: refresh calls per envelope per month", result.calls_per_envelope_month, "calls"),
        row_type(f"{label}: refresh calls vs lazy minimum", result.refresh_calls, "calls",
                 baseline=result.lazy_minimum_calls, ratio=ratio, target="<= 2x", met=ratio <= 2),
        row_type(f"{label}: refresh calls vs minimum knowing true jurisdictions", result.refresh_calls, "calls",
                 baseline=result.true_minimum_calls, ratio=true_ratio, target="(information)"),
        row_type(f"{label}: conversions of refreshable users sent with a live envelope", live_share, "%",
                 target="100 % (none expired, none held)", met=live == refreshable),
        row_type(f"{label}: conversions held, no consent to refresh with", result.held_not_refreshable, "events"),
        row_type(f"{label}: under the 30-day rule, conversions sent with an expired envelope",
                 old.sent_dead_refreshable + old.sent_dead_not_refreshable, "events",
                 target="(conservative rule: 0)"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--rule", default="conservative", choices=[r.value for r in LifetimeRule])
    parser.add_argument("--remaining-share", type=float, default=1 / 3)
    args = parser.parse_args(argv)
    result = simulate(users=args.users, days=args.days, rule=LifetimeRule(args.rule),
                      remaining_share=args.remaining_share)
    print(orjson.dumps(result.as_dict(), option=orjson.OPT_INDENT_2).decode())
    ok = result.sent_dead_refreshable == 0 and result.held_refreshable == 0
    ok = ok and result.refresh_calls <= 2 * result.lazy_minimum_calls
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
