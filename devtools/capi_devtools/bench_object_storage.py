"""Memory of the validate step on ``s3://``: the peak RSS stays flat as the partition grows.

Starts the S3-compatible test server (moto, ``s3_fixture.py``) on loopback, uploads a
gzip JSONL partition (``bench_data.py``, seeded) of N records and one of N/10, and runs the
real extract and validate steps on each in a fresh child process (landing and output on S3,
through ObjectStoragePath and an Airflow connection; SQLite state database). Each child reports
its peak RSS: the growth from the small partition to the big one, against the growth of the
input, is the figure.

Usage: ``python -m capi_devtools.bench_object_storage [--events 300000]`` (``make bench`` adds its rows).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from capi_devtools import REPO

PARTITION = "2026-11-20"
LANDING, OUTPUT = "capi-landing", "capi-output"
_SEED = 20261120


class _Unclaimed:
    """No partition claim: the bench runs alone."""

    def ensure_held(self) -> None:
        return None


def run_validate_child(spec_path: str) -> int:
    """Child process: extract and validate one S3 partition, print the counts and the peak RSS."""
    import logging

    logging.disable(logging.INFO)
    spec = json.loads(Path(spec_path).read_text())
    os.environ[f"AIRFLOW_CONN_{spec['conn_id'].upper()}"] = spec["connection"]
    os.environ["AIRFLOW_CONN_CAPI_STATE_DEFAULT"] = json.dumps({"conn_type": "sqlite", "host": spec["state_db"]})
    from liveramp_capi.hooks.state import CapiStateHook
    from liveramp_capi.operators.extract import ExtractPartitionOperator
    from liveramp_capi.pipeline.config import ValidateConfig
    from liveramp_capi.pipeline.validate import validate_partition
    from liveramp_capi.storage import PartitionStorage

    roots = {"partition": PARTITION, "landing_root": spec["landing_root"], "output_root": spec["output_root"]}
    run_id = f"bench__{spec['events']}"
    ExtractPartitionOperator(task_id="extract", **roots).execute({"run_id": run_id})
    # One shard at every size: the shard count is its own knob (capi_events_per_shard), and each
    # open shard holds one write block; what is measured is the growth with the files alone.
    config = ValidateConfig.parse({"max_invalid_ratio": 1.0, "events_per_shard": 10**9, "reference_time": spec["now"]})
    storage = PartitionStorage(spec["landing_root"], spec["output_root"], PARTITION, run_id)
    store = CapiStateHook().get_envelope_store()
    # The step's own streaming body (the claim and Airflow's context are not what is measured).
    shards = validate_partition(config, storage, store, _Unclaimed()).shards
    validation = storage.read_json(storage.layout.validation)
    print(json.dumps({
        "events": spec["events"],
        "valid": validation["valid"],
        "shards": len(shards),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))
    return 0


def measure(sizes: list[int], workdir: Path, *, storage: str = "s3") -> list[dict[str, Any]]:
    """Peak RSS of validate on a partition of each size in ``sizes``, each in its own child.

    :param storage: ``s3`` (the moto server) or ``file`` (the same partition on local disk, the
        baseline: what validate itself holds, whatever the storage).
    :returns: one dict per size: events, input_bytes (gzip), valid, shards, peak_rss.
    """
    from capi_devtools.bench_data import write_partition
    from capi_devtools.s3_fixture import running_s3

    day_start = int(dt.datetime.fromisoformat(PARTITION).replace(tzinfo=dt.UTC).timestamp())
    results = []
    with running_s3() as s3:
        s3.create_bucket(LANDING)
        s3.create_bucket(OUTPUT)
        for events in sizes:
            folder = workdir / f"partition-{events}"
            # One file: bigger than a block, so a reader that held whole files would show.
            counts = write_partition(folder, events, seed=_SEED, day_start=day_start, files=1)
            (folder / "_SUCCESS").write_bytes(b"")
            prefix = f"feeds-{events}"
            input_bytes = sum(p.stat().st_size for p in folder.iterdir())
            if storage == "s3":
                s3.upload_folder(folder, LANDING, f"{prefix}/dt={PARTITION}")
                landing_root = f"s3://{s3.conn_id}@{LANDING}/{prefix}"
                output_root = f"s3://{s3.conn_id}@{OUTPUT}/{prefix}"
            else:
                landing_root, output_root = f"file://{workdir}", f"file://{workdir}/output-{events}"
                folder.rename(workdir / f"dt={PARTITION}")
            spec = {
                "events": events,
                "conn_id": s3.conn_id,
                "connection": s3.connection_json(),
                "landing_root": landing_root,
                "output_root": output_root,
                "state_db": str(workdir / f"state-{events}.db"),
                "now": day_start + 86_400 + 3_600,
            }
            spec_path = workdir / f"spec-{events}.json"
            spec_path.write_text(json.dumps(spec))
            done = subprocess.run(
                [sys.executable, __file__, "--child", str(spec_path)],
                capture_output=True, text=True, timeout=1800, check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"validate child failed: {done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result["input_bytes"] = input_bytes
            result["expected_valid"] = counts.valid_unique
            results.append(result)
            if storage == "file":
                (workdir / f"dt={PARTITION}").rename(folder)
    return results


def bench_rows(workdir: Path, *, quick: bool = False, events: int | None = None) -> list[dict[str, Any]]:
    """Rows for ``bench.py``: validate's peak RSS on S3 at N and N/10 records."""
    big_events = events or (20_000 if quick else 300_000)
    workdir.mkdir(parents=True, exist_ok=True)
    sizes = [max(big_events // 10, 100), big_events]
    with tempfile.TemporaryDirectory(dir=workdir) as scratch:
        small, big = measure(sizes, Path(scratch) / "s3")
        local_small, local_big = measure(sizes, Path(scratch) / "file", storage="file")
    mib = 2**20
    s3_growth = (big["peak_rss"] - small["peak_rss"]) / mib
    local_growth = (local_big["peak_rss"] - local_small["peak_rss"]) / mib
    # Object storage adds bounded buffers, whatever the files' size: the read-ahead block of the
    # input being read and the write block of each open output (the one shard, rejected.jsonl).
    # Holding a whole file instead would add the file: 22 MiB of gzip input at 300,000 records,
    # about 180 MiB of shard output.
    from liveramp_capi.storage import OBJECT_BLOCK_BYTES

    allowance = 3 * OBJECT_BLOCK_BYTES / mib
    return [
        {
            "figure": f"s3: validate peak RSS, {big['events']:,} records ({big['input_bytes'] / mib:.1f} MiB gzip on S3)",
            "value": big["peak_rss"] / mib, "unit": "MiB",
            "baseline": small["peak_rss"] / mib,
            "ratio": big["peak_rss"] / small["peak_rss"],
            "target": f"informational: {small['events']:,} records as baseline",
            "met": None,
        },
        {
            "figure": f"s3: validate RSS growth {small['events']:,} -> {big['events']:,} records, vs file://",
            "value": s3_growth, "unit": "MiB", "baseline": local_growth,
            "ratio": s3_growth / local_growth if local_growth > 0 else None,
            "target": f"at most file:// growth + {allowance:g} MiB (3 storage blocks)",
            "met": s3_growth - local_growth <= allowance,
        },
        {
            "figure": "s3: every valid record of the big partition sharded",
            "value": big["valid"], "unit": "events", "baseline": big["expected_valid"],
            "ratio": big["valid"] / max(big["expected_valid"], 1), "target": "equal",
            "met": big["valid"] == big["expected_valid"],
        },
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench" / "s3")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return run_validate_child(args.child)
    for row in bench_rows(args.workdir, events=args.events):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
