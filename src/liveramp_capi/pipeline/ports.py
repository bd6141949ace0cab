"""What the steps need from outside, as small protocols (the operators pass the real objects)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from liveramp_capi.state.lease import LeaseState


class Claim(Protocol):
    """This run's claim on its partition (:class:`liveramp_capi.state.lease.LeaseKeeper`)."""

    def ensure_held(self) -> None:
        """Raise when another run took the partition over."""


class Ownership(Protocol):
    """This run's ownership of its partition, taken and given back at the end of the run."""

    def claim(self) -> LeaseState:
        """Take or renew the claim; raise :class:`~liveramp_capi.state.lease.PartitionHeld` when another run holds it."""

    def release(self) -> None:
        """Give the claim back (a no-op when this run does not hold it)."""

    def check_one_granularity(self) -> None:
        """Raise :class:`~liveramp_capi.state.granularity.MixedGranularity` when the partition's day is
        delivered, or claimed by a live run, at the other granularity (day vs hours)."""
