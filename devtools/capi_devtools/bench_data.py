"""Deterministic synthetic conversion partitions for ``bench.py``.

Everything is derived from one seed, so two runs of the benchmark (or of its test) read the
same bytes. The events look like the seed's: web events with ``custom_data`` and pipeline-only
fields, app events with device ids and ``app_data``; users have 1-5 events in a session
(3.35 on average, so 1,000,000 events make about 300,000 sessions). A small, fixed share of
records is broken on purpose (schema violations, malformed lines) and a few events are repeated,
so "every event accounted for" checks all three outcomes.
"""

from __future__ import annotations

import gzip
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

#: Events per session and their weights: mean 3.35.
_SESSION_SIZES = (1, 2, 3, 4, 5)
_SESSION_WEIGHTS = (0.10, 0.15, 0.25, 0.30, 0.20)
_WEB_TYPES = ("ViewContent", "AddToCart", "InitiateCheckout", "AddPaymentInfo", "CompletePayment", "Purchase")
_APP_TYPES = ("InstallApp", "LaunchAPP", "ViewContent", "AddToCart", "Checkout", "Purchase")
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
#: One record in INVALID_EVERY is broken, one valid event in DUPLICATE_EVERY is written twice.
INVALID_EVERY = 500
DUPLICATE_EVERY = 1000


@dataclass(slots=True)
class PartitionCounts:
    """What a generated partition holds.

    :param records: non-blank lines written.
    :param valid_unique: distinct valid events (what must be delivered).
    :param invalid: records broken on purpose.
    :param duplicates: repeated valid events.
    """

    records: int = 0
    valid_unique: int = 0
    invalid: int = 0
    duplicates: int = 0


def _token(rng: random.Random, length: int) -> str:
    return "".join(rng.choices(_ALPHABET, k=length))


def _uuid(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _event(rng: random.Random, number: int, user: dict, event_time: int) -> dict:
    price = f"{rng.randint(100, 50000) / 100:.2f}"
    if user["app"]:
        event = {
            "event_type": rng.choice(_APP_TYPES),
            "event_id": f"ev-{number:09d}",
            "event_time": event_time,
            "event_source_url": "https://play.google.com/store/apps/details?id=com.shop.app",
            "event_manager": ["tiktok"],
            "user_data": user["user_data"],
            "app_data": {"app_id": "com.shop.app", "app_name": "ShopApp", "app_version": "2.1.0"},
            "custom_data": [{"key": "currency", "value": "EUR"}, {"key": "value", "value": price}],
        }
    else:
        event = {
            "event_manager": ["tiktok"],
            "event_id": f"ev-{number:09d}",
            "event_type": rng.choice(_WEB_TYPES),
            "event_time": event_time,
            "event_source_url": f"https://shop.example.com/p/{rng.randint(1, 5000)}",
            "user_data": user["user_data"],
            "custom_data": [
                {"key": "currency", "value": "USD"},
                {"key": "value", "value": price},
                {"key": "content_type", "value": "product"},
                {"key": "contents", "value": [{"content_id": f"SKU{rng.randint(1, 999)}", "price": price, "quantity": 1}]},
            ],
            "user_key": user["user_key"],
            "envelope_issued_at": event_time - 86_400,
            "consent": {"ct": 3, "cv": "1YNN"},
        }
        if user["session_id"]:
            event["session_id"] = user["session_id"]
    return event


def _broken(rng: random.Random, event: dict) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        event["event_time"] = event["event_time"] * 1000  # milliseconds
    elif kind == 1:
        event["event_type"] = "purchase"  # wrong case
    elif kind == 2:
        event["custom_data"] = [{"key": "currency", "value": "usd"}]
    else:
        return orjson.dumps(event)[:-7]  # truncated line
    return orjson.dumps(event)


def iter_partition_lines(events: int, *, seed: int, day_start: int) -> Iterator[tuple[bytes, str]]:
    """Yield ``(line, kind)`` for a partition of ``events`` records (kind: valid/invalid/duplicate).

    :param events: number of records to produce (broken and repeated ones included).
    :param seed: the random seed; the same seed gives the same lines.
    :param day_start: Unix seconds of the partition day's midnight (event times fall in that day).
    """
    rng = random.Random(seed)
    number = 0
    produced = 0
    while produced < events:
        app = rng.random() < 0.3
        user_data: dict = {"partner_id": "Ag" + _token(rng, 118)}
        if app:
            user_data["gaid" if rng.random() < 0.5 else "idfa"] = _uuid(rng)
        user = {
            "app": app,
            "user_data": user_data,
            "user_key": f"crm-{rng.getrandbits(40):010x}",
            "session_id": f"s-{rng.getrandbits(48):012x}" if rng.random() < 0.5 else None,
        }
        size = rng.choices(_SESSION_SIZES, _SESSION_WEIGHTS)[0]
        event_time = day_start + rng.randrange(0, 86_400 - 3_600)
        for _ in range(size):
            if produced >= events:
                return
            number += 1
            event = _event(rng, number, user, event_time)
            event_time += rng.randint(5, 300)
            produced += 1
            if number % INVALID_EVERY == 0:
                yield _broken(rng, event), "invalid"
                continue
            line = orjson.dumps(event)
            yield line, "valid"
            if number % DUPLICATE_EVERY == 0 and produced < events:
                produced += 1
                yield line, "duplicate"


def write_partition(folder: Path, events: int, *, seed: int, day_start: int, files: int = 4) -> PartitionCounts:
    """Write a JSONL-gzip partition of ``events`` records into ``folder`` (``part-N.jsonl.gz``).

    :param folder: the partition folder (created).
    :param events: records to write in all.
    :param seed: the random seed.
    :param day_start: Unix seconds of the partition day's midnight.
    :param files: how many files the records are spread over (round robin by session would
        split users across files; consecutive ranges keep a session in one file).
    """
    folder.mkdir(parents=True, exist_ok=True)
    counts = PartitionCounts()
    per_file = -(-events // files)
    outs = [gzip.open(folder / f"part-{i}.jsonl.gz", "wb", compresslevel=1) for i in range(files)]
    try:
        buffer: list[bytes] = []
        index = 0
        for line, kind in iter_partition_lines(events, seed=seed, day_start=day_start):
            counts.records += 1
            if kind == "valid":
                counts.valid_unique += 1
            elif kind == "invalid":
                counts.invalid += 1
            else:
                counts.duplicates += 1
            buffer.append(line)
            if len(buffer) >= 4096 or counts.records % per_file == 0:
                outs[index].write(b"\n".join(buffer) + b"\n")
                buffer.clear()
            if counts.records % per_file == 0:
                index = min(index + 1, files - 1)
        if buffer:
            outs[index].write(b"\n".join(buffer) + b"\n")
    finally:
        for out in outs:
            out.close()
    # The export's completion marker, which the DAG's wait_for_partition sensor waits for.
    (folder / "_SUCCESS").write_bytes(b"")
    return counts
