"""The planner's child process: bounded lead, a child that dies, errors that do not pickle, and
a child that never runs the parent's code after the fork."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import orjson
import pytest

from liveramp_capi.domain.send_plan import SessionPlan
from liveramp_capi.domain.sessions import Session, ShardEntry, key_hash
from liveramp_capi.pipeline.planner_process import PlannerProcess, PlannerProcessDied, can_fork
from liveramp_capi.pipeline.shard_planner import ShardPlanner, plan_groups
from tests.pipeline.test_shard_planner import plan, sessions

pytestmark = pytest.mark.skipif(not can_fork(), reason="the planner process needs os.fork")


def wide_sessions(count: int, event_bytes: int) -> list[Session]:
    """One-event sessions whose event JSON is about ``event_bytes`` long."""
    made = []
    for number in range(count):
        key = f"s:wide-{number}"
        event = orjson.dumps({"event_id": f"w{number}", "pad": "x" * event_bytes})
        made.append(Session(key, key_hash(key), [ShardEntry(key, key_hash(key), 100, f"w{number}", number, None, event)]))
    return made


def test_the_child_stays_a_few_groups_ahead(tmp_path: Path):
    # Each planned session appends a byte to a file the child inherits: the parent can count them.
    ledger = tmp_path / "planned"
    fd = os.open(ledger, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    shard = wide_sessions(2_000, event_bytes=10_000)  # a group of 10 is ~100 KB: more than the pipe holds

    def counting(session: Session) -> SessionPlan:
        os.write(fd, b".")
        return plan(session)

    try:
        with ShardPlanner(shard, counting, lambda p: [], group_size=10, ahead=2, in_child_process=True) as planner:
            groups = iter(planner)
            next(groups)
            time.sleep(0.5)  # an unbounded child would have planned all 2,000 sessions by now
            # Taken, two queued, one held by the reader, one in the pipe, one being written.
            assert ledger.stat().st_size <= 10 * 6 + 1
            assert sum(len(g.batches) for g in groups) == 2_000 - 10
    finally:
        os.close(fd)
    assert ledger.stat().st_size == 2_000


def test_a_child_killed_from_outside_fails_the_consumer_with_the_signal():
    shard = wide_sessions(3_000, event_bytes=2_000)
    with ShardPlanner(shard, plan, lambda p: [], group_size=10, ahead=1, in_child_process=True) as planner:
        groups = iter(planner)
        next(groups)
        child = planner._child
        assert child is not None
        os.kill(child.pid, signal.SIGKILL)
        with pytest.raises(PlannerProcessDied, match="signal 9"):
            for _ in groups:
                pass


def test_an_exception_that_does_not_pickle_still_names_its_type():
    class Unpicklable(Exception):
        def __reduce__(self):
            raise TypeError("no pickling")

    def failing(session: Session) -> SessionPlan:
        raise Unpicklable("no plan")

    with pytest.raises(RuntimeError, match="the planning raised Unpicklable"):
        with ShardPlanner(sessions(3), failing, lambda p: [], group_size=1, in_child_process=True) as planner:
            list(planner)


def test_the_child_is_reaped_and_never_runs_the_parents_code(tmp_path: Path):
    trace = tmp_path / "after"
    parent = os.getpid()
    child = PlannerProcess(sessions(40), lambda shard: plan_groups(shard, plan, lambda p: [], 4))
    try:
        assert sum(len(batches) for batches, *_ in child.groups()) == 40 * 2  # 3 events, 2 a batch
    finally:
        child.kill()
        child.reap()
        with trace.open("a") as out:  # a child that came back from the fork would write here too
            out.write(f"{os.getpid()}\n")
    assert trace.read_text().split() == [str(parent)]
    with pytest.raises(ChildProcessError):
        os.waitpid(child.pid, os.WNOHANG)  # reaped: no zombie left behind


def test_leaving_early_kills_and_reaps_the_child():
    shard = wide_sessions(5_000, event_bytes=1_000)
    with ShardPlanner(shard, plan, lambda p: [], group_size=1, ahead=1, in_child_process=True) as planner:
        next(iter(planner))
        child = planner._child
        assert child is not None
    with pytest.raises(ChildProcessError):
        os.waitpid(child.pid, os.WNOHANG)
