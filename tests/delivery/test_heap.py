"""Keeping the garbage collector off long-lived heaps: what each helper leaves behind."""

from __future__ import annotations

import gc
import weakref

from liveramp_capi.delivery.heap import RUN_THRESHOLD, collector_paused, long_lived_heap_frozen


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_frozen_heap_moves_existing_objects_out_and_back_when_the_last_block_ends() -> None:
    gc.unfreeze()
    before = _Node()
    with long_lived_heap_frozen():
        assert gc.get_freeze_count() > 0
        frozen = gc.get_freeze_count()
        with long_lived_heap_frozen():  # a second run at once does not unfreeze the first's heap
            pass
        assert gc.get_freeze_count() == frozen
    assert gc.get_freeze_count() == 0
    assert gc.is_tracked(before)


def test_cycles_that_die_inside_a_frozen_block_are_collected_after_it() -> None:
    gc.unfreeze()
    gc.collect()
    node = _Node()
    alive = weakref.ref(node)
    with long_lived_heap_frozen():
        del node
        gc.collect()
        assert alive() is not None  # frozen: not collected yet
    gc.collect()
    assert alive() is None


def test_collector_paused_restores_the_collector_even_after_an_error() -> None:
    assert gc.isenabled()
    try:
        with collector_paused():
            assert not gc.isenabled()
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()  # it was off before: left off
    finally:
        gc.enable()


def test_collections_are_rarer_during_a_run_and_thresholds_come_back() -> None:
    before = gc.get_threshold()
    with long_lived_heap_frozen():
        with long_lived_heap_frozen():
            assert gc.get_threshold()[0] == max(RUN_THRESHOLD, before[0])
        assert gc.get_threshold()[0] == max(RUN_THRESHOLD, before[0])  # the outer run still lasts
    assert gc.get_threshold() == before


class _Leaf:
    """A tracked object without a cycle."""


def test_what_a_paused_block_builds_inside_a_frozen_run_is_frozen_when_it_ends() -> None:
    gc.unfreeze()
    with long_lived_heap_frozen():
        frozen = gc.get_freeze_count()
        with collector_paused():
            built = [_Leaf() for _ in range(1_000)]
        assert gc.get_freeze_count() >= frozen + len(built)  # never walked by the next collection
    assert gc.get_freeze_count() == 0
    assert all(gc.is_tracked(leaf) for leaf in built)


def test_a_paused_block_outside_a_frozen_run_freezes_nothing() -> None:
    gc.unfreeze()
    with collector_paused():
        built = [_Leaf() for _ in range(1_000)]
    assert gc.get_freeze_count() == 0
    assert len(built) == 1_000
