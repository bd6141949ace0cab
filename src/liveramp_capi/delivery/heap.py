"""Keeping Python's cyclic garbage collector off large, long-lived heaps (plain Python).

A send task holds Airflow, SQLAlchemy and every session of its shard; the collector walks all of
it in each full collection, and both reading a shard (hundreds of thousands of new long-lived
objects) and running requests (futures, handles and tasks by the thousand) trigger collections
all the time. Measured on a 75,000-event send task of the end-to-end bench: 45% of its wall
time was spent in the collector.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["collector_paused", "long_lived_heap_frozen"]

_frozen_runs = 0
_frozen_lock = threading.Lock()
_thresholds: tuple[int, int, int] | None = None
#: The youngest generation's threshold while a run lasts (Python's default is 700). A request
#: makes a few dozen short-lived container objects (futures, handles, dicts), so at the default
#: the collector runs every ~20 requests, and a send task's batches and ledger rows, alive until
#: their acknowledgement is written, are walked again and again by the older generations.
RUN_THRESHOLD = 20_000


@contextmanager
def long_lived_heap_frozen() -> Iterator[None]:
    """Keep the collector off the objects that exist now, while the block runs.

    They move to the permanent generation (``gc.freeze``) and come back when the last of the
    concurrent blocks ends (``gc.unfreeze``); cycles among them that die meanwhile are collected
    after it. Objects created inside the block are collected as usual, though less often
    (:data:`RUN_THRESHOLD`).
    """
    global _frozen_runs, _thresholds
    with _frozen_lock:
        _frozen_runs += 1
        if _frozen_runs == 1:
            gc.freeze()
            _thresholds = gc.get_threshold()
            gc.set_threshold(max(RUN_THRESHOLD, _thresholds[0]), _thresholds[1], _thresholds[2])
    try:
        yield
    finally:
        with _frozen_lock:
            _frozen_runs -= 1
            if _frozen_runs == 0:
                gc.unfreeze()
                if _thresholds is not None:
                    gc.set_threshold(*_thresholds)


@contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic collection while the block runs (reference counting still frees everything else).

    For building a large structure that lives on afterwards (a shard's sessions): collections
    meanwhile only walk objects that are all still alive. Garbage cycles made inside the block
    are collected by the first collection after it.

    Inside a :func:`long_lived_heap_frozen` block, what the block built is frozen when it ends,
    so that first collection does not walk it either: after reading a 1M-bench shard it walked
    the 144,000 objects it had tracked for 60 ms, before the first request of the shard went out.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        with _frozen_lock:
            if _frozen_runs:
                gc.freeze()
        if was_enabled:
            gc.enable()
