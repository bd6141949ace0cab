"""One send task, timed alone: ``deliver_shard`` on one shard of a ``bench --send-only`` run,
against ``BatchSender`` on the same shard's batches, ready-made, in the same process and minute.

The 1M-event bench gives one ratio for eleven tasks run under Airflow and takes minutes; this
takes one shard and repeats it, so a change to the send step can be measured in a minute::

    python -m capi_devtools.bench --send-only --workdir /tmp/benchw     # once: the data
    python -m capi_devtools.bench_shard --workdir /tmp/benchw --shard 0 --repeat 3

Each repeat works on a copy of the run's state database with the shard's ledger and held rows
deleted (so every batch is sent again, as in the bench) and on a copy of the shard's work files
under ``_work/bench-shard``; the bench's own output is left as it was. The two modes alternate so
both see the same noise; on a shared machine one repeat's ratio still moves by 0.1 or more, so
compare medians of several. ``--profile PATH`` writes a cProfile of the last ``task`` repeat.

``--without-ledger-writes`` is a bound, not a delivery: the task reads the ledger as usual but
never marks, acknowledges or fails a batch. It shows what the send step would cost if its
ledger writes were free, so a change to them can be weighed before it is made. Its rows are
labelled ``task*`` and it is never what a send task does.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import resource
import shutil
import sqlite3
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from capi_devtools.bench import CONFIG_ID, proc_stat_cpu

#: The run folder of the copies (``PartitionStorage`` run id): never the bench's own.
_RUN_ID = "bench-shard"


def _thread_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime + usage.ru_stime


def _source_run(root: Path) -> tuple[str, str]:
    """The partition and Airflow run id the bench's send tasks recorded in the ledger."""
    with sqlite3.connect(root / "state.db") as connection:
        row = connection.execute("SELECT partition, run_id FROM capi_delivery_ledger LIMIT 1").fetchone()
    if row is None:
        raise SystemExit(f"{root / 'state.db'}: no ledger rows; run `bench --send-only` first")
    partition, run_id = row
    return str(partition), str(run_id).rsplit("#", 1)[0]


def _scratch_state(root: Path, scratch: Path, partition: str, shard: int, shard_count: int) -> Path:
    """A copy of the run's state DB without the shard's ledger and held rows."""
    target = scratch / "state.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{target}{suffix}").unlink(missing_ok=True)
    with sqlite3.connect(root / "state.db") as source, sqlite3.connect(target) as copy:
        source.backup(copy)
        for table in ("capi_delivery_ledger", "capi_held_conversions"):
            copy.execute(f"DELETE FROM {table} WHERE partition = ? AND session_key_hash % ? = ?",
                         (partition, shard_count, shard))
    return target


def _scratch_work(root: Path, partition: str, run_id: str, shard: int) -> Any:
    """``PartitionStorage`` of a harness run folder holding copies of what the send step reads."""
    from liveramp_capi.storage import PartitionStorage

    output = f"file://{root / 'output'}"
    source = PartitionStorage(None, output, partition, run_id)
    copy = PartitionStorage(None, output, partition, _RUN_ID)
    base = root / "output"
    for read, written in ((source.layout.validation, copy.layout.validation),
                          (source.layout.shard(shard), copy.layout.shard(shard))):
        target = base / copy.layout.folder / written
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(base / source.layout.folder / read, target)
    return copy


class _Timed:
    """Wall and CPU seconds of one repeat, of the calling thread, and of every thread it started
    (read from ``/proc`` every 50 ms while it runs, by thread name without its number)."""

    def __init__(self) -> None:
        self.wall = self.cpu = self.loop_cpu = self.start_wall = self.start_cpu = 0.0
        self.minor_faults = 0
        self.threads: dict[str, float] = {}

    @contextmanager
    def measure(self) -> Iterator[None]:
        before = {thread.native_id for thread in threading.enumerate()}
        seen: dict[int, tuple[str, float]] = {}
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.05):
                for thread in threading.enumerate():
                    if thread.native_id in before or thread.native_id is None or thread.native_id == sampler.native_id:
                        continue
                    try:
                        ticks = proc_stat_cpu(f"/proc/self/task/{thread.native_id}/stat")
                    except OSError:
                        continue
                    seen[thread.native_id] = (thread.name.split("_")[0].rstrip("-0123456789"), ticks)

        sampler = threading.Thread(target=sample, name="bench-shard-sampler", daemon=True)
        sampler.start()
        wall, cpu, own = time.perf_counter(), time.process_time(), _thread_cpu()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        yield
        self.minor_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        self.wall = time.perf_counter() - wall
        self.cpu = time.process_time() - cpu
        self.loop_cpu = _thread_cpu() - own
        stop.set()
        sampler.join()
        for name, ticks in seen.values():
            self.threads[name] = self.threads.get(name, 0.0) + ticks


