"""Sensors: waits for upstream data, deferrable to the triggerer."""

from __future__ import annotations

from liveramp_capi.sensors.partition import PartitionReadySensor

__all__ = ["PartitionReadySensor"]
