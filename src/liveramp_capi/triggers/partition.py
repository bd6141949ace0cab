"""Wait, in the triggerer, for a partition's completion marker on object storage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

#: The marker an upstream export writes last, once every file of the partition is in place.
DEFAULT_MARKER = "_SUCCESS"


def marker_url(landing_root: str, partition: str, marker: str = DEFAULT_MARKER) -> str:
    """URL of a partition's completion marker: ``<landing_root>/dt=YYYY-MM-DD/<marker>``.

    :param landing_root: URL of the landing root (checked: a supported scheme, no traversal).
    :param partition: the partition, ``YYYY-MM-DD`` (checked).
    :param marker: the marker's file name, a plain name.
    :raises ValueError: on a bad root, partition or marker name.
    """
    from liveramp_capi.domain.partition import check_root, parse_partition
    from liveramp_capi.storage.layout import partition_folder

    if not marker or "/" in marker or marker in {".", ".."}:
        raise ValueError("the marker is a plain file name inside the partition folder")
    root = check_root(landing_root, name="capi_landing_root").rstrip("/")
    return f"{root}/{partition_folder(parse_partition(partition))}/{marker}"


def marker_exists(url: str) -> bool:
    """Whether the marker exists (a blocking call on object storage).

    :param url: the marker's URL, from :func:`marker_url`.
    """
    from airflow.sdk import ObjectStoragePath

    marker = ObjectStoragePath(url)
    # The filesystem object lives as long as the process (the triggerer's is long-lived): drop
    # any listing it cached, so an object store is asked again at every check.
    marker.fs.invalidate_cache(marker.parent.path)
    return marker.exists()


class PartitionMarkerTrigger(BaseTrigger):
    """Fire when ``<landing_root>/dt=YYYY-MM-DD/_SUCCESS`` exists, or when the wait times out.

    Runs in the triggerer: one event loop holds thousands of such waits, so a late export does
    not hold a worker slot. Each check runs in a thread (object storage clients are blocking),
    never on the event loop itself.

    The deadline is an absolute Unix time, so a triggerer restart resumes the same wait instead
    of starting the clock again.

    :param landing_root: URL of the landing root.
    :param partition: the partition, ``YYYY-MM-DD``.
    :param timeout_at: Unix seconds after which the trigger gives up (event ``status="timeout"``).
    :param poll_interval: seconds between two checks.
    :param marker: the marker's file name.
    """

    def __init__(
        self,
        *,
        landing_root: str,
        partition: str,
        timeout_at: float,
        poll_interval: float = 60.0,
        marker: str = DEFAULT_MARKER,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # BaseTrigger is untyped
        self.landing_root = landing_root
        self.partition = partition
        self.timeout_at = float(timeout_at)
        self.poll_interval = float(poll_interval)
        self.marker = marker

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "landing_root": self.landing_root,
                "partition": self.partition,
                "timeout_at": self.timeout_at,
                "poll_interval": self.poll_interval,
                "marker": self.marker,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        url = marker_url(self.landing_root, self.partition, self.marker)
        checks = 0
        while True:
            checks += 1
            try:
                found = await asyncio.to_thread(marker_exists, url)
            except OSError as err:
                # A storage hiccup is not an answer: keep waiting until the deadline. Only the
                # error's type is logged; its text may name a bucket's credentials source.
                self.log.warning("Checking the marker of partition %s failed (%s); will retry",
                                 self.partition, type(err).__name__)
                found = False
            if found:
                yield TriggerEvent({"status": "ready", "partition": self.partition, "checks": checks})  # type: ignore[no-untyped-call]
                return
            remaining = self.timeout_at - time.time()
            if remaining <= 0:
                yield TriggerEvent({"status": "timeout", "partition": self.partition, "checks": checks})  # type: ignore[no-untyped-call]
                return
            await asyncio.sleep(min(self.poll_interval, remaining))