def _ledger_without_writes(engine: Any) -> Any:
    """The delivery ledger with its reads and none of its writes (``--without-ledger-writes``)."""
    from liveramp_capi.state.ledger import DeliveryLedger

    class LedgerWithoutWrites(DeliveryLedger):
        def mark_in_flight(self, *args: Any, **kwargs: Any) -> None:
            return None

        def record_acknowledged(self, *args: Any, **kwargs: Any) -> None:
            return None

        def record_failed(self, *args: Any, **kwargs: Any) -> None:
            return None

    return LedgerWithoutWrites(engine)


def _task(root: Path, scratch: Path, source: tuple[str, str], shard: int, sender: Any,
          profile: Path | None, *, ledger_writes: bool = True) -> tuple[_Timed, int]:
    from liveramp_capi.domain.batches import DEFAULT_MAX_BATCH_EVENTS
    from liveramp_capi.pipeline.deliver import ShardConfig, deliver_shard
    from liveramp_capi.state.database import make_engine
    from liveramp_capi.state.envelope_store import EnvelopeStore
    from liveramp_capi.state.held_store import HeldConversions
    from liveramp_capi.state.lease import LeaseKeeper, PartitionLease
    from liveramp_capi.state.ledger import DeliveryLedger

    partition, run_id = source
    storage = _scratch_work(root, partition, run_id, shard)
    shard_count = int(storage.read_json(storage.layout.validation)["shard_count"])
    engine = make_engine(f"sqlite:///{_scratch_state(root, scratch, partition, shard, shard_count)}")
    lease = PartitionLease(engine)
    if not lease.acquire(partition, _RUN_ID, "bench-shard").acquired:
        raise SystemExit("the scratch state DB's partition is claimed by another run")
    timed = _Timed()
    profiler = cProfile.Profile()  # enabled only around the send step, and only with --profile
    ledger = DeliveryLedger(engine) if ledger_writes else _ledger_without_writes(engine)

    def send(*args: Any, **kwargs: Any) -> Any:
        # Everything before this call is the task's start: reading, look-ups, sessions.
        timed.start_wall, timed.start_cpu = time.perf_counter() - started[0], _thread_cpu() - started[1]
        return sender.deliver_sync(*args, **kwargs)

    started = [time.perf_counter(), _thread_cpu()]
    with (LeaseKeeper(lease, partition, _RUN_ID, "bench-shard") as claim, timed.measure(),
          profiler if profile is not None else nullcontext()):
        done = deliver_shard(
            ShardConfig(shard, DEFAULT_MAX_BATCH_EVENTS, "liveramp_capi_default"), storage, ledger, EnvelopeStore(engine),
            HeldConversions(engine), send, claim, airflow_run_id=_RUN_ID, try_number=1,
        )
    if profile is not None:
        profiler.dump_stats(profile)
    engine.dispose()
    return timed, int(done.result["requests"])


def _ready_batches(root: Path, source: tuple[str, str], shard: int) -> list[Any]:
    """The shard's batches as the send step plans them (nothing acknowledged, nothing held)."""
    from liveramp_capi.domain.batches import DEFAULT_MAX_BATCH_EVENTS
    from liveramp_capi.domain.held import HeldIndex
    from liveramp_capi.domain.send_plan import plan_session
    from liveramp_capi.domain.sessions import read_shard, sessionise
    from liveramp_capi.state.database import make_engine
    from liveramp_capi.state.envelope_store import EnvelopeStore
    from liveramp_capi.storage import PartitionStorage

    partition, run_id = source
    storage = PartitionStorage(None, f"file://{root / 'output'}", partition, run_id)  # only read
    with storage.open_read(storage.layout.shard(shard)) as stream:
        sessions = list(sessionise(read_shard(stream)))
    now = int(time.time())
    engine = make_engine(f"sqlite:///{root / 'state.db'}")
    stored = EnvelopeStore(engine).resolve(
        {entry.user_key for session in sessions for entry in session.entries if entry.user_key}, now=now
    )
    engine.dispose()
    held = HeldIndex({}, set())
    return [batch for session in sessions
            for batch in plan_session(session, stored, now, partition=partition, max_events=DEFAULT_MAX_BATCH_EVENTS,
                                      acknowledged={}, held=held).batches]


