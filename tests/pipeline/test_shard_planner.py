"""The send step's planner thread: the same plan as planning inline, bounded lead, errors and early stops."""

from __future__ import annotations

import threading
import time
from collections import Counter

import orjson
import pytest

from liveramp_capi.domain.held import HeldIndex
from liveramp_capi.domain.send_plan import SessionPlan, plan_session
from liveramp_capi.domain.sessions import Session, ShardEntry, key_hash
from liveramp_capi.pipeline.shard_planner import ShardPlanner

PARTITION = "2026-11-20"
NOW = 1_800_000_000


def sessions(count: int, *, size: int = 3, expired_every: int = 0) -> list[Session]:
    """``count`` sessions of ``size`` events; every ``expired_every``-th event's own envelope has expired."""
    made = []
    ordinal = 0
    for number in range(count):
        key = f"s:session-{number}"
        entries = []
        for index in range(size):
            event = {"event_id": f"e{number}-{index}", "event_time": 100 + index}
            expired = bool(expired_every) and ordinal % expired_every == 0
            entries.append(ShardEntry(key, key_hash(key), 100 + index, event["event_id"], ordinal, f"user-{number}",
                                      orjson.dumps(event), NOW - 100, NOW - 1 if expired else NOW + 100))
            ordinal += 1
        made.append(Session(key, key_hash(key), entries))
    return made


def planner_for(shard: list[Session], **kwargs) -> ShardPlanner:
    return ShardPlanner(shard, plan, lambda p: p.expired_lines(PARTITION, 0), **kwargs)


def plan(session: Session) -> SessionPlan:
    return plan_session(session, {}, NOW, partition=PARTITION, max_events=2, acknowledged={}, held=HeldIndex({}))


def test_groups_hold_exactly_what_inline_planning_decides():
    shard = sessions(101, size=3, expired_every=7)
    inline = [plan(session) for session in shard]
    expected_counts: Counter[str] = Counter(events=sum(len(s.entries) for s in shard))
    for p in inline:
        p.add_counts(expected_counts)

    with planner_for(shard, group_size=16, ahead=2) as planner:
        groups = list(planner)

    assert all(0 < len(g.batches) <= 16 for g in groups[:-1])
    assert [b for g in groups for b in g.batches] == [b for p in inline for b in p.batches]
    assert [e for g in groups for e in g.holds] == [e for p in inline for e in p.hold]
    assert [line for g in groups for line in g.expired_lines] == [
        line for p in inline for line in p.expired_lines(PARTITION, 0)
    ]
    assert sum((g.counts for g in groups), Counter()) == expected_counts
    assert expected_counts["envelope_expired_events"] > 0  # the holds above are not vacuous


def test_holds_travel_with_the_group_of_their_sessions_first_batch():
    # Session 0: every event held (no batch); session 1: one batch. The hold must come no later
    # than the group holding session 1's batch, so it is recorded before anything after it is sent.
    shard = sessions(2, size=1, expired_every=2)
    assert plan(shard[0]).hold and not plan(shard[0]).batches
    with planner_for(shard, group_size=1) as planner:
        groups = list(planner)
    assert groups[0].holds == plan(shard[0]).hold
    assert groups[0].batches == plan(shard[1]).batches


def test_an_empty_shard_gives_no_group():
    with planner_for([], group_size=4) as planner:
        assert list(planner) == []


def test_the_planner_stays_at_most_ahead_groups_in_front():
    planned = []
    shard = sessions(2_000, size=1)

    def counting(session: Session) -> SessionPlan:
        planned.append(session)
        return plan(session)

    with ShardPlanner(shard, counting, lambda p: [], group_size=10, ahead=2) as planner:
        groups = iter(planner)
        next(groups)
        time.sleep(0.3)  # an unbounded planner would have planned all 2,000 sessions by now
        # One group taken, two waiting in the queue, one being filled when the queue was full.
        assert len(planned) <= 10 * 4 + 1
        assert sum(len(g.batches) for g in groups) == 2_000 - 10


def test_a_planning_error_is_raised_in_the_consumer_and_the_thread_ends():
    shard = sessions(50, size=1)

    def failing(session: Session) -> SessionPlan:
        if session is shard[30]:
            raise ValueError("no plan for this session")
        return plan(session)

    consumed = []
    with pytest.raises(ValueError, match="no plan for this session"):
        with ShardPlanner(shard, failing, lambda p: [], group_size=4, name="planner-failing") as planner:
            consumed.extend(planner)
    assert sum(len(g.batches) for g in consumed) <= 30  # nothing planned after the failure is handed out
    assert not any(t.name == "planner-failing" for t in threading.enumerate())


def test_leaving_early_stops_a_planner_blocked_on_a_full_queue():
    shard = sessions(5_000, size=1)
    with planner_for(shard, group_size=1, ahead=1, name="planner-early-exit") as planner:
        next(iter(planner))
    assert not any(t.name == "planner-early-exit" for t in threading.enumerate())


def test_iterating_outside_the_block_is_refused():
    with pytest.raises(RuntimeError, match="context manager"):
        list(planner_for(sessions(1), group_size=1))


@pytest.mark.parametrize("size, ahead", [(0, 1), (1, 0)])
def test_group_size_and_lead_must_be_positive(size, ahead):
    with pytest.raises(ValueError, match=">= 1"):
        planner_for([], group_size=size, ahead=ahead)
