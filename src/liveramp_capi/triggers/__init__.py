"""Triggers: asynchronous waits that run in Airflow's triggerer, not in a worker slot."""

from __future__ import annotations

from liveramp_capi.triggers.partition import PartitionMarkerTrigger

__all__ = ["PartitionMarkerTrigger"]
