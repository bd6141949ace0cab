"""The delivery console's reads on a year of history: `make bench` step 5 (also runnable alone).

Builds, in a scratch folder, a SQLite state database with a year of partitions in the delivery
ledger (``--ledger-rows`` rows, 1% of batches failed) and an envelope store (``--envelopes``
rows), and 365 ``summary.json`` files; then times what the Conversions page and the envelope
health page read, against the unpaged way (every partition's ledger aggregate and every summary
at once) measured in the same run.

Usage: ``python -m capi_devtools.bench_console [--ledger-rows 2000000] [--envelopes 1000000]
[--big-partition-rows 1000000] [--quick]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import shutil
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from capi_devtools import REPO

PAGE = 25
DAYS = 365


def _best_ms(func: Callable[[], Any], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        func()
        times.append((time.perf_counter() - started) * 1000)
    return round(min(times), 2) if repeat < 3 else round(statistics.median(times), 2)


BIG_PARTITION = "2025-06-01"


def build(
    workdir: Path, ledger_rows: int, envelopes: int, big_partition_rows: int, seed: int = 11
) -> tuple[str, Path, list[str]]:
    """Write the state database and the summaries; return (state URL, output folder, partitions)."""
    from liveramp_capi.state.database import make_engine
    from liveramp_capi.state.envelope_store import EnvelopeStore
    from liveramp_capi.state.ledger import DeliveryLedger

    if workdir.exists():
        shutil.rmtree(workdir)
    output = workdir / "output"
    output.mkdir(parents=True)
    db = workdir / "state.db"
    url = f"sqlite:///{db}"
    engine = make_engine(url)
    DeliveryLedger(engine).ensure_schema()
    EnvelopeStore(engine).ensure_schema()
    engine.dispose()

    rng = random.Random(seed)
    end = dt.date(2026, 11, 30)
    partitions = [(end - dt.timedelta(days=n)).isoformat() for n in range(DAYS)]
    per_partition = max(1, ledger_rows // DAYS)
    now = "2026-12-01 00:00:00.000000"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        for partition in partitions:
            rows = []
            for n in range(per_partition):
                failed = rng.random() < 0.01
                rows.append((
                    partition, f"{n:032x}", rng.getrandbits(62), 3, "[]", "failed" if failed else "acknowledged",
                    1 + (rng.random() < 0.05), 400 if failed else None, "HTTP 400" if failed else None,
                    "bench", now, now, None if failed else now,
                ))
            conn.executemany("INSERT INTO capi_delivery_ledger VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
            if partition == partitions[-1]:
                # One very large partition (a sales day): its detail reads all its ledger rows.
                conn.executemany(
                    "INSERT INTO capi_delivery_ledger VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    ((BIG_PARTITION, f"{n:032x}", n, 50, "[]", "acknowledged", 1, None, None, "bench", now, now, now)
                     for n in range(big_partition_rows)),
                )
            (output / f"dt={partition}").mkdir()
            (output / f"dt={partition}" / "summary.json").write_text(json.dumps({
                "partition": partition, "status": "complete", "run_id": f"scheduled__{partition}",
                "read": per_partition * 3 + 40, "valid": per_partition * 3, "rejected": 30, "duplicates": 10,
                "rejected_by_reason": {"schema": 20, "invalid_currency": 10},
                "delivered_events": per_partition * 3, "failed_events": 0, "envelope_expired_events": 0,
                "requests": per_partition, "retries": per_partition // 20,
            }, indent=2))
        base = 1_764_547_200
        conn.executemany(
            "INSERT INTO capi_envelope_store (user_key, user_key_hash, envelope, issued_at, expires_at, state, "
            "refresh_failures, updated_at) VALUES (?,?,?,?,?,?,0,?)",
            (
                (f"user-{n}", rng.getrandbits(62), "x" * 40, base - (age := rng.randrange(0, 40 * 86400)),
                 base - age + (15 if n % 7 == 0 else 30) * 86400, "active" if n % 9 else "consent_missing", base)
                for n in range(envelopes)
            ),
        )
        conn.execute("ANALYZE")
    return url, output, partitions


def measure(workdir: Path, ledger_rows: int, envelopes: int, big_partition_rows: int) -> list[dict[str, Any]]:
    """Time the console's reads; each figure with its unpaged baseline from the same run."""
    import sqlalchemy as sa
    from airflow.sdk import ObjectStoragePath

    from liveramp_capi.console import reads
    from liveramp_capi.console.summaries import OutputRoot
    from liveramp_capi.domain.consent import DEFAULT_REFRESH_REMAINING_SHARE
    from liveramp_capi.state.database import make_engine
    from liveramp_capi.state.ledger import ledger_table

    url, output, partitions = build(workdir, ledger_rows, envelopes, big_partition_rows)
    engine = make_engine(url)
    root = OutputRoot(f"file://{output}")
    page = partitions[:PAGE]

    def paged() -> None:
        listed = root.partitions()[:PAGE]
        reads.ledger_counts(engine, listed)
        for partition in listed:
            root.summary(partition)

    def unpaged() -> None:
        table = ledger_table
        with engine.connect() as connection:
            connection.execute(
                sa.select(table.c.partition, table.c.state, sa.func.count(), sa.func.sum(table.c.event_count))
                .group_by(table.c.partition, table.c.state)
            ).all()
        for partition in partitions:
            json.loads((ObjectStoragePath(f"file://{output}") / f"dt={partition}" / "summary.json").read_text())

    paged()  # warm the page cache (the summary cache is keyed by file size and time)
    page_ms, unpaged_ms = _best_ms(paged), _best_ms(unpaged, repeat=3)
    detail_ms = _best_ms(lambda: (reads.ledger_counts(engine, [page[0]]), reads.failed_batches(engine, page[0])))
    big_ms = _best_ms(lambda: reads.ledger_counts(engine, [BIG_PARTITION]), repeat=3)
    health_ms = _best_ms(lambda: reads.envelope_health(engine, now=1_764_547_200, remaining_share=DEFAULT_REFRESH_REMAINING_SHARE), repeat=3)
    rows_per_partition = ledger_rows // DAYS
    ratio = page_ms / unpaged_ms
    return [
        {"figure": f"console: partitions page ({PAGE} of {DAYS} partitions, {ledger_rows:,} ledger rows) "
                   "vs every partition's ledger aggregate + every summary",
         "value": page_ms, "unit": "ms", "baseline": unpaged_ms, "ratio": ratio,
         "target": "<= 0.25 of unpaged", "met": ratio <= 0.25},
        {"figure": f"console: partition detail ({rows_per_partition:,} ledger rows, failed batches page)",
         "value": detail_ms, "unit": "ms"},
        {"figure": f"console: partition detail, largest partition ({big_partition_rows:,} ledger rows)",
         "value": big_ms, "unit": "ms"},
        {"figure": f"console: envelope health ({envelopes:,} envelopes, one grouped scan)",
         "value": health_ms, "unit": "ms"},
    ]


def bench_rows(workdir: Path, *, quick: bool) -> list[dict[str, Any]]:
    """The rows ``bench.py`` adds to its table (small sizes with ``quick``)."""
    if quick:
        return measure(workdir, 36_500, 20_000, 20_000)
    return measure(workdir, 2_000_000, 1_000_000, 1_000_000)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ledger-rows", type=int, default=2_000_000)
    parser.add_argument("--envelopes", type=int, default=1_000_000)
    parser.add_argument("--big-partition-rows", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench" / "console")
    args = parser.parse_args(argv)
    if args.quick:
        args.ledger_rows, args.envelopes, args.big_partition_rows = 36_500, 20_000, 20_000
    for row in measure(args.workdir, args.ledger_rows, args.envelopes, args.big_partition_rows):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
