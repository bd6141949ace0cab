"""The one shape every check in the domain uses to say why a record is refused."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class Violation:
    """Why one input record cannot be sent.

    :param code: stable machine code (``invalid_json``, ``missing_field``, ...); dashboards count these.
    :param pointer: JSON pointer (RFC 6901) of the offending value, ``""`` for the whole record.
    :param reason: human-readable sentence for the engineer fixing the export. It never quotes
        identifiers (envelopes, device ids, IPs, consent strings).
    """

    code: str
    pointer: str
    reason: str
