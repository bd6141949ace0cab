"""Helpers of the pipeline tests: a small partition of web conversions and a run's ownership of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from liveramp_capi.state.granularity import check_one_granularity
from liveramp_capi.state.lease import LeaseKeeper, LeaseState, PartitionHeld, PartitionLease

PARTITION = "2026-11-20"
#: Event times lie on the partition's day; the age window is measured from the next day.
DAY_START = 1_795_132_800  # 2026-11-20T00:00:00Z
REFERENCE_TIME = DAY_START + 86_400
ENVELOPE = (
    "AgNTagi_Y2T6eSlK9l3X7uJ11ib8QP2RXvpd2id5wnpjZBOvMGlVDhKsr2MrYrG6iDQHE7Gzlfx-"
    "O1fMCbKqchgakzLDkH66ETOgpeBdEx0GKzpPGRVaP22fwCLFZN1sjjnl"
)
TCF = {"ct": 4, "cv": "CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA"}


def web_event(index: int, user: str, **changes: Any) -> dict[str, Any]:
    """A valid web conversion of ``user`` at ``index`` minutes into the partition's day."""
    event_time = DAY_START + 60 * index
    event: dict[str, Any] = {
        "event_manager": ["tiktok"],
        "event_id": f"web-{index}",
        "event_type": "AddToCart",
        "event_time": event_time,
        "event_source_url": "https://shop.example/p/1",
        "user_data": {"partner_id": ENVELOPE},
        "user_key": user,
        "envelope_issued_at": event_time - 3600,
        "consent": TCF,
    }
    event.update(changes)
    return event


def stage(landing: Path, name: str, events: list[dict[str, Any]]) -> None:
    folder = landing / f"dt={PARTITION}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"".join(orjson.dumps(event) + b"\n" for event in events))


class LeaseOwnership:
    """A run's ownership of the partition in the real lease table (what the operators build from Airflow)."""

    def __init__(self, lease: PartitionLease, owner: str) -> None:
        self.lease, self.owner = lease, owner

    def claim(self) -> LeaseState:
        state = self.lease.acquire(PARTITION, self.owner, "test")
        if not state.acquired:
            raise PartitionHeld(state, self.lease.clock())
        return state

    def release(self) -> None:
        self.lease.release(PARTITION, self.owner)

    def check_one_granularity(self) -> None:
        check_one_granularity(self.lease.engine, PARTITION, self.lease.read, self.owner, self.lease.clock())

    def keeper(self) -> LeaseKeeper:
        self.claim()
        return LeaseKeeper(self.lease, PARTITION, self.owner, "test")
