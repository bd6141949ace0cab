"""What the steps need from outside, as small protocols (the operators pass the real objects)."""

from __future__ import annotations

from typing import Protocol


class Claim(Protocol):
    """This run's claim on its partition (:class:`liveramp_capi.state.lease.LeaseKeeper`)."""

    def ensure_held(self) -> None:
        """Raise when another run took the partition over."""