def _ready(batches: list[Any], sender: Any) -> tuple[_Timed, int]:
    failed = 0

    def on_outcome(batch: Any, outcome: Any) -> None:
        nonlocal failed
        failed += not outcome.acknowledged

    timed = _Timed()
    with timed.measure():
        stats = sender.deliver_sync(batches, on_outcome)
    if failed:
        raise RuntimeError(f"BatchSender: {failed} batches failed")
    return timed, int(stats.requests)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--workdir", type=Path, default=Path("_bench"), help="the `bench --send-only` workdir")
    parser.add_argument("--events", type=int, default=1_000_000, help="the end-to-end size it ran (its folder)")
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--mode", choices=("both", "task", "ready"), default="both")
    parser.add_argument("--profile", type=Path, help="cProfile output of the last task repeat")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--without-ledger-writes", action="store_true",
                        help="a bound, not a delivery: the task skips every ledger write (rows 'task*')")
    args = parser.parse_args(argv)

    from capi_devtools.standin_fixture import running_standin
    from liveramp_capi.delivery.sender import BatchSender
    from liveramp_capi.delivery.settings import CapiSettings

    root = args.workdir / f"e2e-{args.events}"
    scratch = args.workdir / "bench-shard"
    scratch.mkdir(parents=True, exist_ok=True)
    source = _source_run(root)
    batches = _ready_batches(root, source, args.shard) if args.mode != "task" else []
    task = "task*" if args.without_ledger_writes else "task"
    if args.without_ledger_writes:
        print("task*: a bound, not a delivery: the send task skips every ledger write", flush=True)
    figures: dict[str, list[dict[str, float]]] = {task: [], "ready": []}
    # Each run takes the sender and whether this is the last repeat (the one profiled).
    runs: list[tuple[str, Callable[[Any, bool], tuple[_Timed, int]]]] = []
    if args.mode in ("both", "ready"):
        runs.append(("ready", lambda sender, last: _ready(batches, sender)))
    if args.mode in ("both", "task"):
        runs.append((task, lambda sender, last: _task(root, scratch, source, args.shard, sender,
                                                       args.profile if last else None,
                                                       ledger_writes=not args.without_ledger_writes)))
    with running_standin("--latency-ms", str(args.latency_ms), "--no-keep-in-memory", config_id=CONFIG_ID) as standin:
        for repeat in range(args.repeat):
            for name, run in runs:
                sender = BatchSender(standin.url, CONFIG_ID, CapiSettings(concurrency=args.concurrency,
                                                                          verify_tls=False))
                standin_stat = f"/proc/{standin.process.pid}/stat"
                standin_cpu = proc_stat_cpu(standin_stat)
                timed, requests = run(sender, repeat == args.repeat - 1)
                timed.threads["stand-in process"] = proc_stat_cpu(standin_stat) - standin_cpu
                row = {
                    "start_wall": timed.start_wall, "start_cpu": timed.start_cpu, "wall": timed.wall, "cpu": timed.cpu,
                    "loop_cpu": timed.loop_cpu, "requests": requests, "minor_faults": timed.minor_faults,
                    **{f"cpu:{name}": value for name, value in timed.threads.items()},
                }
                figures[name].append(row)
                print(f"{name:5} #{repeat}: {timed.wall:6.2f} s wall, {timed.cpu:6.2f} s CPU "
                      f"({timed.loop_cpu:5.2f} s on the calling thread"
                      + (f" of which {timed.start_cpu:.2f} s before sending ({timed.start_wall:.2f} s wall)"
                         if timed.start_wall else "")
                      + "".join(f", {value:.2f} s {name}" for name, value in sorted(timed.threads.items()))
                      + f"), {requests:,} requests, {timed.minor_faults:,} minor page faults", flush=True)
    for name, rows in figures.items():
        if rows:
            walls = [row["wall"] for row in rows]
            print(f"{name:5}: median {statistics.median(walls):.2f} s, best {min(walls):.2f} s")
    if figures[task] and figures["ready"]:
        ratio = statistics.median(r["wall"] for r in figures["ready"]) / statistics.median(
            r["wall"] for r in figures[task])
        print(f"{task} vs ready (medians): {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
