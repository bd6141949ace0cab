"""`make bench`: how fast and how lean the pipeline is, against baselines measured in the same run.

Generates a deterministic partition (``capi_devtools/bench_data.py``, seeded), starts the local
stand-in of LiveRamp's endpoints (NOT LiveRamp) with 50 ms latency, then measures:

1. validation: the pipeline's ``EventSchemaValidator`` (compiled first pass, ``jsonschema`` for
   the messages of invalid records) against the plain ``jsonschema`` validator on the same parsed
   events, in events per CPU-second of this one process (one core); for information also the
   whole record path (read + parse + schema + time window + dedupe of JSONL lines);
2. delivery: requests/s of the production sender (``BatchSender``) against the sequential
   ``HttpHook.run`` path (``LiveRampCapiHook.send_batch_sequential``) and a bare aiohttp client
   with the same number of requests in flight, side by side;
3. throttling: send shards (``BatchSender``, default settings, child processes) against the
   stand-in's token bucket (``--rate R``, burst R/10, 20 ms latency) at R = 400 and 2,000
   requests/s (``--throttle-rates``), 21,474 batches of 3-5 events (what a 100,000-event partition
   cuts), one shard alone and two at once: goodput against R, the share of 429s, each shard's
   share while both ran;
4. faults mix: the same ``--faults-events`` partition (100,000) through the DAG clean and under
   20% 5xx, 10% 429, 2% dropped connections and 0.5% stalls past the 10 s timeout;
5. end to end: ``tiktok_conversions`` run with ``dag.test()`` in a child process on a gzip JSONL
   partition of ``--events`` records, every event accounted for in ``summary.json`` and, from
   the stand-in's record file, delivered exactly once;
6. memory: the peak RSS while each task ran, at ``--events`` and at a tenth of it; and
   validate's peak RSS with landing and output on ``s3://`` (a moto server on loopback) at
   300,000 and 30,000 records against the same on ``file://`` (``capi_devtools/bench_object_storage.py``).

It prints ONE table (figure, value, baseline, ratio, target, met). The machine may be shared:
ratios against baselines measured in the same run are what to compare. ``--json PATH`` also
writes the rows (the test suite runs ``--quick`` at a small size and checks the table's shape).

Usage: ``python -m capi_devtools.bench [--events 1000000] [--quick] [--workdir .bench] [--json out.json]
[--throttle-only] [--throttle-rates 400,2000] [--throttle-batches N] [--faults-only] [--faults-events N]``
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from capi_devtools import REPO
from capi_devtools.bench_data import iter_partition_lines, write_partition
from capi_devtools.bench_envelopes import envelope_rows

SEED = 20261124
CONFIG_ID = "cfg-bench-5a1e"
PARTITION = "2026-11-20"


@dataclass(slots=True)
class Row:
    """One line of the result table.

    :param figure: what was measured.
    :param value: the measured value.
    :param unit: unit of ``value`` and ``baseline``.
    :param baseline: what it is compared with, measured in the same run (None: no baseline).
    :param ratio: value / baseline (or as the target defines it).
    :param target: the target, in words.
    :param met: whether the target is met (None: informational row).
    """

    figure: str
    value: float
    unit: str
    baseline: float | None = None
    ratio: float | None = None
    target: str = ""
    met: bool | None = None


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"
    return f"{text} {unit}".strip()


def print_table(rows: list[Row]) -> None:
    """Print the rows as one aligned table.

    :param rows: the measured rows.
    """
    header = ("figure", "value", "baseline", "ratio", "target", "met")
    cells = [
        (
            row.figure,
            _fmt(row.value, row.unit),
            _fmt(row.baseline, row.unit),
            "-" if row.ratio is None else f"{row.ratio:,.2f}x",
            row.target or "-",
            "-" if row.met is None else ("yes" if row.met else "NO"),
        )
        for row in rows
    ]
    widths = [max(len(str(c[i])) for c in [header, *cells]) for i in range(len(header))]
    line = "+".join("-" * (w + 2) for w in widths)
    print("|" + "|".join(f" {h:<{w}} " for h, w in zip(header, widths, strict=True)) + "|")
    print("|" + line + "|")
    for c in cells:
        print("|" + "|".join(f" {str(v):<{w}} " for v, w in zip(c, widths, strict=True)) + "|")


# ---------------------------------------------------------------------------- validation


def _cpu_rate(count: int, func: Any) -> float:
    """Run ``func`` and return ``count`` per CPU-second of this process (one core)."""
    started = time.process_time()
    func()
    return count / max(time.process_time() - started, 1e-9)


def measure_validation(lines: list[bytes], baseline_events: int) -> list[Row]:
    """Validation throughput of the pipeline against plain ``jsonschema``.

    :param lines: JSONL records (valid, invalid and repeated ones, as generated).
    :param baseline_events: how many of them the (slow) reference validator gets.
    """
    import jsonschema

    from liveramp_capi.domain.checks import DuplicateEventIds, EventTimeWindow
    from liveramp_capi.domain.schema import EventSchemaValidator, load_event_schema
    from liveramp_capi.domain.sources import iter_source_records
    from liveramp_capi.domain.validation import RecordValidator

    data = b"\n".join(lines) + b"\n"
    now = _day_start(PARTITION) + 86_400
    schema_validator = EventSchemaValidator()

    def pipeline() -> None:
        validator = RecordValidator(schema_validator, EventTimeWindow(now), DuplicateEventIds())
        for record in iter_source_records("bench.jsonl", io.BytesIO(data)):
            validator.check(record)

    pipeline()  # warm up (imports, caches)
    ours = max(_cpu_rate(len(lines), pipeline) for _ in range(2))

    parsed = []
    for line in lines[:baseline_events]:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            continue
    schema = load_event_schema()
    reference = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)

    def plain() -> None:
        for event in parsed:
            reference.is_valid(event)

    baseline = _cpu_rate(len(parsed), plain)
    # Like for like with the baseline: the same parsed events through the pipeline's validator
    # (compiled first pass, reference jsonschema for the messages of invalid ones).
    schema_rate = max(
        _cpu_rate(len(parsed), lambda: [schema_validator.validate(e) for e in parsed]) for _ in range(3)
    )
    fast = schema_validator._fast  # the compiled first pass alone, for information
    fast_rate = max(_cpu_rate(len(parsed), lambda: [fast.is_valid(e) for e in parsed]) for _ in range(3))
    ratio = schema_rate / baseline
    return [
        Row(
            "validation: EventSchemaValidator on the baseline's events (1 core)",
            schema_rate,
            "ev/s",
            baseline,
            ratio,
            ">= 100,000 ev/s and >= 20x jsonschema",
            schema_rate >= 100_000 and ratio >= 20,
        ),
        Row("  (info) jsonschema-rs is_valid alone", fast_rate, "ev/s", baseline, fast_rate / baseline),
        Row(
            "  (info) whole record path: read+parse+schema+window+dedupe",
            ours,
            "ev/s",
            baseline,
            ours / baseline,
        ),
    ]


# ---------------------------------------------------------------------------- delivery


def _bodies(lines: list[bytes], count: int) -> list[bytes]:
    """``count`` request bodies of 3 to 5 valid events each (the default session size)."""
    import orjson

    events = []
    for line in lines:
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        for name in ("session_id", "user_key", "envelope_issued_at", "consent", "client_ip"):
            value.pop(name, None)
        events.append(orjson.dumps(value))
    bodies = []
    index = 0
    for number in range(count):
        size = 3 + number % 3
        chunk = [events[(index + i) % len(events)] for i in range(size)]
        index += size
        bodies.append(b'{"events":[' + b",".join(chunk) + b"]}")
    return bodies


async def _bare_aiohttp(url: str, bodies: list[bytes], concurrency: int) -> float:
    """Requests/s of a minimal aiohttp client: the ceiling of Python on this machine."""
    import aiohttp

    iterator = iter(bodies)
    failures = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal failures
        for body in iterator:
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
                await response.read()
                failures += response.status != 200

    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"bare aiohttp client: {failures} requests failed")
    return len(bodies) / elapsed


#: Event ids of the ready-made bodies (3-5 events a batch); only their count matters here.
_EVENT_IDS = tuple(tuple(f"e{k}" for k in range(3 + n)) for n in range(3))


def _sender_rate(standin_url: str, bodies: list[bytes], concurrency: int) -> tuple[float, float]:
    from liveramp_capi.delivery.sender import BatchSender
    from liveramp_capi.delivery.settings import CapiSettings
    from liveramp_capi.domain.batches import Batch

    settings = CapiSettings(concurrency=concurrency, verify_tls=False)
    sender = BatchSender(standin_url, CONFIG_ID, settings)
    batches = [Batch(f"b{i}", 0, _EVENT_IDS[i % 3], body) for i, body in enumerate(bodies)]
    failed = 0

    def on_outcome(batch: Any, outcome: Any) -> None:
        nonlocal failed
        failed += not outcome.acknowledged

    cpu_started = time.process_time()
    stats = sender.deliver_sync(batches, on_outcome)
    cpu = time.process_time() - cpu_started
    if failed:
        raise RuntimeError(f"BatchSender: {failed} batches failed")
    return stats.requests / stats.elapsed_seconds, stats.requests / max(cpu, 1e-9)


def _sequential_rate(standin_url: str, bodies: list[bytes]) -> float:
    os.environ["AIRFLOW_CONN_LIVERAMP_CAPI_BENCH"] = json.dumps(
        {"conn_type": "liveramp_capi", "host": standin_url, "password": CONFIG_ID, "extra": {"verify_tls": False}}
    )
    from liveramp_capi.hooks.capi import LiveRampCapiHook

    hook = LiveRampCapiHook(liveramp_capi_conn_id="liveramp_capi_bench")
    hook.send_batch_sequential(bodies[0])  # connection set-up outside the timing
    started = time.perf_counter()
    for body in bodies:
        status = hook.send_batch_sequential(body)
        if status != 200:
            raise RuntimeError(f"sequential HttpHook: HTTP {status}")
    return len(bodies) / (time.perf_counter() - started)


def measure_delivery(standin_url: str, lines: list[bytes], requests: int, sequential: int, concurrency: int) -> list[Row]:
    """Delivery rates of the sender, a bare aiohttp client and sequential ``HttpHook.run``.

    :param standin_url: the stand-in's base URL (50 ms latency).
    :param lines: generated records to build bodies from.
    :param requests: requests per concurrent measurement.
    :param sequential: requests of the sequential baseline.
    :param concurrency: requests in flight for both concurrent clients.
    """
    bodies = _bodies(lines, requests)
    url = f"{standin_url}/send-events/{CONFIG_ID}"
    seq = _sequential_rate(standin_url, bodies[:sequential])
    # Alternate the two concurrent clients and keep each one's best, so both see the same noise.
    bare_runs, sender_runs, sender_cpu_runs = [], [], []
    for _ in range(2):
        bare_runs.append(asyncio.run(_bare_aiohttp(url, bodies, concurrency)))
        rate, cpu_rate = _sender_rate(standin_url, bodies, concurrency)
        sender_runs.append(rate)
        sender_cpu_runs.append(cpu_rate)
    bare, ours = max(bare_runs), max(sender_runs)
    return [
        Row(
            f"delivery: BatchSender, {concurrency} in flight, 3-5 ev/req",
            ours,
            "req/s",
            seq,
            ours / seq,
            ">= 2,000 req/s and >= 50x sequential HttpHook.run",
            ours >= 2_000 and ours / seq >= 50,
        ),
        Row(
            "delivery: BatchSender vs bare aiohttp (same in flight)",
            ours,
            "req/s",
            bare,
            ours / bare,
            ">= 0.80x bare aiohttp",
            ours / bare >= 0.8,
        ),
        # The client is CPU-bound: per CPU-second, the figure other processes' load moves least.
        Row("  (info) delivery: BatchSender requests per CPU-second of its process", max(sender_cpu_runs), "req/CPU-s"),
    ]


def sender_rate_recording(lines: list[bytes], requests: int, latency_ms: float, concurrency: int, workdir: Path) -> float:
    """``BatchSender``'s requests/s against a stand-in that writes every request to its record
    file, as the end-to-end run's stand-in does (the delivery rows' stand-in writes nothing):
    on two shared cores the stand-in's own work lengthens its answers, and with a fixed number
    in flight that lowers any client's rate.
    """
    from capi_devtools.standin_fixture import running_standin

    record_file = workdir / "sender-record.jsonl"
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        with running_standin("--latency-ms", str(latency_ms), "--no-keep-in-memory", "--record-file",
                             str(record_file), config_id=CONFIG_ID) as standin:
            return _sender_rate(standin.url, _bodies(lines, requests), concurrency)[0]
    finally:
        record_file.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- throttling


def run_throttle_client(url: str, batches: int, out: str) -> int:
    """Child-process entry: one send shard (``BatchSender``, default settings) against ``url``.

    Writes the shard's counters and the wall-clock time of every acknowledgement, so the parent
    can compare shards over the time they all ran.

    :param url: the stand-in's base URL.
    :param batches: batches of 3 to 5 events to send.
    :param out: where to write the JSON result.
    """
    from liveramp_capi.delivery.sender import BatchSender
    from liveramp_capi.delivery.settings import CapiSettings
    from liveramp_capi.domain.batches import Batch

    if os.environ.get("BENCH_THROTTLE_DEBUG"):
        import logging

        logging.basicConfig(level=logging.DEBUG, format="%(relativeCreated)6.0f %(process)d %(message)s")
    bodies = _bodies(_generated_lines(3_000), batches)
    sender = BatchSender(url, CONFIG_ID, CapiSettings(verify_tls=False, progress_interval_seconds=2))
    acks: list[float] = []

    def on_outcome(batch: Any, outcome: Any) -> None:
        if outcome.acknowledged:
            acks.append(time.time())

    started = time.time()
    stats = sender.deliver_sync((Batch(f"b{i}", 0, _EVENT_IDS[i % 3], b) for i, b in enumerate(bodies)), on_outcome)
    result = {"started": started, "ended": time.time(), "acks": acks, **stats.as_dict()}
    Path(out).write_text(json.dumps(result))
    return 0


def _throttled_shards(rate: float, batches: int, shards: int, latency_ms: float, workdir: Path) -> dict[str, Any]:
    """Run ``shards`` send shards at once, each with ``batches / shards`` batches, against one
    stand-in token bucket of ``rate`` requests/s and burst ``rate / 10``."""
    from capi_devtools.standin_fixture import running_standin

    with running_standin("--latency-ms", str(latency_ms), "--rate", str(rate), "--no-keep-in-memory",
                         config_id=CONFIG_ID) as standin:
        outs = [workdir / f"throttle-{rate:g}-{shards}-{i}.json" for i in range(shards)]
        children = [
            subprocess.Popen([sys.executable, __file__, "--throttle-client", standin.url,
                              "--throttle-batches", str(batches // shards), "--run-dag-out", str(out)])
            for out in outs
        ]
        for child in children:
            if child.wait() != 0:
                raise RuntimeError(f"throttle client failed (exit {child.returncode})")
        server = standin.stats()
    runs = [json.loads(out.read_text()) for out in outs]
    # Shares are compared while every shard was running (the last one alone gets the whole limit).
    start, end = max(r["started"] for r in runs), min(r["ended"] for r in runs)
    span = max(end - start, 1e-9)
    shares = [sum(start <= t <= end for t in r["acks"]) / span for r in runs]
    requests = sum(r["requests"] for r in runs)
    throttled = sum(r["throttled"] for r in runs)
    total_span = max(r["ended"] for r in runs) - min(r["started"] for r in runs)
    return {
        "rate": rate, "shards": shards, "batches": batches,
        "goodput": sum(r["batches_acknowledged"] for r in runs) / total_span,
        "overlap_goodput": sum(shares), "shares": shares, "seconds": total_span,
        "requests": requests, "throttled": throttled, "throttled_share": throttled / max(requests, 1),
        "failed": sum(r["batches_failed"] for r in runs), "server_429": server.get("rate_limited"),
    }


def measure_throttling(rates: list[float], batches: int, latency_ms: float, workdir: Path) -> tuple[list[Row], list[dict]]:
    """Goodput and 429 share of send shards against a token bucket, 1 shard and 2 at once.

    :param rates: the bucket's rates (requests/s); the burst is a tenth of it.
    :param batches: batches in all (a 100,000-event partition cuts about 21,500).
    :param latency_ms: the stand-in's latency.
    :param workdir: where the children write their results.
    """
    rows: list[Row] = []
    details = []
    for rate in rates:
        one = _throttled_shards(rate, batches, 1, latency_ms, workdir)
        two = _throttled_shards(rate, batches, 2, latency_ms, workdir)
        details += [one, two]
        label = f"throttle R={rate:,.0f}/s burst {rate / 10:,.0f}, {batches:,} batches"
        rows += [
            Row(f"{label}: 1 shard, goodput", one["goodput"], "req/s", rate, one["goodput"] / rate,
                ">= 0.9x R, every batch delivered", one["goodput"] >= 0.9 * rate and not one["failed"]),
            Row(f"{label}: 1 shard, share of requests answered 429", 100 * one["throttled_share"], "%",
                target="<= 5%", met=one["throttled_share"] <= 0.05),
            Row(f"{label}: 2 shards at once, together", two["overlap_goodput"], "req/s", rate,
                two["overlap_goodput"] / rate, ">= 0.9x R", two["overlap_goodput"] >= 0.9 * rate and not two["failed"]),
            Row(f"{label}: 2 shards at once, the smaller share", min(two["shares"]), "req/s", rate,
                min(two["shares"]) / rate, ">= 0.35x R", min(two["shares"]) >= 0.35 * rate),
            Row(f"{label}: 2 shards, share of requests answered 429", 100 * two["throttled_share"], "%",
                target="<= 5%", met=two["throttled_share"] <= 0.05),
        ]
    return rows, details


# ---------------------------------------------------------------------------- end to end


def _day_start(partition: str) -> int:
    return int(dt.datetime.fromisoformat(partition).replace(tzinfo=dt.UTC).timestamp())


def _airflow_env(home: Path, root: Path, standin_url: str, concurrency: int, timeout: float = 30) -> dict[str, str]:
    env = os.environ.copy()
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
            # dag.test() in Airflow 3.3.2 crashes on a successful run of a DAG with a deadline alert.
            "CAPI_PARTITION_DEADLINE_MINUTES": "0",
            "AIRFLOW_CONN_LIVERAMP_CAPI_DEFAULT": json.dumps(
                {
                    "conn_type": "liveramp_capi",
                    "host": standin_url,
                    "password": CONFIG_ID,
                    "extra": {"concurrency": concurrency, "timeout_seconds": timeout, "verify_tls": False},
                }
            ),
            "AIRFLOW_CONN_CAPI_STATE_DEFAULT": json.dumps({"conn_type": "sqlite", "host": str(root / "state.db")}),
            "AIRFLOW_VAR_CAPI_LANDING_ROOT": f"file://{root / 'landing'}",
            "AIRFLOW_VAR_CAPI_OUTPUT_ROOT": f"file://{root / 'output'}",
            # Generated event times lie in the partition's day; measure their age from its end.
            "AIRFLOW_VAR_CAPI_MAX_EVENT_AGE_DAYS": str(max(28, int(time.time() - _day_start(PARTITION)) // 86_400 + 2)),
        }
    )
    return env


def _ensure_airflow_db(home: Path, env: dict[str, str]) -> None:
    marker = home / ".migrated"
    if marker.exists():
        return
    home.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    marker.touch()


def run_dag_child(partition: str, out: str, dag_id: str = "tiktok_conversions") -> int:
    """Child-process entry: run ``tiktok_conversions`` with ``dag.test()``, sampling memory per task.

    Under ``dag.test()`` every task runs in this one process, one after another; a thread samples
    the process's RSS every 20 ms and files each sample under the task running at that moment,
    so each task's figure is the peak RSS of the process while it ran (an upper bound of what
    the task would need alone: the interpreter and Airflow are included).

    :param partition: the partition to run.
    :param out: where to write the JSON result.
    :param dag_id: the DAG to run (its file is ``dags/<dag_id>.py``).
    """
    import gc

    import psutil
    from airflow.dag_processing.dagbag import DagBag

    from liveramp_capi.operators.extract import ExtractPartitionOperator
    from liveramp_capi.operators.report import ReportConversionsOperator
    from liveramp_capi.operators.send import SendConversionsOperator
    from liveramp_capi.operators.validate import ValidateConversionsOperator

    current: list[str | None] = [None]
    peaks: dict[str, int] = {}
    seconds: dict[str, float] = {}
    cpu_seconds: dict[str, float] = {}  # the process's CPU time (writer thread included) per task
    # The task's own thread (event loop, planning): the rest of cpu_seconds is other threads'.
    thread_cpu_seconds: dict[str, float] = {}
    # Other threads still alive at the task's end, by name (the ledger writer has ended by then:
    # its share is cpu_seconds minus the task's thread minus these).
    other_threads_cpu: dict[str, dict[str, float]] = {}
    # Time in the cyclic garbage collector per task (a large heap makes every collection slow).
    gc_seconds: dict[str, float] = {}
    gc_started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_started[0] = time.perf_counter()
        elif current[0] is not None:
            gc_seconds[current[0]] = gc_seconds.get(current[0], 0.0) + time.perf_counter() - gc_started[0]

    gc.callbacks.append(on_gc)

    def wrap(cls: Any) -> None:
        original = cls.execute

        def execute(self: Any, context: Any) -> Any:
            index = getattr(context.get("ti"), "map_index", -1)
            label = self.task_id if index is None or index < 0 else f"{self.task_id}[{index}]"
            current[0] = label
            profile_dir = os.environ.get("BENCH_PROFILE_SEND")
            profiler = None
            if profile_dir and self.task_id == "send":
                import cProfile

                profiler = cProfile.Profile()
                profiler.enable()
            threads_started = _threads_cpu()
            started, cpu_started, thread_started = time.perf_counter(), time.process_time(), time.thread_time()
            try:
                return original(self, context)
            finally:
                seconds[label] = time.perf_counter() - started
                cpu_seconds[label] = time.process_time() - cpu_started
                thread_cpu_seconds[label] = time.thread_time() - thread_started
                other_threads_cpu[label] = {
                    name: round(cpu - threads_started.get(name, 0.0), 3)
                    for name, cpu in _threads_cpu().items()
                    if cpu - threads_started.get(name, 0.0) >= 0.01
                }
                if profiler is not None:
                    profiler.disable()
                    profiler.dump_stats(str(Path(profile_dir) / f"{label}.prof"))
                current[0] = None

        cls.execute = execute

    for cls in (ExtractPartitionOperator, ValidateConversionsOperator, SendConversionsOperator, ReportConversionsOperator):
        wrap(cls)

    process = psutil.Process()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            label = current[0]
            if label is not None:
                rss = process.memory_info().rss
                if rss > peaks.get(label, 0):
                    peaks[label] = rss
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    bag = DagBag(dag_folder=str(REPO / "dags" / f"{dag_id}.py"))
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    started = time.perf_counter()
    dag_run = bag.get_dag(dag_id).test(run_conf={"partition": partition})
    elapsed = time.perf_counter() - started
    stop.set()
    sampler.join()
    result = {
        "state": str(dag_run.state),
        "seconds": elapsed,
        "task_seconds": seconds,
        "task_cpu_seconds": cpu_seconds,
        "task_thread_cpu_seconds": thread_cpu_seconds,
        "task_other_threads_cpu_seconds": other_threads_cpu,
        "task_gc_seconds": gc_seconds,
        "task_peak_rss": peaks,
        "process_max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    Path(out).write_text(json.dumps(result))
    return 0


def run_end_to_end(
    workdir: Path, airflow_home: Path, events: int, latency_ms: float, concurrency: int,
    faults: tuple[str, ...] = (), timeout: float = 30, name: str = "e2e",
) -> dict[str, Any]:
    """Generate a partition, run the DAG on it against a fresh stand-in, check every count.

    :param workdir: scratch folder (landing, output, state DB, record file).
    :param airflow_home: a folder for the Airflow metadata DB (migrated when needed).
    :param events: records in the partition.
    :param latency_ms: the stand-in's latency.
    :param concurrency: the connection's ``concurrency`` extra.
    :param faults: extra stand-in flags (``--error-rate 0.2`` ...).
    :param timeout: the connection's ``timeout_seconds``.
    :param name: prefix of the scratch folder.
    :return: timings, memory, counts and the checks.
    """
    from capi_devtools.standin_fixture import running_standin

    root = workdir / f"{name}-{events}"
    if root.exists():
        shutil.rmtree(root)
    folder = root / "landing" / f"dt={PARTITION}"
    counts = write_partition(folder, events, seed=SEED, day_start=_day_start(PARTITION))
    record_file = root / "received.jsonl"
    with running_standin(
        "--latency-ms", str(latency_ms), "--no-keep-in-memory", "--record-file", str(record_file), *faults,
        config_id=CONFIG_ID,
    ) as standin:
        env = _airflow_env(airflow_home, root, standin.url, concurrency, timeout)
        _ensure_airflow_db(airflow_home, env)
        out = root / "run.json"
        log = root / "run.log"
        started = time.perf_counter()
        with log.open("wb") as stream:
            code = subprocess.run(
                [sys.executable, __file__, "--run-dag", PARTITION, "--run-dag-out", str(out)],
                env=env, stdout=stream, stderr=subprocess.STDOUT, check=False,
            ).returncode
        wall = time.perf_counter() - started
        stats = standin.stats()
    if code != 0 or not out.exists():
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the DAG run failed (exit {code}); log tail:\n{tail}")
    run = json.loads(out.read_text())
    summary = json.loads((root / "output" / f"dt={PARTITION}" / "summary.json").read_text())
    received: Counter[tuple[str, str]] = Counter()
    with record_file.open("rb") as stream:
        import orjson

        for line in stream:
            for event in orjson.loads(line)["events"]:
                received[(event["event_type"], event["event_id"])] += 1
    sent_twice = sum(1 for n in received.values() if n > 1)
    checks = {
        "dag_run_success": run["state"] == "success",
        "read == records generated": summary["read"] == counts.records,
        "rejected == broken records": summary["rejected"] == counts.invalid,
        "duplicates == repeated records": summary["duplicates"] == counts.duplicates,
        "valid == delivered_events": summary["valid"] == summary["delivered_events"] == counts.valid_unique,
        "read == valid + rejected + duplicates": summary["read"]
        == summary["valid"] + summary["rejected"] + summary["duplicates"],
        "record file: every valid event once": len(received) == counts.valid_unique and sent_twice == 0,
        "summary checks": all(summary.get("checks", {}).values()),
    }
    return {
        "events": events,
        "counts": asdict(counts),
        "wall_seconds": wall,
        "dag_seconds": run["seconds"],
        "task_seconds": run["task_seconds"],
        "task_cpu_seconds": run["task_cpu_seconds"],
        "task_thread_cpu_seconds": run.get("task_thread_cpu_seconds", {}),
        "task_other_threads_cpu_seconds": run.get("task_other_threads_cpu_seconds", {}),
        "task_gc_seconds": run["task_gc_seconds"],
        "task_peak_rss": run["task_peak_rss"],
        "process_max_rss": run["process_max_rss"],
        "summary": {k: summary.get(k) for k in ("read", "valid", "rejected", "duplicates", "sessions", "batches",
                                                  "delivered_events", "failed_events", "status", "requests",
                                                  "retries")},
        "standin_requests": stats.get("requests"),
        "checks": checks,
    }


def proc_stat_cpu(path: str) -> float:
    """User + system CPU seconds of a process or thread, from its ``/proc/.../stat`` file (Linux).

    :raises OSError: when the process or thread has gone.
    """
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _threads_cpu() -> dict[str, float]:
    """CPU seconds of each live thread of this process but the calling one, by thread name (Linux /proc)."""
    own = threading.get_native_id()
    cpu: dict[str, float] = {}
    for thread in threading.enumerate():
        tid = thread.native_id
        if tid is None or tid == own:
            continue
        try:
            cpu[f"{thread.name}#{tid}"] = proc_stat_cpu(f"/proc/self/task/{tid}/stat")
        except OSError:
            continue
    return cpu


def _task_kind(label: str) -> str:
    return label.split("[", 1)[0]


def send_stage_row(run: dict[str, Any], sender_rate: float) -> Row:
    """The DAG's send tasks (start-up, reading, planning, ledger and requests: each task's whole
    ``execute``) in requests per second of their summed wall time, against ``BatchSender`` alone
    on ready-made bodies in the same run.

    :param run: :func:`run_end_to_end`'s result.
    :param sender_rate: the delivery row's ``BatchSender`` requests/s.
    """
    per = [v for k, v in run["task_seconds"].items() if _task_kind(k) == "send"]
    rate = (run["summary"].get("requests") or 0) / max(sum(per), 1e-9)
    return Row(
        f"send stage vs BatchSender bare: {len(per)} send task(s), {run['events']:,} records",
        rate, "req/s", sender_rate, rate / sender_rate, ">= 0.80x BatchSender bare", rate / sender_rate >= 0.8,
    )


def send_stage_cpu_row(run: dict[str, Any], sender_cpu_rate: float) -> Row:
    """The same per CPU-second of the send tasks' process (writer thread included) against
    ``BatchSender``'s per CPU-second: on a shared machine, other processes' load moves wall-clock
    rates by a factor of two between tasks of one run, CPU seconds much less.

    :param run: :func:`run_end_to_end`'s result.
    :param sender_cpu_rate: the delivery rows' ``BatchSender`` requests per CPU-second.
    """
    cpu = sum(v for k, v in run["task_cpu_seconds"].items() if _task_kind(k) == "send")
    rate = (run["summary"].get("requests") or 0) / max(cpu, 1e-9)
    return Row("  (info) the same per CPU-second (send tasks vs BatchSender)", rate, "req/CPU-s",
               sender_cpu_rate, rate / max(sender_cpu_rate, 1e-9))


def end_to_end_rows(big: dict[str, Any], small: dict[str, Any]) -> list[Row]:
    """Rows for the end-to-end run and the memory figures.

    :param big: :func:`run_end_to_end` at the full size.
    :param small: the same at a tenth of it.
    """
    rows = [
        Row(
            f"end to end: {big['events']:,} records, {big['summary']['sessions']:,} sessions (DAG run)",
            big["dag_seconds"],
            "s",
            target="< 300 s, every event accounted for",
            met=big["dag_seconds"] < 300 and all(big["checks"].values()),
        ),
        Row(
            "  counts add up (summary.json + stand-in record file)",
            sum(big["checks"].values()),
            "checks",
            ratio=None,
            target=f"{len(big['checks'])} of {len(big['checks'])}",
            met=all(big["checks"].values()),
        ),
    ]
    for kind in ("validate", "send", "report"):
        per = [v for k, v in big["task_seconds"].items() if _task_kind(k) == kind]
        if per:
            rate = big["events"] / sum(per) if kind == "validate" else None
            rows.append(
                Row(f"  (info) {kind}: {len(per)} task(s), total", sum(per), "s", baseline=None,
                    ratio=None, target=f"{rate:,.0f} records/s" if rate else "")
            )
    mib = 1024 * 1024
    for kind in ("extract", "validate", "send", "report"):
        peak_big = max((v for k, v in big["task_peak_rss"].items() if _task_kind(k) == kind), default=0)
        peak_small = max((v for k, v in small["task_peak_rss"].items() if _task_kind(k) == kind), default=0)
        if not peak_big or not peak_small:
            continue
        growth = peak_big / peak_small
        rows.append(
            Row(
                f"memory: {kind} peak RSS, {big['events']:,} vs {small['events']:,} records",
                peak_big / mib,
                "MiB",
                peak_small / mib,
                growth,
                "< 1024 MiB, growth <= 1.5x",
                peak_big < 1024 * mib and growth <= 1.5,
            )
        )
    return rows


#: The faults mix of issue 10: 20% 5xx, 10% 429 + Retry-After 1 s, 2% dropped connections, 0.5%
#: stalls past the (default, 10 s) request timeout.
FAULTS_MIX = ("--error-rate", "0.2", "--throttle-rate", "0.1", "--retry-after-seconds", "1",
              "--drop-rate", "0.02", "--stall-rate", "0.005", "--stall-seconds", "30", "--seed", "10")


def measure_faults_mix(workdir: Path, airflow_home: Path, events: int, latency_ms: float) -> tuple[list[Row], dict]:
    """The same partition through the DAG twice, clean and under the faults mix (default settings:
    64 in flight, 10 s timeout); exactly once, no Airflow task retry, wall time against clean.

    :param workdir: scratch folder.
    :param airflow_home: the Airflow home.
    :param events: records in the partition.
    :param latency_ms: the stand-in's latency.
    """
    clean = run_end_to_end(workdir, airflow_home, events, latency_ms, 64, timeout=10, name="clean")
    faulty = run_end_to_end(workdir, airflow_home, events, latency_ms, 64, FAULTS_MIX, timeout=10, name="faults")
    # dag.test() runs a task again in the same process after its retry delay: a label seen twice
    # is impossible to tell apart here, but a failed batch is what would have caused the retry.
    no_retry = faulty["summary"]["failed_events"] == 0 and all(faulty["checks"].values())
    ratio = faulty["dag_seconds"] / clean["dag_seconds"]
    send = sum(v for k, v in faulty["task_seconds"].items() if _task_kind(k) == "send")
    send_clean = sum(v for k, v in clean["task_seconds"].items() if _task_kind(k) == "send")
    rows = [
        Row(f"faults mix, {events:,} records: DAG wall time vs the same partition clean", faulty["dag_seconds"], "s",
            clean["dag_seconds"], ratio, "<= 2x clean, every event exactly once, no batch failed",
            ratio <= 2 and no_retry),
        Row("  (info) send tasks under the faults mix vs clean", send, "s", send_clean, send / max(send_clean, 1e-9)),
        Row("  (info) requests / retries under the faults mix", faulty["summary"].get("requests") or 0, "req",
            target=f"{faulty['summary'].get('retries')} retries"),
    ]
    return rows, {"clean": clean, "faults": faulty}


# ---------------------------------------------------------------------------- main


def _generated_lines(count: int) -> list[bytes]:
    return [line for line, _ in iter_partition_lines(count, seed=SEED, day_start=_day_start(PARTITION))]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table.

    :param argv: command-line arguments (default ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=None, help="records of the end-to-end partition (default 1,000,000; --quick: 3,000)")
    parser.add_argument("--quick", action="store_true", help="small sizes everywhere (a smoke run, not a measurement)")
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench", help="scratch folder (default .bench/)")
    parser.add_argument("--airflow-home", type=Path, default=None, help="Airflow home (default WORKDIR/airflow)")
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and details as JSON")
    parser.add_argument("--skip-end-to-end", action="store_true", help="only the validation and delivery figures")
    parser.add_argument("--run-dag", help=argparse.SUPPRESS)
    parser.add_argument("--run-dag-out", help=argparse.SUPPRESS)
    parser.add_argument("--throttle-client", help=argparse.SUPPRESS)
    parser.add_argument("--throttle-batches", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--throttle-rates", default="400,2000", help="token-bucket rates to measure (requests/s)")
    parser.add_argument("--throttle-only", action="store_true", help="only the throttling figures")
    parser.add_argument("--faults-only", action="store_true", help="only the faults mix against the clean run")
    parser.add_argument("--faults-events", type=int, default=100_000, help="records of the faults-mix partition")
    parser.add_argument("--run-dag-id", default="tiktok_conversions", help=argparse.SUPPRESS)
    parser.add_argument("--send-only", action="store_true",
                        help="only the delivery figures and the end-to-end send stage against them (no memory rows)")
    parser.add_argument("--profile-send", type=Path, default=None,
                        help="write a cProfile file per send task of the end-to-end run into this folder")
    args = parser.parse_args(argv)
    if args.run_dag:
        return run_dag_child(args.run_dag, args.run_dag_out, args.run_dag_id)
    if args.throttle_client:
        return run_throttle_client(args.throttle_client, args.throttle_batches, args.run_dag_out)

    events = args.events or (3_000 if args.quick else 1_000_000)
    validation_records = min(events, 200_000) if not args.quick else min(events, 5_000)
    baseline_records = 500 if args.quick else 3_000
    requests = 600 if args.quick else 20_000
    sequential = 10 if args.quick else 60
    args.workdir.mkdir(parents=True, exist_ok=True)
    airflow_home = args.airflow_home or (args.workdir / "airflow")

    print(f"bench: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, seed {SEED}; "
          f"end to end on {events:,} records; stand-in latency {args.latency_ms:g} ms", flush=True)
    if args.profile_send:
        args.profile_send.mkdir(parents=True, exist_ok=True)
        os.environ["BENCH_PROFILE_SEND"] = str(args.profile_send.resolve())
    rows: list[Row] = []
    details: dict[str, Any] = {}
    sender_rate = sender_cpu_rate = recording_rate = 0.0
    if not args.throttle_only and not args.faults_only:
        lines = _generated_lines(max(validation_records, requests * 5 // 3))
        if not args.send_only:
            print("1/6 validation ...", flush=True)
            rows += measure_validation(lines[:validation_records], baseline_records)

        print("2/6 delivery ...", flush=True)
        from capi_devtools.standin_fixture import running_standin

        with running_standin("--latency-ms", str(args.latency_ms), "--no-keep-in-memory", config_id=CONFIG_ID) as standin:
            delivery_rows = measure_delivery(standin.url, lines, requests, sequential, args.concurrency)
        rows += delivery_rows
        sender_rate, sender_cpu_rate = delivery_rows[0].value, delivery_rows[2].value
        if args.send_only:
            recording_rate = sender_rate_recording(lines, requests, args.latency_ms, args.concurrency, args.workdir)
            rows.append(Row("  (info) delivery: BatchSender, stand-in writing its record file (as end to end)",
                            recording_rate, "req/s"))
        del lines

    if args.faults_only:
        print(f"4/6 faults mix vs clean, {args.faults_events:,} records ...", flush=True)
        rows, faults = measure_faults_mix(args.workdir, airflow_home, args.faults_events, args.latency_ms)
        print()
        print_table(rows)
        if args.json:
            args.json.write_text(json.dumps({"rows": [asdict(r) for r in rows], "faults_mix": faults}, indent=1))
        return 0 if all(r.met is not False for r in rows) else 1

    if args.send_only:
        print(f"5/6 end to end, {events:,} records ...", flush=True)
        big = run_end_to_end(args.workdir, airflow_home, events, args.latency_ms, args.concurrency)
        rows += [send_stage_row(big, sender_rate), send_stage_cpu_row(big, sender_cpu_rate)]
        recording = send_stage_row(big, recording_rate)
        rows.append(Row("  (info) the same vs BatchSender, stand-in writing its record file", recording.value,
                        "req/s", recording_rate, recording.ratio))
        print()
        print_table(rows)
        if args.json:
            args.json.write_text(json.dumps({"rows": [asdict(r) for r in rows], "end_to_end": big}, indent=1))
        return 0 if all(r.met is not False for r in rows) else 1

    rates = [float(r) for r in args.throttle_rates.split(",") if r][: 1 if args.quick else None]
    batches = args.throttle_batches or (1_000 if args.quick else 21_474)
    print(f"3/6 throttling: token bucket at {', '.join(f'{r:g}' for r in rates)} requests/s, {batches:,} batches, "
          "20 ms latency, 1 and 2 shards ...", flush=True)
    throttle_rows, throttle_details = measure_throttling(rates, batches, 20.0, args.workdir)
    rows += throttle_rows
    details["throttling"] = throttle_details

    if not args.skip_end_to_end and not args.throttle_only:
        if not args.quick:
            print(f"4/6 faults mix vs clean, {args.faults_events:,} records ...", flush=True)
            faults_rows, details["faults_mix"] = measure_faults_mix(
                args.workdir, airflow_home, args.faults_events, args.latency_ms
            )
            rows += faults_rows
        print(f"5/6 end to end, {events:,} records ...", flush=True)
        big = run_end_to_end(args.workdir, airflow_home, events, args.latency_ms, args.concurrency)
        small_events = max(events // 10, 100)
        print(f"6/6 end to end, {small_events:,} records (memory growth) ...", flush=True)
        small = run_end_to_end(args.workdir, airflow_home, small_events, args.latency_ms, args.concurrency)
        rows += end_to_end_rows(big, small)
        rows += [send_stage_row(big, sender_rate), send_stage_cpu_row(big, sender_cpu_rate)]
        details.update({"end_to_end": big, "end_to_end_small": small})
        granularity_events = 2_000 if not args.quick else min(events, 500)
        print(f"6b/6 hourly vs daily partition, {granularity_events:,} records ...", flush=True)
        from capi_devtools.bench_granularity import granularity_rows

        hourly_rows, details["granularity"] = granularity_rows(
            Row, args.workdir, airflow_home, events=granularity_events, latency_ms=args.latency_ms,
            concurrency=args.concurrency,
        )
        rows += hourly_rows

    print("7 console reads (a year of partitions) ...", flush=True)
    from capi_devtools.bench_console import bench_rows

    rows += [Row(**row) for row in bench_rows(args.workdir / "console", quick=args.quick)]
    rows += envelope_rows(Row, quick=args.quick)
    if not args.quick:
        # A smoke-size partition fits in one storage block: nothing to learn about streaming.
        print("s3: validate's memory on object storage (moto server on loopback) ...", flush=True)
        from capi_devtools.bench_object_storage import bench_rows as object_storage_rows

        rows += [Row(**row) for row in object_storage_rows(args.workdir / "s3")]
    print()
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"rows": [asdict(r) for r in rows], **details}, indent=1))
    return 0 if all(r.met is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
