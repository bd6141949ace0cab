"""Stage the sample partition (``sample/conversions/`` beside this module) under a landing root for a given day.

The sample files are dated 2024-05-03, near the seed's examples. TikTok ignores events older
than 28 days, so the demo and the tests move every ``event_time`` onto the day they stage,
keeping the hours, gaps and the deliberately invalid records as they are. The app events are
gzipped on the way, so the sample covers ``.jsonl``, ``.jsonl.gz`` and ``.csv``.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import json
from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parent / "sample" / "conversions"
SAMPLE_DAY = dt.date(2024, 5, 3)


def _shift_jsonl_line(line: str, offset: int) -> str:
    try:
        record = json.loads(line)
    except ValueError:
        return line  # a deliberately broken line stays broken
    if isinstance(record, dict):
        for field in ("event_time", "envelope_issued_at"):
            value = record.get(field)
            # 13-digit (millisecond) values are shifted in milliseconds so they stay invalid.
            if isinstance(value, int):
                record[field] = value + (offset * 1000 if value > 9_999_999_999 else offset)
    return json.dumps(record)


def stage_sample_partition(landing_dir: Path, partition: str) -> Path:
    """Write the sample partition to ``<landing_dir>/dt=<partition>/`` and return that folder.

    :param landing_dir: local folder behind the ``capi_landing_root`` URL.
    :param partition: the day to stage, ``YYYY-MM-DD``.
    """
    day = dt.date.fromisoformat(partition)
    offset = int((day - SAMPLE_DAY).total_seconds())
    target = landing_dir / f"dt={partition}"
    target.mkdir(parents=True, exist_ok=True)
    for source in sorted(SAMPLE_DIR.iterdir()):
        text = source.read_text(encoding="utf-8")
        if source.suffix == ".jsonl":
            shifted = "".join(_shift_jsonl_line(line, offset) + "\n" for line in text.splitlines())
            if source.name.startswith("app-"):
                (target / (source.name + ".gz")).write_bytes(gzip.compress(shifted.encode()))
            else:
                (target / source.name).write_text(shifted, encoding="utf-8")
        elif source.suffix == ".csv":
            rows = list(csv.DictReader(io.StringIO(text, newline="")))
            for row in rows:
                if row["event_time"].isdigit():
                    row["event_time"] = str(int(row["event_time"]) + offset)
            out = io.StringIO()
            writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            (target / source.name).write_text(out.getvalue(), encoding="utf-8")
    (target / "_SUCCESS").write_text("")
    return target
