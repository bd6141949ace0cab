"""A dry run: everything a real run decides, nothing it sends or records.

A dry run validates, resolves envelopes, groups sessions and cuts batches with the very code of
a real run, then writes the plan instead of sending it. It must not change the state database,
yet a real run's send step resolves envelopes against a store that its validate step has just
updated; so the dry run keeps the partition's newest envelope per user key in its work folder
(:func:`newest_envelopes`) and lays it over the store's rows exactly as the store's upsert would
(:func:`overlay_envelopes`). Its plan therefore names the batches, and their event counts, that a
real run started next would send.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from liveramp_capi.domain.envelopes import EnvelopeRecord, StoredEnvelope
from liveramp_capi.domain.summary import RunResults

__all__ = ["build_dry_run_summary", "newest_envelopes", "overlay_envelopes", "plan_line"]

#: Per-shard counters a dry run's send step reports and its summary adds up.
PLAN_COUNTERS: tuple[str, ...] = (
    "events",
    "sessions",
    "planned_batches",
    "planned_events",
    "previously_delivered_events",
    "envelope_expired_events",
    "envelope_replaced_events",
    "envelope_held_earlier_events",
)


def newest_envelopes(
    records: Iterable[EnvelopeRecord], best: dict[str, EnvelopeRecord] | None = None
) -> dict[str, EnvelopeRecord]:
    """The record the store's upsert would keep for each user key (newest ``issued_at``, then the larger envelope).

    :param records: records of accepted events.
    :param best: the result so far, updated in place (records arrive in groups).
    """
    best = {} if best is None else best
    for record in records:
        current = best.get(record.user_key)
        if current is None or (record.issued_at, record.envelope) > (current.issued_at, current.envelope):
            best[record.user_key] = record
    return best


def overlay_line(record: EnvelopeRecord) -> bytes:
    """One line of the work folder's envelope overlay (it holds envelopes: work folder only, never logged)."""
    return orjson.dumps(
        {"user_key": record.user_key, "envelope": record.envelope, "issued_at": record.issued_at,
         "expires_at": record.expires_at}
    )


def overlay_envelopes(
    stored: Mapping[str, StoredEnvelope], overlay: Iterable[bytes], user_keys: set[str], now: int
) -> dict[str, StoredEnvelope]:
    """The unexpired envelope of each user key as the store would hold it after the run's upserts.

    :param stored: the store's rows of ``user_keys``, expired ones included (an expired newer row
        still wins the upsert, and then resolves to nothing).
    :param overlay: lines of :func:`overlay_line`.
    :param user_keys: the keys the caller resolves (other lines are skipped unparsed as far as possible).
    :param now: the send time.
    """
    rows = dict(stored)
    for line in overlay:
        if not line.strip():
            continue
        item = orjson.loads(line)
        key = item["user_key"]
        if key not in user_keys:
            continue
        current = rows.get(key)
        if current is None or (item["issued_at"], item["envelope"]) > (current.issued_at, current.envelope):
            rows[key] = StoredEnvelope(
                user_key=key,
                envelope=item["envelope"],
                issued_at=int(item["issued_at"]),
                expires_at=int(item["expires_at"]),
                consent=None,
                client_ip=None,
                state="planned",
            )
    return {key: row for key, row in rows.items() if row.expires_at > now}


def plan_line(shard: int, batch_id: str, event_count: int) -> bytes:
    """One line of ``dry_run/plan.jsonl``: a batch a real run would send (no identifier, no event)."""
    return orjson.dumps({"shard": shard, "batch_id": batch_id, "events": event_count})


def build_dry_run_summary(results: RunResults) -> dict[str, Any]:
    """What a dry run found: the partition's counts and the plan's batches and events, per shard.

    ``status`` is ``planned`` when every step ran, ``incomplete`` when a step did not,
    ``rejected_ratio_exceeded`` when a real run would stop at validation, ``not_processed`` when
    nothing was read.
    """
    partition, validation, shard_results = results.partition, results.validation, results.shard_results
    unfinished = dict(sorted(results.unfinished_tasks.items()))
    summary: dict[str, Any] = {"partition": partition, "run_id": results.run_id, "dry_run": True, "unfinished_tasks": unfinished}
    if validation is None:
        summary.update({"status": "not_processed", "read": None, "planned_events": 0})
        return summary
    totals = dict.fromkeys(PLAN_COUNTERS, 0)
    by_shard: dict[str, dict[str, int]] = {}
    for result in sorted(shard_results, key=lambda r: int(r["shard"])):
        for name in PLAN_COUNTERS:
            totals[name] += int(result.get(name, 0))
        by_shard[str(int(result["shard"]))] = {
            "batches": int(result.get("planned_batches", 0)), "events": int(result.get("planned_events", 0))
        }
    planned_shards = [int(i) for i in validation.get("shards", [])]
    missing = sorted(set(planned_shards) - {int(s) for s in by_shard})
    if validation.get("rejected_ratio_exceeded"):
        status = "rejected_ratio_exceeded"
    elif unfinished or missing:
        status = "incomplete"
    else:
        status = "planned"
    valid = int(validation["valid"])
    summary.update(
        {
            "status": status,
            "files": validation.get("files", 0),
            "read": int(validation["read"]),
            "valid": valid,
            "rejected": int(validation["rejected"]),
            "rejected_by_reason": dict(sorted(validation.get("rejected_by_code", {}).items())),
            "duplicates": int(validation["duplicates"]),
            **totals,
            "by_shard": by_shard,
            "shards": {"planned": len(planned_shards), "reported": len(by_shard), "missing": missing},
        }
    )
    accounted = totals["planned_events"] + totals["previously_delivered_events"] + totals["envelope_expired_events"]
    summary["checks"] = {
        "read_equals_valid_rejected_duplicates": summary["read"] == valid + summary["rejected"] + summary["duplicates"],
        "valid_equals_planned_delivered_expired": not missing and valid == accounted,
    }
    return summary
