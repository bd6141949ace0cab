"""A partition that fails on purpose, for the delivery console's demo and tests.

The sample partition plus one extra event (``REFUSED_EVENT_ID``, in a session of its own) whose
batch the stand-in refuses with HTTP 400 when started with :data:`STANDIN_ARGS`: the partition
ends ``incomplete`` with one failed batch, and the console shows the failure and the rerun.
The sample's own events are untouched, so other partitions still deliver in full.
"""

from __future__ import annotations

import json
from pathlib import Path

from capi_devtools.sample_partition import stage_sample_partition

REFUSED_EVENT_ID = "demo-refused-1"
#: Stand-in flags that make it refuse the batch holding the extra event.
STANDIN_ARGS: tuple[str, ...] = ("--reject-event-ids", REFUSED_EVENT_ID)


def stage_refused_partition(landing_dir: Path, partition: str) -> Path:
    """Stage the sample partition for ``partition`` plus the event the stand-in refuses.

    :param landing_dir: local folder behind the ``capi_landing_root`` URL.
    :param partition: the day to stage, ``YYYY-MM-DD``.
    """
    target = stage_sample_partition(landing_dir, partition)
    template = json.loads((target / "web-events.jsonl").read_text().splitlines()[0])
    template.update(event_id=REFUSED_EVENT_ID, session_id="demo-refused-session")
    (target / "refused-by-standin.jsonl").write_text(json.dumps(template) + "\n")
    return target
